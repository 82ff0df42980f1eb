"""Start one vLLM engine, run greedy generation (and optionally score a text), print the result.

Run as a script in a fresh process, as a user would start vLLM; the test reads the last line:
    RESULT {"tokens": [[...], ...], "scored": [[logprob, top1_id], ...] | null, "seconds": ...}
Arguments: one JSON object with model, load_format, extra (loader options), prompts, max_tokens
and an optional text to score with prompt logprobs.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")


def main() -> None:
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=args["model"],
        load_format=args.get("load_format", "auto"),
        **({"model_loader_extra_config": args["extra"]} if args.get("extra") else {}),
        dtype=args.get("dtype", "bfloat16"),
        max_model_len=args.get("max_model_len", 512),
        enforce_eager=True,
        seed=0,
    )
    start_seconds = time.perf_counter() - started
    greedy = SamplingParams(temperature=0.0, max_tokens=args.get("max_tokens", 16))
    outputs = llm.generate(args.get("prompts", ["The capital of France is"]), greedy, use_tqdm=False)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    texts = [out.outputs[0].text for out in outputs]
    scored = None
    if args.get("score"):
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        (out,) = llm.generate([args["score"]], params, use_tqdm=False)
        scored = []
        for position, logprobs in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True):
            top1 = max(logprobs.items(), key=lambda item: item[1].logprob)[0]
            scored.append([logprobs[position].logprob, top1])
    print(
        "RESULT "
        + json.dumps({"tokens": tokens, "texts": texts, "scored": scored, "start_seconds": start_seconds})
    )


if __name__ == "__main__":
    main()

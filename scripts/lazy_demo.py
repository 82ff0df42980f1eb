"""Demo step: load the packed MiniLM lazily, run it, check it against eager transformers, print costs.

python scripts/lazy_demo.py STORE MODEL_DIR
"""

from __future__ import annotations

import sys
import time

import psutil
import torch
import transformers

from blockstore import runtime

SENTENCES = ["blockstore loads weights when they are used", "hello world"]


def main(store: str, model_dir: str) -> None:
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    eager = transformers.AutoModel.from_pretrained(model_dir).eval()  # the reference, loaded first
    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    model = runtime.load_model(store)
    opened = time.perf_counter() - started
    rss_open = process.memory_info().rss - rss_before
    read_at_open = model.blockstore.stats().chunks_read
    with torch.no_grad():
        started = time.perf_counter()
        lazy = model(**inputs).last_hidden_state
        first_forward = time.perf_counter() - started
        expected = eager(**inputs).last_hidden_state
    stats = model.blockstore.stats()
    size = model.blockstore.snapshot.nbytes / 1e6
    table = model.blockstore["embeddings.word_embeddings.weight"].nbytes / 1e6
    print(f"load_model: {opened * 1e3:.0f} ms, RSS +{rss_open / 1e6:.1f} MB, {read_at_open} chunks read")
    decoded = stats.bytes_decoded / 1e6
    print(f"first forward: {first_forward * 1e3:.0f} ms, {decoded:.1f} of {size:.1f} MB decoded")
    print(f"  ({stats.chunks_read} chunks; of the {table:.1f} MB embedding table only the looked-up rows)")
    if not torch.equal(lazy, expected):
        sys.exit("FAIL: lazy outputs differ from eager transformers")
    print("outputs bit-identical to eager transformers")


if __name__ == "__main__":
    main(*sys.argv[1:])

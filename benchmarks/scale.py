"""Bounded memory at scale: an ~8 GB sharded bf16 model packed, loaded from s3://, loaded under a
budget and exported, each in a fresh process whose memory is sampled from here.

The model is Llama-shaped (`SHAPE`, `randn*0.02` in bf16), written as 4 shards and
`model.safetensors.index.json`, as checkpoints of this size ship. Figures per step:
- `pack`: `blockstore pack` into a local store: seconds, MB/s of model, peak RSS;
- `s3_load`: `runtime.open(s3://...).load_all()` from SeaweedFS on an unshaped veth: seconds,
  peak anonymous memory against the model's size;
- `budget_forward`: `runtime.load_model(store, budget=BUDGET)` and one forward over every layer:
  seconds, peak anonymous memory against the budget plus the dynamic (resident) tensors;
- `export`: `blockstore export` to a directory, every shard compared byte for byte (sha256).
Then the per-chunk and per-tensor costs of a snapshot (bytes and parse time, from a synthetic
snapshot of Llama-3.1-405B's shapes) give what a 405B model (810 GB bf16) costs.

    sudo python -m blockstore.benchmarks.scale --out packs/scale-2core [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .evidence import command_line, summarize, write_pack
from .models import llama_layout, synthetic_weight
from .netns import shaped_link
from .timeline import Sampler
from .vllm_load import CREDENTIALS, _blockstore, _create_bucket, seaweedfs

SHAPE: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 18,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
}
"""Llama-2-7B's layer shape with 18 layers: about 3.9 B parameters, 7.8 GB in bf16."""
SHARDS = 4
BUDGET = "1GiB"
MB = 1e6
LLAMA_405B: dict[str, int] = {
    "hidden": 16384,
    "intermediate": 53248,
    "layers": 126,
    "vocab": 128256,
    "kv": 1024,
}


def sharded_llama(directory: Path) -> Path:
    """The sharded model (written once, then reused): shards filled in module order."""
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    import torch
    from safetensors.torch import save_file

    config, shapes = llama_layout(SHAPE)
    total = sum(2 * math.prod(shape) for shape in shapes.values())
    staging = Path(tempfile.mkdtemp(dir=directory.parent))
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    names = list(shapes)
    shard, filled, tensors = 1, 0, {}
    for index, name in enumerate(names):
        shape = shapes[name]
        tensors[name] = synthetic_weight(name, shape, generator)
        filled += 2 * math.prod(shape)
        if filled >= total * shard / SHARDS or index == len(names) - 1:
            file = f"model-{shard:05d}-of-{SHARDS:05d}.safetensors"
            save_file(tensors, staging / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            shard, tensors = shard + 1, {}
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(staging)
    staging.rename(directory)
    return directory


_BASELINE = (
    "import torch, transformers\nfrom blockstore import runtime\n"
    "from blockstore.runtime.engines.memory import status_bytes\n"
    "print('BASELINE', status_bytes('RssAnon'), flush=True)\n"
)
"""Every child imports what it needs, then reports its anonymous memory before it loads anything:
the interpreter, torch and transformers hold a few hundred MB that no load can give back."""
_CHILD = {
    "s3_load": _BASELINE + "with runtime.open(URL) as s:\n    s.load_all()\n",
    "budget_forward": (
        _BASELINE + "with runtime.closing(runtime.load_model(URL, budget=BUDGET)) as m:\n"
        "    with torch.no_grad():\n        m(torch.tensor([[1, 2, 3, 4]]))\n"
        "    s = m.blockstore.stats()\n"
        "    print('RESIDENT', s.resident_bytes, s.peak_cached_bytes)\n"
    ),
}


def _sampled(argv: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any], str]:
    """(seconds, timeline, stdout) of one process, its memory sampled from here."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with Sampler(process.pid, interval=0.1) as sampler:
        out, err = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{err[-3000:]}")
    return seconds, sampler.timeline(), out


def _reported(out: str, label: str) -> list[int]:
    """The numbers a child printed on its `label` line."""
    line = next(line for line in out.splitlines() if line.startswith(label + " "))
    return [int(field) for field in line.split()[1:]]


def _peak(timeline: dict[str, Any], column: str) -> float:
    return max((value for value in timeline[column] if value is not None), default=0.0)


def _python(step: str, url: str, env: dict[str, str]) -> tuple[float, dict[str, Any], str]:
    code = _CHILD[step].replace("URL", repr(url)).replace("BUDGET", repr(BUDGET))
    return _sampled([sys.executable, "-c", code], env)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def snapshot_costs(repo_path: Path) -> dict[str, float]:
    """Bytes and parse time of a snapshot with Llama-3.1-405B's tensors in 4 MiB chunks (chunk
    keys and digests random: their size and the checks are what cost, not their values)."""
    from blockstore.core.manifests import ChunkRef, Snapshot, SourceFile, merkle_digest
    from blockstore.repo import Repository

    with Repository.open(repo_path) as repo:
        template = next(iter(repo.snapshot(repo.resolve("main")).tensors.values()))
    size = LLAMA_405B
    hidden = size["hidden"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (size["vocab"], hidden),
        "lm_head.weight": (size["vocab"], hidden),
    }
    for layer in range(size["layers"]):
        prefix = f"model.layers.{layer}."
        for name, shape in (
            ("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (size["kv"], hidden)),
            ("self_attn.v_proj", (size["kv"], hidden)), ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (size["intermediate"], hidden)),
            ("mlp.up_proj", (size["intermediate"], hidden)),
            ("mlp.down_proj", (hidden, size["intermediate"])), ("input_layernorm", (hidden,)),
            ("post_attention_layernorm", (hidden,)),
        ):  # fmt: skip
            shapes[f"{prefix}{name}.weight"] = shape
    chunk = 4 << 20
    entries = {}
    for name, dims in shapes.items():
        nbytes = 2 * math.prod(dims)
        chunks = tuple(
            ChunkRef(
                os.urandom(16),
                min(chunk, nbytes - start),
                min(chunk, nbytes - start) * 2 // 3,
                os.urandom(32),
            )
            for start in range(0, nbytes, chunk)
        )
        entries[name] = replace(
            template,
            name=name,
            dtype="BF16",
            shape=dims,
            chunks=chunks,
            digest=merkle_digest("BF16", dims, chunks),
        )
    snapshot = Snapshot((SourceFile("model.safetensors", b"{}", tuple(entries)),), entries, {}, None, "", 0)
    data = snapshot.to_bytes()
    started = time.perf_counter()
    Snapshot.from_bytes(data)
    parse_s = time.perf_counter() - started
    count = sum(len(entry.chunks) for entry in entries.values())
    return {
        "model_bytes": float(snapshot.nbytes),
        "tensors": float(len(entries)),
        "chunks": float(count),
        "snapshot_bytes": float(len(data)),
        "snapshot_bytes_per_chunk": len(data) / count,
        "snapshot_parse_s": parse_s,
    }


def run(work: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    model = sharded_llama(work / "llama8gb")
    shards = sorted(model.glob("*.safetensors"))
    model_bytes = sum(path.stat().st_size for path in shards)
    store = work / "llama8gb-store"
    if store.exists():
        subprocess.run(["rm", "-rf", str(store)], check=True)
    _blockstore("init", str(store))
    figures: dict[str, dict[str, float]] = {}
    timelines: dict[str, dict[str, Any]] = {}
    blockstore_cli = [sys.executable, "-m", "blockstore.cli.app"]
    seconds, timeline, _ = _sampled([*blockstore_cli, "pack", "-s", str(store), str(model), "--json"], env)
    figures["pack"] = {
        "pack_s": seconds,
        "pack_mb_s": model_bytes / MB / seconds,
        "peak_rss_mb": _peak(timeline, "rss_mb"),
        "peak_anon_mb": _peak(timeline, "anon_mb"),
    }
    timelines["blockstore"] = {"pack": timeline}
    stats = json.loads(_blockstore("stats", "--json", str(store)))
    with shaped_link() as link, seaweedfs(link, Path(tempfile.mkdtemp(dir=work))) as endpoint:
        s3_env = {**env, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        _create_bucket(endpoint, "models")
        url = "s3://models/llama8gb-store"
        _blockstore("init", url, env=s3_env)
        _blockstore("push", str(store), url, env=s3_env)
        seconds, timeline, out = _python("s3_load", url, s3_env)
    baseline = _reported(out, "BASELINE")[0] / MB
    peak = _peak(timeline, "anon_mb")
    figures["s3_load"] = {
        "load_s": seconds,
        "peak_anon_mb": peak,
        "baseline_anon_mb": baseline,
        "over_model_mb": peak - baseline - model_bytes / MB,
    }
    timelines["blockstore"]["s3_load"] = timeline
    seconds, timeline, out = _python("budget_forward", str(store), env)
    resident = _reported(out, "RESIDENT")[0]
    baseline = _reported(out, "BASELINE")[0] / MB
    from blockstore.sizes import parse_size

    budget = parse_size(BUDGET) or 0
    peak = _peak(timeline, "anon_mb")
    figures["budget_forward"] = {
        "forward_s": seconds,
        "peak_anon_mb": peak,
        "baseline_anon_mb": baseline,
        "over_budget_and_dynamic_mb": peak - baseline - (budget + resident) / MB,
    }
    timelines["blockstore"]["budget_forward"] = timeline
    out_dir = work / "exported"
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    seconds, timeline, _ = _sampled([*blockstore_cli, "export", f"{store}@main", str(out_dir) + "/"], env)
    identical = all(_sha256(path) == _sha256(out_dir / path.name) for path in shards)
    figures["export"] = {
        "export_s": seconds,
        "peak_rss_mb": _peak(timeline, "rss_mb"),  # the store's mapped pages count in RSS
        "peak_anon_mb": _peak(timeline, "anon_mb"),
        "identical_count": float(identical),
    }
    timelines["blockstore"]["export"] = timeline
    costs = snapshot_costs(store)
    return {
        "model": str(model),
        "model_bytes": model_bytes,
        "stored_bytes": stats["chunk_bytes"],
        "figures": figures,
        "timelines": timelines,
        "llama_405b_snapshot": costs,
        "budget_bytes": budget,
        "resident_bytes": resident,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="blockstore-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    measured = run(work)
    results = {
        "benchmark": "scale",
        "model": measured["model"],
        "model_bytes": measured["model_bytes"],
        "stored_bytes": measured["stored_bytes"],
        "runs": 1,
        "cold": False,
        "reference": "blockstore",
        "results": {
            "blockstore": {
                f"{step}:{k}": summarize([v])
                for step, row in measured["figures"].items()
                for k, v in row.items()
            }
        },
        "timelines": measured["timelines"],
        "llama_405b_snapshot": measured["llama_405b_snapshot"],
        "budget_bytes": measured["budget_bytes"],
        "resident_bytes": measured["resident_bytes"],
    }
    results["ratio_to_reference"] = {"blockstore": {}}
    write_pack(args.out, results, command_line(), store_path=work)
    print(
        json.dumps(
            {"figures": measured["figures"], "llama_405b_snapshot": measured["llama_405b_snapshot"]}, indent=2
        )
    )


if __name__ == "__main__":
    main()

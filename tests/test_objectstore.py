"""The store on S3-compatible object storage, against real servers started by the tests (moto and
SeaweedFS on 127.0.0.1): the shared store suite, conditional writes, racing publishers, a killed pack,
and the lazy runtime and CLI unchanged on an s3:// store."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from blockstore import runtime
from blockstore.core.hashing import chunk_key
from blockstore.errors import ConditionalWritesIgnored, ObjectStoreDenied, RefConflict
from blockstore.ops.pack import pack
from blockstore.repo import Repository
from blockstore.storage import s3 as objectstore_module
from blockstore.storage.cache import ReadThroughCache
from blockstore.storage.faults import CRASH_ENV, CRASH_EXIT_CODE
from blockstore.storage.s3 import ObjectStore
from blockstore.testing.store import StoreSuite

from .faults import (
    RUN_CLI,
    Operation,
    Tally,
    check_survivor,
    content_at,
    float_tensor,
    kill_at,
    rerun_succeeds,
    timed_run,
    write_version,
)
from .helpers import assert_one_line_error, cli, sha256, write_safetensors
from .s3servers import CREDENTIALS


class TestObjectStore(StoreSuite):
    @pytest.fixture
    def store(self, s3_prefix_url: str):
        with ObjectStore.create(s3_prefix_url) as opened:
            yield opened


class TestReadThroughCache(StoreSuite):
    """The cache in front of an object store (moto) is the same store to its callers."""

    @pytest.fixture
    def store(self, moto_prefix_url: str, tmp_path: Path):
        with ReadThroughCache(ObjectStore.create(moto_prefix_url), tmp_path / "cache") as opened:
            yield opened


def test_the_cli_works_unchanged_on_an_s3_store(moto_url: str, minilm_path: Path, tmp_path: Path) -> None:
    """init, pack, re-pack (dedup), export byte-identical, verify --deep, diff/apply/rollback, gc,
    doctor and push/pull, on an s3:// store exactly as on a directory."""
    assert cli("init", moto_url).exit_code == 0
    packed = cli("pack", minilm_path, "--store", moto_url, "--json").json()
    assert packed["new_chunks"] > 0
    again = cli("pack", minilm_path, "--store", moto_url, "--json").json()
    assert again["unchanged"] and again["new_bytes"] == 0
    out = tmp_path / "out.safetensors"
    assert cli("export", f"{moto_url}@main", out).exit_code == 0
    assert sha256(out) == sha256(minilm_path)
    assert cli("verify", "--deep", moto_url).exit_code == 0
    assert "main" in cli("ls", moto_url).stdout
    counts = cli("stats", moto_url, "--json").json()
    assert (counts["refs"], counts["snapshots"], counts["reflog"]) == (1, 1, 1)
    assert counts["chunks"] == packed["new_chunks"] and counts["file_bytes"] > counts["chunk_bytes"] > 0

    tuned = tmp_path / "tuned.safetensors"
    weights = load_file(str(minilm_path))
    weights["embeddings.word_embeddings.weight"][:100] += 1
    save_file(weights, str(tuned))
    bundle = tmp_path / "update.bsp"
    assert cli("diff", moto_url, "main", tuned, "-o", bundle).exit_code == 0
    assert cli("apply", moto_url, bundle).exit_code == 0
    assert cli("rollback", moto_url).exit_code == 0
    collected = cli("gc", moto_url, "--keep", "0", "--json").json()
    assert len(collected["deleted_snapshots"]) == 1 and collected["deleted_chunks"] > 0
    assert cli("verify", "--deep", moto_url).exit_code == 0
    assert cli("doctor", moto_url, "--json").json()["leases"] == []

    local = tmp_path / "local"
    pulled = cli("pull", moto_url, local, "--json").json()
    assert pulled["chunks_sent"] > 0 and pulled["chunks_present"] == 0
    assert cli("pull", moto_url, local, "--json").json()["chunks_sent"] == 0  # only what is missing
    assert cli("export", f"{local}@main", out).exit_code == 0 and sha256(out) == sha256(minilm_path)
    pushed = cli("push", local, f"{moto_url}-copy", "--json").json()
    assert pushed["chunks_sent"] == pulled["chunks_sent"]


LOAD_AND_RUN = """
import json, sys, torch
from blockstore import runtime
from blockstore.repo import Repository
from transformers import AutoModel
model = runtime.load_model(sys.argv[1], cache=sys.argv[2])
ids = torch.tensor([[101, 7592, 2088, 102]])
with torch.no_grad():
    output = model(input_ids=ids).last_hidden_state
model.blockstore.wait_for_prefetch()  # the read-ahead of the rest of the embedding table
store = model.blockstore.repo.store
print(json.dumps({"output": output.flatten().tolist(), "chunk_gets": store.misses, "cache_hits": store.hits,
                  "requests": store.remote.requests}))
"""


def test_lazy_load_on_another_host_is_bit_identical_and_cached(
    moto_url: str, minilm_path: Path, tmp_path: Path
) -> None:
    """A second process (another "host", its own cache directory) loads the model lazily from s3://;
    outputs equal an eager load bit for bit; a second load is served from its cache."""
    assert cli("init", moto_url).exit_code == 0
    assert cli("pack", minilm_path, "--store", moto_url).exit_code == 0
    script = tmp_path / "host.py"
    script.write_text(LOAD_AND_RUN)
    cache = tmp_path / "host-cache"

    def load() -> dict:
        done = subprocess.run(
            [sys.executable, str(script), moto_url, str(cache)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = load(), load()
    eager = eager_output(minilm_path)
    assert first["output"] == eager and second["output"] == eager
    assert first["chunk_gets"] > 0 and second["chunk_gets"] == 0
    assert second["cache_hits"] >= first["chunk_gets"] - first["cache_hits"]


def eager_output(model_dir_file: Path) -> list[float]:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir_file.parent).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[101, 7592, 2088, 102]])).last_hidden_state.flatten().tolist()


def race_once(stores: list[ObjectStore], round_number: int, current: bytes | None) -> list[str]:
    """Every publisher writes its own snapshot, waits for the others, then tries to move main."""
    barrier = threading.Barrier(len(stores))
    outcomes = [""] * len(stores)

    def publish(index: int) -> None:
        mine = bytes([round_number + 1, index + 1]) * 16
        stores[index].put_snapshot(mine, b"snapshot")
        barrier.wait()
        try:
            stores[index].move_ref("main", mine, current, "pack", f"{round_number}/{index}")
            outcomes[index] = "won"
        except RefConflict:
            outcomes[index] = "conflict"

    threads = [threading.Thread(target=publish, args=(index,)) for index in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_racing_publishers_exactly_one_wins_per_round(s3_url: str) -> None:
    """8 publishers (each its own client) race to move one ref from the same old value, 4 rounds:
    exactly one wins each round, the others get RefConflict, and the reflog is one unbroken chain."""
    publishers, rounds = 8, 4
    with ObjectStore.create(s3_url) as setup:
        base = b"\0" * 32
        setup.put_snapshot(base, b"base")
        setup.move_ref("main", base, None, "pack", "base")
    stores = [ObjectStore(s3_url) for _ in range(publishers)]
    winners = []
    try:
        for round_number in range(rounds):
            outcomes = race_once(stores, round_number, stores[0].get_ref("main"))
            assert sorted(outcomes) == ["conflict"] * (publishers - 1) + ["won"], outcomes
            winners.append(stores[0].get_ref("main"))
        log = stores[0].reflog("main")
        assert [entry.new for entry in log] == [base, *winners]
        assert all(later.old == earlier.new for earlier, later in itertools.pairwise(log))
    finally:
        for store in stores:
            store.close()


class IgnoresConditions(ObjectStore):
    """A server (or proxy) that drops If-None-Match and If-Match: every put overwrites."""

    def _put(self, key: str, data: bytes, *, mode: object) -> str | None:
        return super()._put(key, data, mode="overwrite")


def test_a_server_that_ignores_conditional_writes_gets_no_ref_moves(
    moto_url: str, minilm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Repository.init(moto_url).close()
    monkeypatch.setattr(objectstore_module, "ObjectStore", IgnoresConditions)
    with Repository.open(moto_url) as repo:
        assert not repo.store.conditional_writes
        with pytest.raises(ConditionalWritesIgnored, match="ignores conditional writes"):
            pack(repo, [minilm_path])
        assert repo.store.refs() == {}
    result = cli("pack", minilm_path, "--store", moto_url)
    assert_one_line_error(result, "ignores conditional writes")


def test_a_pack_killed_mid_way_leaves_the_store_consistent(moto_url: str, minilm_path: Path) -> None:
    """Killed after its chunks are written: refs untouched, verify clean (orphans reported), gc
    removes the orphans, and the pack then runs to completion."""
    assert cli("init", moto_url).exit_code == 0
    killed = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "pack", str(minilm_path), "--store", moto_url],
        env={**os.environ, CRASH_ENV: "chunks.committed"},
        capture_output=True,
    )
    assert killed.returncode == CRASH_EXIT_CODE, killed.stderr.decode()[-2000:]
    report = cli("verify", "--deep", moto_url, "--json").json()
    assert report["clean"] and report["orphans"] and report["snapshots"] == 0
    assert cli("doctor", moto_url, "--json").json()["leases"][0]["stale"]  # the dead writer's lease
    collected = cli("gc", moto_url, "--json").json()
    assert collected["deleted_chunks"] == len(report["orphans"])
    assert cli("verify", moto_url, "--json").json()["orphans"] == []
    assert cli("doctor", moto_url, "--json").json()["leases"] == []
    assert cli("pack", minilm_path, "--store", moto_url).exit_code == 0
    assert cli("verify", "--deep", moto_url).exit_code == 0


def test_the_read_through_cache_stays_under_its_budget(moto_url: str, tmp_path: Path) -> None:
    values = [os.urandom(10_000) for _ in range(40)]
    items = [(chunk_key(value), value) for value in values]
    with ObjectStore.create(moto_url) as remote:
        remote.put_batch(items)
    cache = ReadThroughCache(ObjectStore(moto_url), tmp_path / "cache", budget=100_000)
    try:
        for key, value in items:
            assert cache.get(key) == value
        assert cache.misses == 40 and cache.hits == 0
        cache.flush()
        held = cache.local.stored_sizes(cache.local.iter_keys())
        assert 0 < sum(held.values()) <= 100_000 and len(held) < 40
        kept = next(iter(held))
        assert cache.get(kept) == dict(items)[kept] and cache.hits == 1
    finally:
        cache.close()


def test_user_errors_on_s3_are_one_line(moto_url: str) -> None:
    assert cli("init", moto_url).exit_code == 0
    assert_one_line_error(cli("init", moto_url), "already exists")
    assert_one_line_error(cli("ls", f"{moto_url}-nothing-here"), "no blockstore at", exit_code=3)
    assert_one_line_error(cli("ls", "s3://no-such-bucket-here/x"), "s3://no-such-bucket-here/x")
    assert_one_line_error(cli("show", f"{moto_url}@nope"), "does not exist", exit_code=3)


@dataclass
class PackToS3(Operation):
    """Pack v2 into a fresh s3:// prefix that holds v1 (a new prefix per run: no copy of a template)."""

    endpoint: str = ""
    v1: Path = Path()

    def fresh_store(self, directory: Path) -> str:  # type: ignore[override]
        url = f"s3://{self.template}/run-{uuid.uuid4().hex[:12]}"
        Repository.init(url, chunk_size=65536).close()  # ~150 chunks a version: a few hundred requests
        with Repository.open(url) as repo:
            pack(repo, [self.v1])
        return url


@pytest.mark.parametrize(
    "kills", [pytest.param(3, marks=pytest.mark.slow), pytest.param(25, marks=pytest.mark.faults)]
)
def test_random_sigkills_of_a_pack_to_s3(moto_url: str, tmp_path: Path, kills: int) -> None:
    """The fault campaign of test_faults.py against an object store: SIGKILL at random moments."""
    v1 = write_version(tmp_path / "v1.safetensors", changed_seed=1)
    v2 = write_version(tmp_path / "v2.safetensors", changed_seed=2)
    bucket = moto_url.removeprefix("s3://").split("/")[0]
    probe = PackToS3("pack", Path(bucket), ["pack", str(v2), "--store", "STORE"], b"", b"", v1=v1)
    first = probe.fresh_store(tmp_path)
    probe.before = content_at(first)
    duration = timed_run(probe, first)
    probe.after = content_at(first)
    startup = timed_run(probe, first, ["--help"])
    rng = random.Random(kills)
    tally = Tally()
    for _ in range(kills):
        url = probe.fresh_store(tmp_path)
        if kill_at(probe, url, rng.uniform(0.9 * startup, 1.05 * duration)):
            tally.kills += 1
        check_survivor(url, probe, tally)
        rerun_succeeds(url, probe)
        assert cli("gc", url).exit_code == 0
        assert cli("verify", url, "--json").json()["orphans"] == []
    print(
        f"\ns3 pack: {tally.kills} kills survived; "
        f"main as before {tally.left_before}, after {tally.left_after}"
    )


def test_read_only_credentials_still_read(
    moto_url: str, minilm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inference hosts often may only read: the store opens read-only (no probe, no pins)."""
    assert cli("init", moto_url).exit_code == 0
    assert cli("pack", minilm_path, "--store", moto_url).exit_code == 0

    def denied(self: ObjectStore) -> bool:
        raise ObjectStoreDenied(self.path, "PUT", "probe/x", "403 Forbidden")

    monkeypatch.setattr(ObjectStore, "_probe", denied)
    with runtime.open(moto_url) as state:
        assert state.repo.store.readonly
        assert state["embeddings.word_embeddings.weight"].materialize().shape[0] == 30522


class _Refuses(BaseHTTPRequestHandler):
    """Stands in for the EC2 instance-metadata service on a host that is not on EC2."""

    def _refuse(self) -> None:
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = _refuse

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def no_aws_setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A host with no AWS variables set, whose instance-metadata service refuses (a local server:
    no test reaches a non-local address)."""
    for name in (*CREDENTIALS, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_no_credentials_and_no_endpoint_say_what_to_set(no_aws_setup: None) -> None:
    for args in (["ls", "s3://some-bucket/models"], ["init", "s3://some-bucket/models"]):
        assert_one_line_error(
            cli(*args), "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"
        )


def test_no_credentials_with_an_endpoint_names_only_the_credentials(
    no_aws_setup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    result = cli("ls", "s3://some-bucket/models")
    assert_one_line_error(result, "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    assert "AWS_ENDPOINT_URL" not in result.stderr


def test_a_key_id_without_its_secret_says_so(no_aws_setup: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    assert_one_line_error(cli("ls", "s3://some-bucket/models"), "SecretAccessKey", "AWS_SECRET_ACCESS_KEY")


def test_doctor_on_s3_reports_no_memory_map(moto_url: str) -> None:
    """An object store has no map and no reader slots: doctor says what it stores, fakes nothing."""
    assert cli("init", moto_url).exit_code == 0
    report = cli("doctor", moto_url, "--json").json()
    assert report["file_bytes"] > 0 and report["leases"] == []
    assert all(report[name] is None for name in ("map_size", "map_used", "reader_slots", "max_readers"))
    assert report["stale_readers_cleared"] is None
    text = cli("doctor", moto_url).stdout
    assert "objects:" in text and "readers:" not in text


@pytest.mark.slow  # test_store.py::test_the_map_grows_while_many_threads_read_through_a_cache: quick
def test_a_cold_cache_whose_map_must_grow_serves_eight_decode_workers(
    moto_url: str, minilm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime's decode threads (more than this machine's cores) fill an empty read-through
    cache whose map starts at 1 MiB: it grows many times mid-load, beside open read transactions,
    and every tensor still comes back bit-identical (before the resize gate: mdb_put EINVAL)."""
    import blockstore.storage.lmdb as lmdb_module

    Repository.init(moto_url, chunk_size=65536).close()
    with Repository.open(moto_url) as repo:
        pack(repo, [minilm_path])
    monkeypatch.setattr(lmdb_module, "INITIAL_MAP_SIZE", 1 << 20)
    expected = load_file(str(minilm_path))
    with runtime.open(moto_url, cache=tmp_path / "cache", workers=max(8, 2 * (os.cpu_count() or 1))) as state:
        loaded = state.load_all()
        cache = state.repo.store
        assert isinstance(cache, ReadThroughCache) and cache.misses > 100
        assert cache.local.usage()["map_size"] > 16 << 20
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.numpy().tobytes() == expected[name].tobytes(), name


def test_a_model_from_an_object_store_reads_ahead_unless_it_has_a_budget(
    moto_url: str, tmp_path: Path
) -> None:
    """From s3:// the forward would wait a round trip per tensor: `load_model` reads ahead there by
    default (and the forward is still bit-identical); under a budget it does not (it would evict)."""
    import torch

    from .helpers import write_llama

    (tmp_path / "llama").mkdir()
    model_dir = write_llama(
        tmp_path / "llama",
        vocab_size=500,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    Repository.init(moto_url, chunk_size=65536).close()
    with Repository.open(moto_url) as repo:
        pack(repo, [model_dir])
    import transformers

    eager = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = torch.tensor([[1, 5, 17, 42]])
    with runtime.closing(runtime.load_model(moto_url)) as model:
        assert model.blockstore._readahead is not None
        with torch.no_grad():
            assert torch.equal(model(prompt).logits, eager(prompt).logits)
    with runtime.closing(runtime.load_model(moto_url, budget="1MB")) as model:
        assert model.blockstore._readahead is None


def test_requests_are_counted_through_the_read_through_cache(moto_url: str, tmp_path: Path) -> None:
    """Benchmarks report a load's GETs from `request_counts`: with a cache in front of the remote
    they must still be the remote's (they read as none when the cache hid them)."""
    with Repository.init(moto_url) as repo:
        pack(repo, [write_safetensors(tmp_path / "m.safetensors", {"w": float_tensor((64, 64), seed=1)})])
    with Repository.open_for_reading(moto_url, cache=tmp_path / "cache") as cached:
        snapshot = cached.snapshot(cached.resolve("main"))
        before = cached.request_counts()["GET"]
        for chunk in snapshot.tensors["w"].chunks:
            cached.read_chunk(chunk)
        assert cached.request_counts()["GET"] > before

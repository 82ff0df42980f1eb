"""Crash safety: pack, apply, rollback and gc killed at every crash point and at random moments.

After every death the store opens, every ref resolves to a readable snapshot holding either the old or
the new model, a deep verify is clean (orphan chunks allowed), and running the operation again
succeeds. `pytest -m faults` runs the 50-kills-per-operation campaign; CI runs a few kills each.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from blockstore.repo import Repository
from blockstore.storage.faults import CRASH_EXIT_CODE

from .faults import (
    Operation,
    Tally,
    check_survivor,
    content_at,
    kill_at,
    rerun_succeeds,
    run_to_crash_point,
    timed_run,
    write_fine_tune,
    write_version,
)
from .helpers import cli

CHUNK_SIZE = 4096
KILLS_IN_CI = 4
KILLS_IN_CAMPAIGN = 50


def _packed(directory: Path, *versions: Path) -> Path:
    store = directory / "store"
    assert cli("init", store, "--chunk-size", CHUNK_SIZE).exit_code == 0
    for version in versions:
        assert cli("pack", version, "--store", store).exit_code == 0
    return store


@pytest.fixture(scope="module")
def operations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Operation]:
    """Each operation with a template store to copy before every run (the template is never run on)."""
    models = tmp_path_factory.mktemp("models")
    v1 = write_version(models / "v1.safetensors", changed_seed=1)
    v2 = write_version(models / "v2.safetensors", changed_seed=2)
    only_v1 = _packed(tmp_path_factory.mktemp("v1"), v1)
    both = _packed(tmp_path_factory.mktemp("both"), v1, v2)
    v1_id = _first_id(both)
    bundle = models / "update.bsp"
    assert cli("diff", both, v1_id, "main", "-o", bundle).exit_code == 0
    old, new = content_at(only_v1), content_at(both)
    # The same with a fine-tune of v1 whose changed chunks are stored and shipped as deltas.
    tuned = write_fine_tune(models / "tuned.safetensors")
    with_tuned = _packed(tmp_path_factory.mktemp("tuned"), v1, tuned)
    assert cli("show", with_tuned, "--json").json()["deltas"]["delta_chunks"] > 0
    delta_bundle = models / "tuned.bsp"
    assert cli("diff", with_tuned, _first_id(with_tuned), "main", "-o", delta_bundle).exit_code == 0
    tuned_content = content_at(with_tuned)
    return {
        "pack": Operation("pack", only_v1, ["pack", str(v2), "--store", "STORE"], old, new),
        "apply": Operation("apply", only_v1, ["apply", "STORE", str(bundle)], old, new),
        "rollback": Operation("rollback", both, ["rollback", "STORE", "--to", v1_id], new, old),
        "gc": Operation("gc", both, ["gc", "STORE", "--keep", "0"], new, new),
        "pack-delta": Operation(
            "pack-delta", only_v1, ["pack", str(tuned), "--store", "STORE"], old, tuned_content
        ),
        "apply-delta": Operation(
            "apply-delta", only_v1, ["apply", "STORE", str(delta_bundle)], old, tuned_content
        ),
        "gc-delta": Operation(
            "gc-delta", with_tuned, ["gc", "STORE", "--keep", "0"], tuned_content, tuned_content
        ),
    }


def _first_id(store: Path) -> str:
    with Repository.open(store) as repo:
        return repo.store.reflog("main")[0].new.hex()


# Every write transaction an operation makes, at both of its crash points (see blockstore.storage.faults).
WRITER_STEPS = ("lease", "chunks", "snapshot", "ref", "unlease")
CRASH_CASES = [
    *(
        (op, f"{step}.{when}")
        for op in ("pack", "apply", "pack-delta", "apply-delta")
        for step in WRITER_STEPS
        for when in ("before-commit", "committed")
    ),
    ("rollback", "ref.before-commit"),
    ("rollback", "ref.committed"),
    ("gc", "gc.before-commit"),
    ("gc", "gc.committed"),
    ("gc-delta", "gc.before-commit"),
    ("gc-delta", "gc.committed"),
]


@pytest.mark.parametrize(("op", "point"), CRASH_CASES, ids=[f"{op}@{point}" for op, point in CRASH_CASES])
def test_death_at_a_crash_point(
    operations: dict[str, Operation], tmp_path: Path, op: str, point: str
) -> None:
    operation = operations[op]
    store = operation.fresh_store(tmp_path)
    died = run_to_crash_point(operation, store, point)
    assert died.returncode == CRASH_EXIT_CODE, f"{op} never passed {point}: {died.stderr.decode()}"
    tally = Tally()
    check_survivor(store, operation, tally)
    if (op, point) in (("pack", "chunks.committed"), ("apply", "chunks.committed")):
        assert tally.orphan_chunks_seen > 0, "died after its chunks were written, yet none are left"
    committed_the_ref = point.startswith(("ref.committed", "unlease"))
    expected = operation.after if committed_the_ref else operation.before
    assert content_at(store) == expected, "a ref moved before its commit, or not after it"
    rerun_succeeds(store, operation)


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(KILLS_IN_CI, marks=pytest.mark.slow),
        pytest.param(KILLS_IN_CAMPAIGN, marks=pytest.mark.faults),
    ],
)
@pytest.mark.parametrize("op", ["pack", "apply", "rollback", "gc", "pack-delta", "apply-delta", "gc-delta"])
def test_random_sigkills(operations: dict[str, Operation], tmp_path: Path, op: str, kills: int) -> None:
    """SIGKILL at a uniformly random moment between the end of interpreter start-up and the end of
    an undisturbed run (both measured here), `kills` times."""
    operation = operations[op]
    startup = timed_run(operation, operation.fresh_store(tmp_path), ["--help"])
    duration = timed_run(operation, operation.fresh_store(tmp_path))
    rng = random.Random(f"{op}-{kills}")
    tally = Tally()
    for _ in range(kills):
        store = operation.fresh_store(tmp_path)
        if kill_at(operation, store, rng.uniform(0.9 * startup, 1.05 * duration)):
            tally.kills += 1
        else:
            tally.finished_before_kill += 1
        check_survivor(store, operation, tally)
        rerun_succeeds(store, operation)
    print(
        f"\n{op}: {tally.kills} kills survived ({tally.finished_before_kill} runs finished first); "
        f"main left as before {tally.left_before}, as after {tally.left_after}; "
        f"{tally.orphan_chunks_seen} orphan chunks seen; "
        f"{tally.stale_readers_cleared} stale readers cleared; "
        f"run {duration:.2f} s (start-up {startup:.2f} s)"
    )
    assert tally.kills > 0, "every kill came too late to interrupt anything"

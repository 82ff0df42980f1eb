"""Reads through a store that flips bits, loses keys and returns short values: the runtime and
`verify --deep` name the exact tensor and chunk, and never hand back a wrong tensor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstore.core.policy import Policy
from blockstore.errors import TensorCorrupt
from blockstore.ops.pack import pack
from blockstore.ops.verify import verify
from blockstore.repo import Repository
from blockstore.runtime.lazy import LazyStateDict
from blockstore.storage.lmdb import LmdbStore
from blockstore.testing.store import StoreSuite

from .faults import float_tensor
from .faulty_store import FAULT_KINDS, MISSING, Fault, FaultyStore
from .helpers import FUZZ_EXAMPLES, RawTensor, random_tensor, write_safetensors


class TestFaultyStoreWithoutFaults(StoreSuite):
    """With no faults, the fault-injecting wrapper is exactly the store it wraps."""

    @pytest.fixture
    def store(self, tmp_path):
        with FaultyStore(LmdbStore.create(tmp_path / "store")) as opened:
            yield opened


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory):
    """A store holding lossless tensors of several dtypes and an int8 static tensor; no chunk is
    shared, so every chunk belongs to exactly one tensor. Returns (store, snapshot id, originals)."""
    directory = tmp_path_factory.mktemp("faulty")
    tensors: dict[str, RawTensor] = {
        "embed.weight": float_tensor((256, 64), seed=1, dtype="BF16"),
        "layers.0.mlp.weight": float_tensor((128, 64), seed=2),
        "layers.0.norm.weight": float_tensor((64,), seed=3),
        "ids": random_tensor("I64", (300,), seed=4),
        "mask": random_tensor("BOOL", (7, 9), seed=5),
    }
    model = write_safetensors(directory / "model.safetensors", tensors)
    store = directory / "store"
    policy = Policy().with_overrides(static=["layers.*.mlp.weight"], static_tier="int8")
    with Repository.init(store) as repo:
        result = pack(repo, [model], chunk_size=2048, policy=policy)
        snapshot = repo.snapshot(result.snapshot_id)
    keys = [chunk.key for entry in snapshot.tensors.values() for chunk in entry.chunks]
    assert len(keys) == len(set(keys)) > 10
    with Repository.open(store) as repo, LazyStateDict(repo, result.snapshot_id, snapshot) as state:
        expected = {name: state[name].materialize().clone() for name in state}
    return store, result.snapshot_id, expected


def _owner(snapshot, key) -> tuple[str, int]:
    for entry in snapshot.tensors.values():
        for index, chunk in enumerate(entry.chunks):
            if chunk.key == key:
                return entry.name, index
    raise AssertionError(key)


@settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), kind=st.sampled_from(FAULT_KINDS), at=st.integers(0, 1 << 20))
def test_damaged_reads_are_named_never_wrong(packed, data: st.DataObject, kind: str, at: int) -> None:
    store_path, snapshot_id, expected = packed
    inner = LmdbStore(store_path)
    repo = Repository(FaultyStore(inner))
    snapshot = repo.snapshot(snapshot_id)
    key = data.draw(st.sampled_from(sorted(snapshot.chunk_keys())))
    repo.store.faults[key] = Fault(kind, at)
    damaged_tensor, index = _owner(snapshot, key)

    report = verify(repo, deep=True)
    state = LazyStateDict(repo, snapshot_id, snapshot)
    try:
        for name in state:
            try:
                tensor = state[name].materialize()
            except TensorCorrupt as exc:
                assert name == damaged_tensor and key.hex() in str(exc), str(exc)
                assert report.damages, "the runtime saw damage that verify --deep missed"
                continue
            # Read back without complaint: then it is the right tensor, byte for byte.
            assert torch.equal(tensor.view(torch.uint8), expected[name].view(torch.uint8)), name
    finally:
        state.close()
    if kind == MISSING:
        assert not report.clean
    if report.damages:
        [damage] = report.damages
        assert (damage.tensor, damage.chunk) == (damaged_tensor, key.hex())
        assert f"chunk {index + 1} of" in damage.detail

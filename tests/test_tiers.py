"""Lossy tiers (int8, int4, fp8) on the real MiniLM weights: bounded error, exact dynamic side."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest
import torch
import transformers
import zstandard
from safetensors.torch import load_file, save_file

from blockstore import runtime
from blockstore.codecs import lossy_codec
from blockstore.core.policy import LOSSY_DTYPES, Policy
from blockstore.errors import InvalidArgument
from blockstore.ops.export import export
from blockstore.ops.pack import pack
from blockstore.ops.verify import verify
from blockstore.repo import Repository

from .helpers import ALL_DTYPES, RawTensor, random_tensor, write_safetensors
from .test_roundtrip import shape_for

# Documented bounds (README, "Precision tiers"): per element |error| <= block absmax / (2 * qmax)
# for the integer tiers; relative Frobenius error on MiniLM's fp32 weights below these.
QMAX = {"int8": 127, "int4": 7}
REL_BOUND = {"int8": 0.01, "fp8": 0.04, "int4": 0.15}
SENTENCES = ["blockstore keeps weights in chunks", "The cat sat on the mat.", "hello world"]


@pytest.fixture(scope="module", params=["int8", "fp8", "int4"])
def tier_store(request, minilm_path: Path, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp(request.param) / "store"
    with Repository.init(store) as repo:
        pack(repo, [minilm_path], policy=Policy(static_tier=request.param))
    return request.param, store


@pytest.fixture(scope="module")
def original(minilm_path: Path) -> dict[str, torch.Tensor]:
    return load_file(minilm_path)


def test_every_static_tensor_within_its_bound_and_dynamic_exact(tier_store, original) -> None:
    tier, store = tier_store
    with runtime.open(store) as state:
        lossy = [name for name in state if state[name].entry.tier == tier]
        assert {state[name].side for name in lossy} == {"static"} and len(lossy) == 15
        for name in state:
            tensor, reference = state[name].materialize(), original[name]
            assert (tensor.dtype, tensor.shape) == (reference.dtype, reference.shape), name
            if name not in lossy:
                assert torch.equal(tensor, reference), name  # dynamic side: bit-exact
                assert state[name].entry.error is None
                continue
            difference = (tensor.double() - reference.double()).abs()
            recorded = state[name].entry.error
            assert recorded.max_abs == pytest.approx(float(difference.max()), rel=1e-6)
            rel = float(difference.norm() / reference.double().norm())
            assert recorded.rel_frobenius == pytest.approx(rel, rel=1e-6)
            assert rel < REL_BOUND[tier], (name, rel)
            if tier in QMAX:
                assert float(difference.max()) <= float(reference.abs().max()) / (2 * QMAX[tier]) * 1.0001


def test_lossy_store_verifies_exports_and_dedups(tier_store, tmp_path: Path, minilm_path: Path) -> None:
    tier, store = tier_store
    with Repository.open(store) as repo:
        assert verify(repo, deep=True).clean
        exported = export(repo, repo.resolve("main"), tmp_path / "out.safetensors").paths[0]
        again = pack(repo, [minilm_path], policy=Policy(static_tier=tier))
    assert again.unchanged and again.new_chunks == 0
    reloaded, reference = load_file(exported), load_file(minilm_path)
    assert {k: (v.dtype, v.shape) for k, v in reloaded.items()} == {
        k: (v.dtype, v.shape) for k, v in reference.items()
    }
    assert exported.stat().st_size == minilm_path.stat().st_size


def test_ratios_shrink_with_the_tier(tier_store) -> None:
    tier, store = tier_store
    with Repository.open(store) as repo:
        snapshot = repo.snapshot(repo.resolve("main"))
    static = [e for e in snapshot.tensors.values() if e.tier == tier]
    ratio = sum(e.stored_bytes for e in static) / sum(e.nbytes for e in static)
    assert ratio < {"int8": 0.27, "fp8": 0.27, "int4": 0.16}[tier]


def mean_pooled(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_static_int8_keeps_sentence_embeddings(tier_store, minilm_path: Path) -> None:
    tier, store = tier_store
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path.parent)
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    eager = transformers.AutoModel.from_pretrained(minilm_path.parent).eval()
    lazy = runtime.load_model(store)
    try:
        cosine = torch.nn.functional.cosine_similarity(mean_pooled(lazy, inputs), mean_pooled(eager, inputs))
    finally:
        lazy.blockstore.close()
    assert float(cosine.min()) >= {"int8": 0.99, "fp8": 0.99, "int4": 0.9}[tier], cosine


def finite(dtype: str, shape: tuple[int, ...]) -> RawTensor:
    """Normal random floats (random bytes would hold NaNs, which a lossy tier refuses)."""
    values = torch.randn(shape).to(
        {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    )
    return RawTensor(dtype, shape, values.view(torch.uint8).numpy().tobytes())


def test_only_float_dtypes_go_lossy_and_the_rest_stays_byte_identical(tmp_path: Path, repo) -> None:
    tensors = {f"t_{dtype}": random_tensor(dtype, shape_for(dtype, 4096)) for dtype in ALL_DTYPES}
    tensors.update({f"t_{dtype}": finite(dtype, (4096, 3)) for dtype in LOSSY_DTYPES})
    source = write_safetensors(tmp_path / "all.safetensors", tensors)
    result = pack(repo, [source], policy=Policy(static_tier="int8").with_overrides(static=["*"]))
    tiers = {name: decision.tier for name, decision in result.decisions.items()}
    assert {name for name, tier in tiers.items() if tier == "int8"} == {f"t_{d}" for d in LOSSY_DTYPES}
    snapshot = repo.snapshot(result.snapshot_id)
    for name, raw in tensors.items():
        if tiers[name] == "lossless":
            assert b"".join(repo.tensor_chunks(result.snapshot_id, snapshot.tensors[name])) == raw.data


def test_non_finite_weights_are_refused_by_name(tmp_path: Path, repo) -> None:
    values = torch.ones(256, 256)
    values[3, 4] = math.inf
    source = tmp_path / "inf.safetensors"
    save_file({"mlp.weight": values}, source)
    with pytest.raises(InvalidArgument, match=r"'mlp\.weight'.*inf or nan"):
        pack(repo, [source], policy=Policy(static_tier="int8"))


@pytest.mark.parametrize("tier", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_decoding_is_one_float32_product_per_element_rounded_once(tier: str, dtype: str) -> None:
    """Pinned against the formula, not the code: stored chunks are keyed by their decoded bytes, so
    any change to the arithmetic would make every lossy chunk packed before it fail its check."""
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    codec = lossy_codec(tier, dtype, block_size=64)
    values = (torch.randn(64 * 40 + 23, generator=torch.Generator().manual_seed(7)) * 3).to(torch_dtype)
    payload, _ = codec.quantize(memoryview(values.view(torch.uint8).numpy()))
    scale_frame, value_frame = msgpack.unpackb(payload)
    scales = torch.frombuffer(
        bytearray(zstandard.ZstdDecompressor().decompress(scale_frame)), dtype=torch.float32
    )
    stored = torch.frombuffer(
        bytearray(zstandard.ZstdDecompressor().decompress(value_frame)), dtype=torch.uint8
    )
    if tier == "int8":
        exact = stored.view(torch.int8).float()
    elif tier == "int4":
        exact = torch.stack([stored & 0x0F, stored >> 4], dim=1).reshape(-1).float() - 8
    else:
        exact = stored.view(torch.float8_e4m3fn).float()
    expected = (exact.view(-1, 64) * scales[:, None]).reshape(-1)[: values.numel()].to(torch_dtype)
    out = bytearray(values.numel() * values.element_size())
    codec.decode_into(payload, memoryview(out))
    assert bytes(out) == expected.view(torch.uint8).numpy().tobytes()

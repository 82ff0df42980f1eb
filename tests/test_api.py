"""The public front: `import blockstore` alone packs, exports, verifies, patches and loads."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import blockstore
from blockstore.core.policy import Policy
from blockstore.errors import RefNotFound
from blockstore.repo import MIN_ID_PREFIX

from .helpers import random_tensor, write_safetensors


def test_every_front_name_resolves_and_documents_itself() -> None:
    assert set(blockstore.__all__) <= set(dir(blockstore))
    for name in blockstore.__all__:
        value = getattr(blockstore, name)
        if name != "__version__":
            assert inspect.getdoc(value), f"blockstore.{name} has no docstring"
    for name in ["open", "load_model", "close", "closing"]:
        assert inspect.getdoc(getattr(blockstore.runtime, name)), f"blockstore.runtime.{name}"
    assert issubclass(RefNotFound, blockstore.BlockstoreError)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = blockstore.nothing_here


def _model_file(path: Path, seed: int) -> Path:
    tensors = {
        "embed.weight": random_tensor("F32", (256, 32), seed),
        "norm.weight": random_tensor("F32", (32,)),
    }
    return write_safetensors(path, tensors)


def _float_model(directory: Path) -> Path:
    """A small decoder-shaped checkpoint of real floats (random bytes would hold NaNs, which a
    lossy tier refuses) with a config.json beside it."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(512, 64, generator=generator),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=generator).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=generator),
        "model.norm.weight": torch.ones(64),
    }
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return directory


def test_pack_export_verify_take_str_and_path_locations(tmp_path: Path) -> None:
    source = _model_file(tmp_path / "model.safetensors", seed=1)
    with blockstore.init(str(tmp_path / "store"), chunk_size="16KiB") as repo:
        assert repo.chunk_size == 16 << 10
        packed = blockstore.pack(repo, str(source), message="first")
    out = tmp_path / "out.safetensors"
    exported = blockstore.export(tmp_path / "store", packed.snapshot_id, str(out))  # id as bytes
    assert out.read_bytes() == source.read_bytes() and exported.paths == (out,)
    short = packed.snapshot_id.hex()[:MIN_ID_PREFIX]
    blockstore.export(str(tmp_path / "store"), short, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == source.read_bytes()
    report = blockstore.verify(tmp_path / "store", deep=True)
    assert report.clean and report.tensors == 2 and report.deep
    with blockstore.open(tmp_path / "store", readonly=True) as repo:
        assert repo.refs() == {"main": packed.snapshot_id}
        assert blockstore.verify(repo, "main").clean  # an open Repository is used, not reopened


def test_diff_apply_rollback_through_the_front(tmp_path: Path) -> None:
    v1, v2 = _model_file(tmp_path / "v1.safetensors", 1), _model_file(tmp_path / "v2.safetensors", 2)
    with blockstore.init(tmp_path / "origin") as origin:
        first = blockstore.pack(origin, [v1]).snapshot_id
        origin.tag("v1")
        second = blockstore.pack(origin, [v2]).snapshot_id
        changes = blockstore.diff(origin, "v1", "main", tmp_path / "update.bsp")
    assert changes.base == first and changes.target == second
    with blockstore.init(tmp_path / "edge") as edge:
        edge_first = blockstore.pack(edge, [v1]).snapshot_id  # same content as `first`, its own id
    applied = blockstore.apply(tmp_path / "edge", str(tmp_path / "update.bsp"))
    assert applied.new == second
    assert blockstore.rollback(str(tmp_path / "edge")).new == edge_first
    with blockstore.open(tmp_path / "edge") as edge:
        assert edge.resolve("main") == edge_first


def test_an_id_prefix_too_short_to_be_one_says_so(tmp_path: Path) -> None:
    source = _model_file(tmp_path / "model.safetensors", seed=1)
    with blockstore.init(tmp_path / "store") as repo:
        snapshot_id = blockstore.pack(repo, source).snapshot_id
        short = snapshot_id.hex()[: MIN_ID_PREFIX - 1]
        with pytest.raises(RefNotFound) as caught:
            repo.resolve(short)
        message = str(caught.value)
        assert f"ref {short!r} does not exist" in message
        assert f"snapshot id prefixes need at least {MIN_ID_PREFIX} hex digits" in message
        for not_a_prefix in ["v9", "release"]:  # not hex: plainly a ref name, no hint
            with pytest.raises(RefNotFound) as caught:
                repo.resolve(not_a_prefix)
            assert "hex digits" not in str(caught.value)
        assert repo.resolve(snapshot_id.hex()[:MIN_ID_PREFIX]) == snapshot_id


FRESH_INTERPRETER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import blockstore
    import blockstore.runtime
    import torch
    from safetensors.torch import load_file

    store, out = sys.argv[1], Path(sys.argv[2])
    exported = blockstore.export(store, "main", out)
    written = load_file(out / "model.safetensors")
    report = blockstore.verify(store, deep=True)
    with blockstore.runtime.open(store) as state:
        loaded = state.load_all()
    equal = sorted(loaded) == sorted(written) and all(torch.equal(loaded[n], written[n]) for n in loaded)
    print(json.dumps({
        "clean": report.clean,
        "damages": [damage.line() for damage in report.damages],
        "deep_bytes": report.bytes_checked,
        "tensors": len(loaded),
        "files": sorted(path.name for path in exported.paths),
        "equal": equal,
        "pack_imported": "blockstore.ops.pack" in sys.modules,
    }))
    """
)


def test_a_fresh_interpreter_with_only_the_front_reads_an_int8_store(tmp_path: Path) -> None:
    """The codecs register themselves: nothing but `import blockstore` (no pack, no policy import
    by the caller) is needed to export, deep-verify and lazily load a store with lossy chunks."""
    model_dir = _float_model(tmp_path / "model")
    with blockstore.init(tmp_path / "store", chunk_size="64KiB") as repo:
        result = blockstore.pack(repo, model_dir, policy=Policy(static_tier="int8"))
    lossy = [name for name, decision in result.decisions.items() if decision.tier == "int8"]
    assert "model.embed_tokens.weight" in lossy
    (tmp_path / "out").mkdir()  # a directory: the model's config.json is exported beside its weights
    run = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER, str(tmp_path / "store"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["clean"], seen["damages"]
    assert seen["deep_bytes"] >= result.groups["static/int8"].raw_bytes  # the lossy chunks were decoded
    assert seen["files"] == ["config.json", "model.safetensors"]
    assert seen["tensors"] == result.tensors and seen["equal"]
    assert not seen["pack_imported"]  # what registered the lossy codecs was not pack

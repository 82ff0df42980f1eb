"""A lazy reader's pin against gc ends with it: on close, as a context manager, when collected, and
when the process exits; and `load_model` builds the model the stored tensors imply."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import blockstore
from blockstore import runtime
from blockstore.errors import InvalidArgument
from blockstore.ops.doctor import doctor
from blockstore.repo import Repository

from .helpers import write_llama

SMALL_LLAMA = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
PROMPT = torch.tensor([[1, 5, 17, 200, 42]])


def leases(store: Path) -> list[str]:
    with Repository.open(store) as repo:
        return [lease.role for lease in doctor(repo).leases]


def without_architectures(directory: Path) -> Path:
    """The checkpoint's config.json as SmolLM2 ships it: no `architectures` key."""
    config = json.loads((directory / "config.json").read_text())
    config.pop("architectures", None)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def packed(directory: Path, store: Path) -> Path:
    with blockstore.init(store, chunk_size="64KiB") as repo:
        blockstore.pack(repo, directory)
    return store


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SmolLM2-style checkpoint: tied embeddings (no lm_head.weight stored), no architectures."""
    return without_architectures(
        write_llama(tmp_path_factory.mktemp("smollm"), **SMALL_LLAMA, tie_word_embeddings=True)
    )


@pytest.fixture(scope="module")
def smollm_store(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return packed(smollm_dir, tmp_path_factory.mktemp("smollm-store") / "store")


# leases -------------------------------------------------------------------------------------------


def test_close_and_context_managers_release_the_pin(smollm_store: Path) -> None:
    with runtime.open(smollm_store) as state:
        assert len(leases(smollm_store)) == 1 and not state.closed
    assert state.closed and leases(smollm_store) == []

    model = runtime.load_model(smollm_store)
    assert len(leases(smollm_store)) == 1
    runtime.close(model)
    runtime.close(model)  # twice is harmless
    assert leases(smollm_store) == []

    with runtime.closing(runtime.load_model(smollm_store)) as model:
        assert len(leases(smollm_store)) == 1
        with torch.no_grad():
            model(PROMPT)
    assert leases(smollm_store) == []
    with pytest.raises(InvalidArgument, match=r"not loaded by blockstore\.runtime"):
        runtime.close(torch.nn.Linear(2, 2))


def test_a_reader_nobody_closed_releases_its_pin_when_collected(smollm_store: Path) -> None:
    model = runtime.load_model(smollm_store)
    state = runtime.open(smollm_store)
    assert len(leases(smollm_store)) == 2
    del model, state
    gc.collect()  # released on a thread of the runtime's (collection may run inside a store write)
    deadline = time.monotonic() + 30
    while leases(smollm_store) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leases(smollm_store) == []


FIVE_LOADS = textwrap.dedent(
    """
    import os, sys
    import blockstore
    from blockstore.ops.doctor import doctor

    store = sys.argv[1]
    models = [blockstore.runtime.load_model(store) for _ in range(5)]  # alive until exit, never closed
    child = os.fork()
    if child == 0:
        sys.exit(0)  # a normal exit, so exit handlers run in the child: they must leave the pins alone
    os.waitpid(child, 0)
    with blockstore.open(store) as repo:
        print(len(doctor(repo).leases))
    """
)


def test_five_loads_without_close_leave_no_lease_after_the_process_exits(smollm_store: Path) -> None:
    """Each load pins the snapshot while the process runs; a forked child's exit leaves the pins
    alone (they are the parent's); the parent's exit, with no close() anywhere, removes them all."""
    run = subprocess.run(
        [sys.executable, "-c", FIVE_LOADS, str(smollm_store)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["5"]
    assert run.stderr == ""
    assert leases(smollm_store) == []


# the model a config without architectures gets ------------------------------------------------


def test_tied_embeddings_without_architectures_give_the_causal_lm(smollm_store: Path, smollm_dir: Path):
    eager = transformers.LlamaForCausalLM.from_pretrained(smollm_dir).eval()
    with runtime.closing(runtime.load_model(smollm_store)) as model:
        assert type(model) is transformers.LlamaForCausalLM
        assert model.lm_head.weight is model.model.embed_tokens.weight
        with torch.no_grad():
            assert torch.equal(model(PROMPT).logits, eager(PROMPT).logits)
        reference = runtime.eager_model(model.blockstore.load_all(), config=smollm_dir / "config.json")
    assert type(reference) is transformers.LlamaForCausalLM  # drift checks build the same model


def test_a_stored_lm_head_without_architectures_gives_the_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "untied").mkdir()
    directory = without_architectures(
        write_llama(tmp_path / "untied", **SMALL_LLAMA, tie_word_embeddings=False)
    )
    eager = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    with runtime.closing(runtime.load_model(packed(directory, tmp_path / "store"))) as model:
        assert type(model) is transformers.LlamaForCausalLM
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        with torch.no_grad():
            assert torch.equal(model(PROMPT).logits, eager(PROMPT).logits)


def test_a_headless_checkpoint_gets_the_bare_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL_LLAMA, tie_word_embeddings=False)
    bare = transformers.LlamaModel(config).eval()
    directory = tmp_path / "bare"
    directory.mkdir()
    save_file(
        {name: tensor.contiguous() for name, tensor in bare.state_dict().items()},
        directory / "model.safetensors",
    )
    config.save_pretrained(directory)
    without_architectures(directory)
    with runtime.closing(runtime.load_model(packed(directory, tmp_path / "store"))) as model:
        assert type(model) is transformers.LlamaModel  # nothing stored for a head: none to lose
        with torch.no_grad():
            assert torch.equal(model(PROMPT).last_hidden_state, bare(PROMPT).last_hidden_state)


def test_a_stored_head_no_causal_lm_class_takes_is_refused_in_one_line(tmp_path: Path) -> None:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    weights = {
        name: tensor.contiguous() for name, tensor in transformers.BertModel(config).state_dict().items()
    }
    weights["lm_head.weight"] = torch.zeros(64, 16)
    directory = tmp_path / "bert"
    directory.mkdir()
    save_file(weights, directory / "model.safetensors")
    config.save_pretrained(directory)
    store = packed(without_architectures(directory), tmp_path / "store")
    with pytest.raises(InvalidArgument) as caught:
        runtime.load_model(store)
    message = str(caught.value)
    assert "names no architectures" in message and "'bert'" in message and "model=" in message
    assert "\n" not in message
    assert leases(store) == []  # the failed load released its pin

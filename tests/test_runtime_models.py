"""Lazily loaded torch/transformers models: bit-identical to eager ones, and provably lazy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from blockstore import runtime
from blockstore.errors import InvalidArgument
from blockstore.ops.pack import pack
from blockstore.repo import Repository

from .helpers import write_llama

SENTENCES = ["blockstore keeps weights in chunks", "The cat sat on the mat.", "hello world"]
PROMPT = torch.tensor([[1, 5, 17, 300, 42, 7]])


def packed_store(path: Path, inputs: list[Path], chunk_size: int | None = None) -> Path:
    with Repository.init(path, **({"chunk_size": chunk_size} if chunk_size else {})) as repo:
        pack(repo, inputs)
    return path


@pytest.fixture(scope="module")
def minilm_store(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM packed with its config.json (picked up beside the weights)."""
    return packed_store(tmp_path_factory.mktemp("minilm") / "store", [minilm_path])


@pytest.fixture(scope="module")
def minilm_inputs(minilm_path: Path) -> dict[str, torch.Tensor]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path.parent)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def test_minilm_outputs_are_bit_identical_to_eager_transformers(minilm_store, minilm_path, minilm_inputs):
    eager = transformers.AutoModel.from_pretrained(minilm_path.parent).eval()
    lazy = runtime.load_model(minilm_store)
    try:
        assert type(lazy) is type(eager)
        with torch.no_grad():
            expected = eager(**minilm_inputs).last_hidden_state
            for _ in range(2):  # first forward decodes, second runs on cached/resident weights
                assert torch.equal(lazy(**minilm_inputs).last_hidden_state, expected)
        assert lazy.blockstore_unused == ["embeddings.position_ids"]  # a non-persistent buffer now
    finally:
        lazy.blockstore.close()


def test_an_embedding_forward_decodes_far_less_than_the_table(minilm_store, minilm_inputs):
    lazy = runtime.load_model(minilm_store)
    try:
        table = lazy.blockstore["embeddings.word_embeddings.weight"]
        assert lazy.blockstore.stats().bytes_decoded == 0
        with torch.no_grad():
            lazy.embeddings(input_ids=minilm_inputs["input_ids"][2:, :4])  # [CLS] hello world [SEP]
        stats = lazy.blockstore.stats()
        assert 0 < stats.bytes_decoded < table.nbytes / 4
        assert not lazy.blockstore.is_materialized(table.name)
    finally:
        lazy.blockstore.close()


RSS_PROBE = """
import json, sys, psutil, torch, transformers.models.bert.modeling_bert
from blockstore import runtime
process = psutil.Process()
before = process.memory_info().rss
model = runtime.load_model(sys.argv[1])
after_open = process.memory_info().rss
model.blockstore["encoder.layer.0.intermediate.dense.weight"].materialize()
print(json.dumps({"open": after_open - before, "stats": model.blockstore.stats().as_dict()}))
"""


def test_opening_grows_rss_by_far_less_than_the_model(minilm_store, minilm_path):
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(minilm_store)], check=True, capture_output=True, text=True
    )
    measured = json.loads(probe.stdout)
    model_bytes = minilm_path.stat().st_size
    assert measured["open"] < model_bytes / 5, measured
    assert measured["stats"]["chunks_read"] == 1  # only the one tensor asked for


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style decoder with tied embeddings (its lm_head.weight is not in the file)."""
    return write_llama(
        tmp_path_factory.mktemp("llama"),
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def llama_eager_tokens(llama_dir: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def llama_store(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return packed_store(tmp_path_factory.mktemp("llama") / "store", [llama_dir], chunk_size=64 << 10)


@pytest.mark.parametrize("options", [{}, {"budget": "400KB", "prefetch": 1}])
def test_llama_generate_is_identical_lazily(llama_store, llama_eager_tokens, options):
    model = runtime.load_model(llama_store, **options)
    try:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, one stored tensor
        with torch.no_grad():
            tokens = model.generate(PROMPT, max_new_tokens=12, do_sample=False)
        assert torch.equal(tokens, llama_eager_tokens)
        stats = model.blockstore.stats()
        if "budget" in options:
            assert stats.evictions > 0 and stats.prefetched > 0
        else:
            assert stats.evictions == 0
    finally:
        model.blockstore.close()


class TinyNet(torch.nn.Module):
    """A plain torch module (no transformers) with a buffer."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, width)
        self.proj = torch.nn.Linear(width, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids)).sum(1) * self.scale


def test_plain_torch_module_class_and_bad_models_are_refused_by_name(tmp_path: Path):
    torch.manual_seed(1)
    eager = TinyNet().eval()
    eager.scale.fill_(2.0)
    save_file(eager.state_dict(), tmp_path / "tiny.safetensors")
    store = packed_store(tmp_path / "store", [tmp_path / "tiny.safetensors"])
    ids = torch.tensor([[1, 2, 49]])
    lazy = runtime.load_model(store, model=TinyNet)
    assert torch.equal(lazy(ids), eager(ids))
    lazy.blockstore.close()
    with pytest.raises(InvalidArgument, match="shape"):
        runtime.load_model(store, model=lambda: TinyNet(width=4))
    with pytest.raises(InvalidArgument, match=r"not in snapshot.*'extra\.weight'"):
        runtime.load_model(store, model=lambda: torch.nn.ModuleDict({"extra": torch.nn.Linear(2, 2)}))
    with pytest.raises(InvalidArgument, match=r"no config\.json"):
        runtime.load_model(store)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generate_is_identical_and_weights_live_on_the_gpu(llama_store, llama_dir):
    eager = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval().to("cuda")
    with torch.no_grad():
        expected = eager.generate(PROMPT.cuda(), max_new_tokens=12, do_sample=False)
    model = runtime.load_model(llama_store, device="cuda", budget="400KB")
    try:
        assert model.device.type == "cuda"
        with torch.no_grad():
            tokens = model.generate(PROMPT.cuda(), max_new_tokens=12, do_sample=False)
        assert torch.equal(tokens, expected)
        assert model.blockstore["model.norm.weight"].materialize().is_cuda
    finally:
        model.blockstore.close()


def test_bad_configs_are_one_line_errors_naming_their_origin(llama_store: Path, tmp_path: Path):
    (tmp_path / "broken.json").write_text("{not json")
    cases = [
        (tmp_path / "absent.json", "absent.json: No such file"),
        (tmp_path / "broken.json", "broken.json: not JSON"),
        ({"hidden_size": 8}, "config has no model_type"),
        ({"model_type": "no-such-architecture"}, "no-such-architecture"),
        (42, "config of type int"),
    ]
    for config, fragment in cases:
        with pytest.raises(InvalidArgument) as caught:
            runtime.load_model(llama_store, config=config)
        assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_readahead_reads_every_tensor_in_forward_order(llama_store, llama_eager_tokens):
    """With `readahead`, every stored tensor is read in the background, embeddings first and the
    final norm last, and the forward then finds them all decoded (no miss of its own)."""
    from blockstore.runtime.readahead import forward_order, groups_of

    model = runtime.load_model(llama_store, readahead=True)
    try:
        state = model.blockstore
        order = forward_order(state)
        assert sorted(order) == sorted(state) and order[0] == "model.embed_tokens.weight"
        assert order[-1] == "model.norm.weight"  # the head is tied to the embeddings
        first_layer = next(name for name in order if ".layers." in name)
        assert first_layer.startswith("model.layers.0.self_attn.")
        state.wait_for_prefetch()
        assert state.stats().prefetched == len(state)
        with torch.no_grad():
            assert torch.equal(model.generate(PROMPT, max_new_tokens=12, do_sample=False), llama_eager_tokens)
        assert state.stats().misses == 0
    finally:
        state.close()
    entries = [state[name].entry for name in order]
    groups = groups_of(entries, limit=200_000)
    assert [entry for group in groups for entry in group] == entries
    assert all(sum(e.nbytes for e in group) <= 200_000 or len(group) == 1 for group in groups)


def test_readahead_is_off_by_default_on_a_local_store(llama_store):
    model = runtime.load_model(llama_store)
    try:
        assert model.blockstore._readahead is None
    finally:
        model.blockstore.close()


def test_a_budgeted_model_returns_evicted_memory_to_the_kernel(llama_store, llama_eager_tokens, monkeypatch):
    """glibc keeps freed buffers for reuse; under a budget the cache asks for them back once
    enough was evicted, so the budget bounds what the process holds."""
    import blockstore.runtime.cache as cache_module

    trims = []
    monkeypatch.setattr(cache_module, "TRIM_BYTES", 100_000)
    monkeypatch.setattr(cache_module, "return_freed_memory", lambda: trims.append(1))
    with runtime.closing(runtime.load_model(llama_store, budget="400KB")) as model:
        with torch.no_grad():
            assert torch.equal(model.generate(PROMPT, max_new_tokens=12, do_sample=False), llama_eager_tokens)
        evicted = model.blockstore.stats().evictions
    assert evicted > 0 and len(trims) > 0
    if sys.platform == "linux":  # glibc here: the real trim was found
        assert cache_module._TRIM is not None


def test_room_is_made_before_a_static_tensor_is_decoded(llama_store, llama_eager_tokens):
    """The budget bounds the cached tensors and the one being decoded together: eviction made room
    only after the insertion, so a large tensor (the tied head) sat on top of a full budget."""
    budget = 700_000  # above the largest tensor (the 512 KB embedding), below the static side
    with runtime.closing(runtime.load_model(llama_store, budget=budget)) as model:
        with torch.no_grad():
            assert torch.equal(model.generate(PROMPT, max_new_tokens=12, do_sample=False), llama_eager_tokens)
        stats = model.blockstore.stats()
    assert stats.evictions > 0 and 0 < stats.peak_cached_bytes <= budget


def test_forward_order_from_names_alone():
    """safetensors sorts keys as text (layer 10 before layer 2, the head before the embeddings):
    the read-ahead order puts them as a forward meets them."""
    from blockstore.runtime.readahead import forward_order

    names = sorted(
        ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
        + [f"model.layers.{i}.{part}" for i in (0, 2, 10) for part in ("mlp.up.weight", "self_attn.q.weight")]
    )
    assert forward_order(names) == [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.{part}" for i in (0, 2, 10) for part in ("self_attn.q.weight", "mlp.up.weight")),
        "lm_head.weight",
        "model.norm.weight",
    ]

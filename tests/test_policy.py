"""Static/dynamic policy: defaults per architecture, overrides, policy files and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from blockstore.core.policy import DYNAMIC, STATIC, Policy, load_policy
from blockstore.errors import InvalidArgument

from .helpers import assert_one_line_error, cli

TORCH_TO_SAFETENSORS = {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}


def sides(model: torch.nn.Module, policy: Policy | None = None) -> dict[str, str]:
    policy = policy or Policy()
    return {
        name: policy.decide(name, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape)).side
        for name, t in model.state_dict().items()
    }


def tiny(config_cls, **values) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_cls(**values)
    return transformers.AutoModelForCausalLM.from_config(config)


LLAMA = dict(
    vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4
)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            lambda: tiny(transformers.LlamaConfig, **LLAMA),
            {
                "model.embed_tokens.weight": STATIC,
                "lm_head.weight": STATIC,
                "model.layers.0.mlp.gate_proj.weight": STATIC,
                "model.layers.0.mlp.down_proj.weight": STATIC,
                "model.layers.0.self_attn.q_proj.weight": DYNAMIC,
                "model.layers.0.self_attn.o_proj.weight": DYNAMIC,
                "model.layers.0.input_layernorm.weight": DYNAMIC,
                "model.norm.weight": DYNAMIC,
            },
        ),
        (
            lambda: tiny(
                transformers.GPT2Config, vocab_size=512, n_embd=128, n_layer=1, n_head=4, n_positions=256
            ),
            {
                "transformer.wte.weight": STATIC,
                "transformer.wpe.weight": STATIC,
                "transformer.h.0.mlp.c_fc.weight": STATIC,
                "transformer.h.0.mlp.c_proj.weight": STATIC,
                "transformer.h.0.attn.c_attn.weight": DYNAMIC,
                "transformer.h.0.attn.c_proj.weight": DYNAMIC,
                "transformer.h.0.ln_1.weight": DYNAMIC,
                "transformer.h.0.mlp.c_fc.bias": DYNAMIC,
            },
        ),
        (
            lambda: tiny(transformers.MixtralConfig, **LLAMA, num_local_experts=4, num_experts_per_tok=2),
            {
                "model.layers.0.mlp.experts.gate_up_proj": STATIC,
                "model.layers.0.mlp.experts.down_proj": STATIC,
                "model.layers.0.mlp.gate.weight": DYNAMIC,
                "model.layers.0.self_attn.k_proj.weight": DYNAMIC,
            },
        ),
    ],
    ids=["llama", "gpt2", "mixtral"],
)
def test_default_sides_per_architecture(model, expected: dict[str, str]) -> None:
    decided = sides(model())
    assert {name: decided[name] for name in expected} == expected


def test_default_sides_on_minilm(minilm_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(minilm_path, "pt") as handle:
        tensors = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118
        decided = {
            name: Policy().decide(name, t.get_dtype(), tuple(t.get_shape())).side
            for name, t in tensors.items()
        }
    static = sorted(name for name, side in decided.items() if side == STATIC)
    assert "embeddings.word_embeddings.weight" in static
    assert "encoder.layer.3.intermediate.dense.weight" in static
    assert "encoder.layer.3.output.dense.weight" in static
    assert decided["encoder.layer.3.attention.output.dense.weight"] == DYNAMIC
    assert decided["embeddings.position_ids"] == DYNAMIC
    assert all("LayerNorm" not in name and not name.endswith(".bias") for name in static)


def test_routers_stay_dynamic_even_when_large() -> None:
    policy = Policy()
    assert policy.decide("model.layers.0.block_sparse_moe.gate.weight", "F32", (64, 4096)).side == DYNAMIC
    assert policy.decide("model.layers.0.mlp.shared_expert_gate.weight", "F32", (64, 4096)).side == DYNAMIC
    assert policy.decide("model.layers.0.mlp.experts.3.gate_proj.weight", "F32", (4096, 64)).side == STATIC


def test_overrides_and_the_reason_they_give() -> None:
    policy = Policy().with_overrides(static=["*.self_attn.*"], dynamic=["lm_head.*"], static_tier="int8")
    attention = policy.decide("model.layers.0.self_attn.q_proj.weight", "BF16", (512, 512))
    assert (attention.side, attention.tier) == (STATIC, "int8")
    assert "--static" in attention.reason
    head = policy.decide("lm_head.weight", "BF16", (512, 512))
    assert (head.side, head.tier) == (DYNAMIC, "lossless")
    integer = policy.decide("model.embed_tokens.weight", "I64", (512, 512))
    assert integer.tier == "lossless"  # a lossy tier never applies to integers


def test_policy_file_rules_tiers_and_refusal(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[static]\ntier = "int8"\nblock_size = 32\n'
        '[[rule]]\nmatch = "*.mlp.down_proj.*"\ntier = "int4"\n'
        '[[rule]]\nmatch = "*.o_proj.*"\nside = "static"\ntier = "fp8"\n'
        "[drift]\nmin_cosine = 0.995\n"
    )
    policy = load_policy(path)
    assert policy.block_size == 32 and policy.drift_bounds("int8")["min_cosine"] == 0.995
    assert policy.decide("m.layers.0.mlp.down_proj.weight", "F32", (512, 512)).tier == "int4"
    assert policy.decide("m.layers.0.mlp.up_proj.weight", "F32", (512, 512)).tier == "int8"
    moved = policy.decide("m.layers.0.self_attn.o_proj.weight", "F32", (512, 512))
    assert (moved.side, moved.tier) == (STATIC, "fp8") and "policy.toml rule 2" in moved.reason

    path.write_text('[[rule]]\nmatch = "*.q_proj.*"\ntier = "int4"\n')
    with pytest.raises(InvalidArgument, match=r"'m\.self_attn\.q_proj\.weight' is dynamic.*int4"):
        load_policy(path).decide("m.self_attn.q_proj.weight", "F32", (512, 512))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[static\n", "not valid TOML"),
        ('[static]\ntier = "int3"\n', "tier 'int3' is not one of"),
        ('[dynamic]\ntier = "int8"\n', "dynamic side only allows tier 'lossless'"),
        ("[static]\nlevel = 3\n", "unknown key 'level'"),
        ('[[rule]]\nside = "static"\n', 'rule 1: needs match = "GLOB"'),
        ('[[rule]]\nmatch = "*"\nside = "both"\n', "side 'both'"),
        ("[static]\nblock_size = 3\n", "block size 3"),
        ("[drift]\nmin_cosin = 0.9\n", "unknown key 'min_cosin'"),
    ],
)
def test_invalid_policy_file_is_a_one_line_error(tmp_path: Path, store_path: Path, text: str, fragment: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    model = tmp_path / "absent.safetensors"
    result = cli("pack", "--store", store_path, "--policy", path, model)
    assert_one_line_error(result, "policy.toml", fragment, exit_code=2)


def test_lossy_tier_on_a_dynamic_tensor_is_refused_before_writing(tmp_path: Path, store_path: Path) -> None:
    from .helpers import random_tensor, write_safetensors

    model = write_safetensors(
        tmp_path / "m.safetensors", {"layers.0.self_attn.q_proj.weight": random_tensor("F32", (128, 256))}
    )
    policy = tmp_path / "p.toml"
    policy.write_text('[[rule]]\nmatch = "*q_proj*"\ntier = "int8"\n')
    result = cli("pack", "--store", store_path, "--policy", policy, model)
    assert_one_line_error(result, "q_proj", "dynamic", "int8", exit_code=2)
    assert cli("ls", store_path, "--json").json()["refs"] == {}

"""End-to-end drift of a packed model against its original weights: what `check-drift` gates on.

The packed model (loaded lazily) and the original (the same architecture with the reference
weights) run the same fixed inputs. Encoders are compared by the cosine similarity of mean-pooled
hidden states; decoders by top-1 agreement of next-token predictions, the largest logit difference
and, with a tokenizer, the perplexity of a small bundled text. The bounds are those of the
snapshot's loosest tier (`Policy.drift_bounds`): dynamic tensors are always lossless, so any drift
comes from the static side's tiers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from blockstore.core.policy import LOSSLESS, LOSSY_TIERS, Policy
from blockstore.core.source import discover
from blockstore.repo import DEFAULT_REF

from .modules import eager_model, load_model

PROMPTS = (
    "The capital of France is",
    "Model weights are loaded far more often than they are written.",
    "A cat sat on the mat and looked at the rain.",
    "Compression trades a little time for a lot of space.",
)
TEXT = (
    "The store splits a model into two sides. Big weight blocks are compressed and read only when "
    "they are used, while the small tensors on the compute path stay resident and exact. Updates "
    "ship as patches that can be applied and rolled back."
)
SEED = 1234


@dataclass
class DriftReport:
    """What `check_drift` measured, the bounds it applied and which of them were exceeded."""

    tier: str
    kind: str
    metrics: dict[str, float]
    bounds: dict[str, float]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def loosest_tier(tiers: set[str]) -> str:
    """The most aggressive tier present (int4 > fp8 > int8 > lossless): its bounds apply."""
    for tier in reversed(LOSSY_TIERS):
        if tier in tiers:
            return tier
    return LOSSLESS


def _inputs(model: Any, tokenizer: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The prompts (tokenized, or seeded token ids without a tokenizer) and the perplexity text."""
    if tokenizer is not None:
        prompts = dict(tokenizer(list(PROMPTS), padding=True, return_tensors="pt"))
        return prompts, tokenizer(TEXT, return_tensors="pt")["input_ids"]
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, model.config.vocab_size, (len(PROMPTS), 16), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None


def _perplexity(model: Any, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids).logits[:, :-1].double()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(loss))


def _cosine(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity as x.y / sqrt(x.x * y.y): exactly 1.0 for identical rows (sqrt of a
    correctly rounded square is exact), where torch's cosine_similarity normalizes first and can
    read 0.9999999999999999 for a bit-identical pair. An all-zero row reads 0, as torch's does
    (its 1e-8 floor on the norms), never nan, which no bound would catch."""
    dot = (ours * theirs).sum(-1)
    return dot / torch.sqrt((ours * ours).sum(-1) * (theirs * theirs).sum(-1)).clamp_min(1e-8)


def _measure(packed: Any, original: Any, prompts: dict[str, torch.Tensor], text: Any) -> tuple[str, dict]:
    with torch.no_grad():
        ours, theirs = packed(**prompts), original(**prompts)
        if hasattr(ours, "logits"):
            mask = prompts["attention_mask"].bool()
            agree = ours.logits.argmax(-1) == theirs.logits.argmax(-1)
            metrics = {
                "top1_agreement": float(agree[mask].float().mean()),
                "max_logit_diff": float((ours.logits - theirs.logits).abs().max()),
            }
            if text is not None:
                before, after = _perplexity(original, text), _perplexity(packed, text)
                metrics |= {"ppl_original": before, "ppl_packed": after, "ppl_increase": after / before - 1}
            return "decoder", metrics
        mask = prompts["attention_mask"].unsqueeze(-1).to(ours.last_hidden_state.dtype)
        pooled = [(out.last_hidden_state * mask).sum(1) / mask.sum(1) for out in (ours, theirs)]
        cosine = _cosine(pooled[0].double(), pooled[1].double())
        difference = (ours.last_hidden_state - theirs.last_hidden_state).abs().max()
        return "encoder", {"min_cosine": float(cosine.min()), "max_hidden_diff": float(difference)}


# bound name -> the metric it limits (min_* bounds are floors, max_* bounds ceilings)
_BOUNDED_METRIC = {
    "min_cosine": "min_cosine",
    "min_top1": "top1_agreement",
    "max_logit_diff": "max_logit_diff",
    "max_ppl_increase": "ppl_increase",
}


def check_drift(
    store: str | Path,
    ref: str = DEFAULT_REF,
    *,
    reference: Path,
    config: Any = None,
    tokenizer: str | Path | None = None,
    policy: Policy | None = None,
) -> DriftReport:
    """Run the packed model and the original on the same inputs and hold them to the bounds."""
    # Any, as for the helpers above: a transformers model, with `blockstore` set by load_model.
    packed: Any = load_model(store, ref, config=config)
    try:
        tensors: dict[str, torch.Tensor] = {}
        for source in discover([reference]).files:
            tensors |= load_file(source.path)
        original = eager_model(tensors, config=packed.config)
        text_tokenizer = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            text_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        prompts, text = _inputs(packed, text_tokenizer)
        kind, metrics = _measure(packed, original, prompts, text)
        tier = loosest_tier({entry.tier for entry in packed.blockstore.snapshot.tensors.values()})
    finally:
        packed.blockstore.close()
    bounds = (policy or Policy()).drift_bounds(tier)
    failures = []
    for bound, limit in bounds.items():
        value = metrics.get(_BOUNDED_METRIC[bound])
        floor = bound.startswith("min_")
        if value is not None and (value < limit if floor else value > limit):
            failures.append(f"{_BOUNDED_METRIC[bound]} {value:.6g} {'<' if floor else '>'} {limit:.10g}")
    return DriftReport(tier, kind, metrics, bounds, failures)

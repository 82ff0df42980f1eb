"""Static/dynamic classification of tensors (DESIGN.md §4).

Static: big, rarely-updated blocks (embeddings, lm_head, MLP and expert weights) that may be
materialized lazily and evicted. Dynamic: the latency- and accuracy-sensitive compute path
(attention, norms, biases, position buffers, integer and small tensors), kept resident and lossless.
"""

from __future__ import annotations

import math
import re

from .dtypes import INTEGER_DTYPES, nbytes_of

STATIC = "static"
DYNAMIC = "dynamic"
SMALL_TENSOR_BYTES = 64 << 10

_DYNAMIC_NAMES = re.compile(
    r"(norm|bias|attn|attention|self_attn|q_proj|k_proj|v_proj|o_proj|rotary|position_ids|inv_freq)", re.I
)
_STATIC_NAMES = re.compile(
    r"(embed|wte|wpe|lm_head|mlp|expert|ffn|feed_forward|intermediate|output\.dense)", re.I
)
_NAME_RULES = (
    (_DYNAMIC_NAMES, DYNAMIC, "attention/norm/bias/position"),
    (_STATIC_NAMES, STATIC, "embedding/MLP/expert"),
)


def default_side(name: str, dtype: str, shape: tuple[int, ...]) -> tuple[str, str]:
    """(side, reason) for a tensor under the default rules, first matching rule wins."""
    nbytes = nbytes_of(dtype, math.prod(shape)) or 0
    if dtype in INTEGER_DTYPES:
        return DYNAMIC, f"integer dtype {dtype}"
    if nbytes < SMALL_TENSOR_BYTES:
        return DYNAMIC, f"smaller than {SMALL_TENSOR_BYTES >> 10} KiB"
    for pattern, side, kind in _NAME_RULES:
        match = pattern.search(name)
        if match:
            return side, f"name matches {match.group(0)!r} ({kind})"
    return STATIC, "large weight with no dynamic-path name"

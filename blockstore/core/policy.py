"""Static/dynamic classification of tensors and the precision tier each gets (docs/design.md §5).

Static: big, rarely-updated blocks (embeddings, lm_head, MLP and expert weights) that may be
materialized lazily, evicted, and stored at a lossy tier. Dynamic: the latency- and
accuracy-sensitive compute path (attention, norms, biases, routers, position buffers, integer and
small tensors), kept resident and always lossless.

Defaults come from names (Llama/Mistral/Qwen, GPT-2, BERT, MoE layouts) and sizes; a policy (a TOML
file and/or `--static` / `--dynamic` globs) overrides them. Every decision carries its reason, so
`pack --explain` can say why a tensor landed where it did.
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockstore.codecs import DEFAULT_BLOCK_SIZE, LOSSLESS, LOSSY_SOURCE_DTYPES, lossy_codec
from blockstore.core.dtypes import INTEGER_DTYPES, nbytes_of
from blockstore.core.source import read_regular_file
from blockstore.errors import InvalidArgument

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

STATIC = "static"
DYNAMIC = "dynamic"
SIDES = (STATIC, DYNAMIC)
LOSSY_TIERS = ("int8", "fp8", "int4")
"""The lossy codecs' tiers (`blockstore.codecs.lossy_ids()`), loosest last."""
TIERS = (LOSSLESS, *LOSSY_TIERS)
LOSSY_DTYPES = frozenset(LOSSY_SOURCE_DTYPES)
SMALL_TENSOR_BYTES = 64 << 10
MAX_POLICY_BYTES = 1 << 20
"""A policy is a few dozen lines; the cap keeps a hostile file from costing minutes and gigabytes."""
MAX_RULES = 1000
"""Every rule is tried against every tensor, so their number multiplies pack's classification work."""
MAX_GLOB_CHARS = 1000
MAX_GLOB_WILDCARDS = 64
"""Bounds on one glob: tensor names are a few hundred characters at most, so a longer pattern
matches nothing useful, and compiling a glob costs time and memory in proportion to its length."""
DRIFT_BOUNDS = ("min_cosine", "min_top1", "max_logit_diff", "max_ppl_increase")
# Default end-to-end bounds by the loosest tier in a snapshot: mean-pooled cosine similarity of
# hidden states, top-1 agreement of next-token predictions, relative perplexity increase.
DEFAULT_DRIFT: dict[str, dict[str, float]] = {
    LOSSLESS: {"min_cosine": 0.99999, "min_top1": 1.0, "max_ppl_increase": 0.001},
    "int8": {"min_cosine": 0.99, "min_top1": 0.95, "max_ppl_increase": 0.02},
    "fp8": {"min_cosine": 0.98, "min_top1": 0.9, "max_ppl_increase": 0.05},
    "int4": {"min_cosine": 0.9, "min_top1": 0.7, "max_ppl_increase": 0.3},
}

_DYNAMIC_NAMES = re.compile(
    r"(norm|bias|attn|attention|self_attn|q_proj|k_proj|v_proj|o_proj|rotary|position_ids|inv_freq"
    r"|router|shared_expert_gate|\.gate\.weight$)",
    re.I,
)
_STATIC_NAMES = re.compile(
    r"(embed|wte|wpe|lm_head|mlp|expert|ffn|feed_forward|intermediate|output\.dense|c_fc)", re.I
)
_NAME_RULES = (
    (_DYNAMIC_NAMES, DYNAMIC, "attention/norm/bias/router/position"),
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


@dataclass(frozen=True)
class Rule:
    """An override: tensors matching `pattern` (a glob) go to `side` and/or get `tier`.

    The glob is bounded and compiled once, here: fnmatch's translation puts each `*` in an atomic
    group, so matching is linear in the name and a pattern cannot backtrack exponentially."""

    pattern: str
    side: str | None = None
    tier: str | None = None
    origin: str = "policy"
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", compile_glob(self.pattern, self.origin))

    def matches(self, name: str) -> bool:
        return self.regex.match(name) is not None


def compile_glob(pattern: str, where: str) -> re.Pattern[str]:
    """An anchored regex for a glob (fnmatch's case-sensitive rules), refusing pathological globs."""
    shown = repr(pattern[:40]) + ("..." if len(pattern) > 40 else "")
    if len(pattern) > MAX_GLOB_CHARS:
        raise InvalidArgument(
            f"{where}: glob {shown} is {len(pattern)} characters, more than the {MAX_GLOB_CHARS} allowed"
        )
    wildcards = sum(pattern.count(symbol) for symbol in "*?[")
    if wildcards > MAX_GLOB_WILDCARDS:
        raise InvalidArgument(
            f"{where}: glob {shown} has {wildcards} wildcards, more than the {MAX_GLOB_WILDCARDS} allowed"
        )
    try:
        return re.compile(fnmatch.translate(pattern))
    except (re.error, RecursionError) as exc:  # not expected from fnmatch's output; kept one line
        raise InvalidArgument(f"{where}: glob {shown} cannot be compiled ({exc})") from None


@dataclass(frozen=True)
class Decision:
    """Where a tensor goes and why."""

    side: str
    tier: str
    reason: str


@dataclass(frozen=True)
class Policy:
    """Rules applied in order after the defaults (a later match wins), plus the static side's
    default tier, the lossy block size, and drift bounds for `check-drift`."""

    rules: tuple[Rule, ...] = ()
    static_tier: str = LOSSLESS
    block_size: int = DEFAULT_BLOCK_SIZE
    drift: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = "defaults"

    def __post_init__(self) -> None:
        # A NaN bound fails every comparison, so check-drift would pass anything: the gate off.
        for tier, bounds in self.drift.items():
            for key, value in bounds.items():
                if not math.isfinite(value):
                    where = "[drift]" if tier == "*" else f"[drift.{tier}]"
                    raise InvalidArgument(f"{self.source} {where}: {key} = {value} is not a finite number")

    def drift_bounds(self, tier: str) -> dict[str, float]:
        """Bounds for a snapshot whose loosest tier is `tier`: defaults, then the policy's
        [drift] values, then its [drift.TIER] values."""
        return {**DEFAULT_DRIFT[tier], **self.drift.get("*", {}), **self.drift.get(tier, {})}

    def decide(self, name: str, dtype: str, shape: tuple[int, ...]) -> Decision:
        """Side and tier for one tensor; a lossy tier asked for a dynamic tensor is refused."""
        side, reason = default_side(name, dtype, shape)
        asked: Rule | None = None
        for rule in self.rules:
            if rule.matches(name):
                if rule.side:
                    side, reason = rule.side, f"{rule.origin} {rule.pattern!r}"
                if rule.tier:
                    asked = rule
        if asked is not None and asked.tier in LOSSY_TIERS and side == DYNAMIC:
            raise InvalidArgument(
                f"tensor {name!r} is dynamic ({reason}): tier {asked.tier} from {asked.origin} "
                f"{asked.pattern!r} is only allowed on static tensors (move it with --static or a rule)"
            )
        # `asked` is only ever a rule with a tier.
        tier = (
            asked.tier
            if asked is not None and asked.tier
            else (self.static_tier if side == STATIC else LOSSLESS)
        )
        if tier in LOSSY_TIERS and dtype not in LOSSY_DTYPES:
            return Decision(side, LOSSLESS, f"{reason}; {dtype} is kept lossless")
        return Decision(side, tier, reason)

    def with_overrides(
        self,
        static: Sequence[str] = (),
        dynamic: Sequence[str] = (),
        static_tier: str | None = None,
    ) -> Policy:
        """This policy plus command-line globs (applied last) and a static tier."""
        extra = tuple(Rule(glob, STATIC, origin="--static") for glob in static) + tuple(
            Rule(glob, DYNAMIC, origin="--dynamic") for glob in dynamic
        )
        tier = _check_tier(static_tier, "--static-tier") if static_tier else self.static_tier
        return Policy(self.rules + extra, tier, self.block_size, self.drift, self.source)


def _check_tier(tier: object, where: str) -> str:
    if tier not in TIERS:
        raise InvalidArgument(f"{where}: tier {tier!r} is not one of {', '.join(TIERS)}")
    return str(tier)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def read_toml(path: Path, limit: int = MAX_POLICY_BYTES) -> dict[str, Any]:
    """A TOML file's tables; an unreadable, oversized, non-regular or invalid file is one error
    naming it (a FIFO is refused, not waited on)."""
    data = read_regular_file(path, limit, "TOML file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise InvalidArgument(f"{path}: not valid TOML (nested too deeply)") from None


def load_policy(path: Path) -> Policy:
    """Read a TOML policy file; any mistake is one error naming the file and the key.

    [static]
    tier = "int8"              # default tier of static tensors: lossless, int8, fp8 or int4
    block_size = 64            # elements per quantization block
    [dynamic]
    tier = "lossless"          # the only tier the dynamic side allows
    [[rule]]                   # later rules win
    match = "*.mlp.down_proj.weight"
    side = "static"            # optional
    tier = "int4"              # optional
    [drift]                    # bounds for check-drift
    min_cosine = 0.99
    """
    where = str(path)
    document = read_toml(path)
    _check_keys(document, {"static", "dynamic", "rule", "drift"}, where)
    static = _table(document, "static", where)
    _check_keys(static, {"tier", "block_size"}, f"{where} [static]")
    dynamic = _table(document, "dynamic", where)
    _check_keys(dynamic, {"tier"}, f"{where} [dynamic]")
    if _check_tier(dynamic.get("tier", LOSSLESS), f"{where} [dynamic]") != LOSSLESS:
        raise InvalidArgument(f"{where} [dynamic]: the dynamic side only allows tier 'lossless'")
    block_size = static.get("block_size", DEFAULT_BLOCK_SIZE)
    try:
        if not isinstance(block_size, int) or isinstance(block_size, bool):
            raise InvalidArgument("block_size must be an integer")
        lossy_codec("int8", "F32", block_size)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where} [static]: {exc}") from None
    rules = []
    raw_rules = document.get("rule", [])
    if not isinstance(raw_rules, list):
        raise InvalidArgument(f"{where}: rule must be an array of tables ([[rule]])")
    if len(raw_rules) > MAX_RULES:
        raise InvalidArgument(f"{where}: {len(raw_rules)} rules, more than the {MAX_RULES} allowed")
    for index, rule in enumerate(raw_rules, 1):
        rule_where = f"{where} rule {index}"
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
            raise InvalidArgument(f'{rule_where}: needs match = "GLOB"')
        _check_keys(rule, {"match", "side", "tier"}, rule_where)
        side = rule.get("side")
        if side is not None and side not in SIDES:
            raise InvalidArgument(f"{rule_where}: side {side!r} is not static or dynamic")
        tier = _check_tier(rule["tier"], rule_where) if "tier" in rule else None
        compile_glob(rule["match"], rule_where)  # the error names the file's path, not just its name
        rules.append(Rule(rule["match"], side, tier, origin=f"{path.name} rule {index}"))
    drift = _drift_bounds(_table(document, "drift", where), where)
    return Policy(
        tuple(rules),
        _check_tier(static.get("tier", LOSSLESS), f"{where} [static]"),
        block_size,
        drift,
        source=where,
    )


def _drift_bounds(table: dict[str, Any], where: str) -> dict[str, dict[str, float]]:
    """[drift] numbers apply to every tier; [drift.TIER] tables to snapshots at that tier."""
    bounds: dict[str, dict[str, float]] = {"*": {}}
    for key, value in table.items():
        if isinstance(value, dict):
            _check_tier(key, f"{where} [drift.{key}]")
            bounds[key] = _drift_numbers(value, f"{where} [drift.{key}]")
        else:
            bounds["*"].update(_drift_numbers({key: value}, f"{where} [drift]"))
    return bounds


def _drift_numbers(table: dict[str, Any], where: str) -> dict[str, float]:
    _check_keys(table, set(DRIFT_BOUNDS), where)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in table.values()):
        raise InvalidArgument(f"{where}: bounds must be numbers")
    bounds = {key: float(value) for key, value in table.items()}
    for key, value in bounds.items():
        if not math.isfinite(value):
            raise InvalidArgument(f"{where}: {key} = {value} is not a finite number")
    return bounds


def _table(document: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"{where}: [{name}] must be a table")
    return table

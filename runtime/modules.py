"""torch and transformers integration: a working `nn.Module` whose weights stay in the store until used.

The model is built with its parameters on the `meta` device (accelerate's `init_empty_weights`,
buffers kept real so non-persistent ones such as rotary `inv_freq` keep their computed values).
Every parameter found in the snapshot is then replaced by a `LazyWeight`: a storage-less tensor
with the stored shape, dtype and target device. The first op that touches it — inside the module's
forward, or anywhere else — materializes it through the runtime's cache:

- static weights stay `LazyWeight`s, so the budgeted LRU is the only owner of their bytes and an
  evicted block is decoded again on its next use; an embedding lookup (`aten.embedding`) decodes
  only the chunks holding the looked-up rows;
- dynamic weights are swapped, on first use, for plain resident parameters, so the latency-sensitive
  compute path pays no dispatch cost after its first forward.

A tensor subclass rather than forward pre-hooks: hooks would leave `meta` tensors in the model
between forwards, which breaks `model.device`, `generate()` and weights shared across modules
(tied lm_head ↔ embeddings), all of which read parameters outside the owning module's forward.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from blockstore.core.policy import STATIC
from blockstore.errors import InvalidArgument, UnsupportedInput
from blockstore.repo import DEFAULT_REF
from blockstore.storage.base import short_id

from .lazy import LazyStateDict, LazyTensor, open
from .readahead import forward_order

_aten = torch.ops.aten
_ALIASES = (_aten.detach.default, _aten.alias.default)


@dataclass
class _Binding:
    """One stored tensor bound into a model, and every (module, attribute) that refers to it."""

    handle: LazyTensor
    device: torch.device
    owners: list[tuple[nn.Module, str, bool]]
    resident: bool = False

    def real(self) -> torch.Tensor:
        tensor = self.handle.materialize()  # on the state dict's device, which is ours
        if self.handle.side != STATIC and not self.resident:
            self.resident = True
            self.attach(tensor)
        return tensor

    def attach(self, tensor: torch.Tensor) -> None:
        """Make every owner refer to `tensor` (one Parameter object, so tied weights stay tied)."""
        param = nn.Parameter(tensor, requires_grad=False)
        for module, attr, is_param in self.owners:
            if is_param:
                module._parameters[attr] = param
            else:
                module._buffers[attr] = tensor


class LazyWeight(torch.Tensor):
    """A stored tensor's stand-in inside a model: right shape, dtype and device, no storage."""

    binding: _Binding

    @staticmethod
    def __new__(cls, binding: _Binding) -> LazyWeight:
        handle = binding.handle
        return torch.Tensor._make_wrapper_subclass(
            cls, handle.shape, dtype=handle.dtype, device=binding.device, requires_grad=False
        )

    def __init__(self, binding: _Binding) -> None:
        self.binding = binding

    # mypy reads Tensor.__repr__'s keyword without its name and finds no override compatible.
    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        handle = self.binding.handle
        return f"LazyWeight({handle.name!r}, {handle.dtype}, {list(handle.shape)}, {handle.side})"

    # torch types its disabled default as a plain function; the protocol is this classmethod.
    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _ALIASES:
            return LazyWeight(args[0].binding)
        if func is _aten.embedding.default and isinstance(args[0], LazyWeight):
            binding, indices = args[0].binding, args[1]
            if binding.handle.side == STATIC and not isinstance(indices, LazyWeight):
                rows = binding.handle.index_select(indices.reshape(-1))
                return rows.reshape(*indices.shape, *binding.handle.shape[1:])
        args, kwargs = tree_map_only(LazyWeight, lambda weight: weight.binding.real(), (args, kwargs))
        return func(*args, **kwargs)


# model construction -------------------------------------------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UnsupportedInput("load_model", "a model built from a config needs transformers") from None
    return transformers


def _config_values(config: Any, state: LazyStateDict | None) -> tuple[dict[str, Any], str]:
    """(config.json values, where they came from) for config=None (the snapshot's), a path or a dict."""
    if isinstance(config, dict):
        return dict(config), "config"
    if config is None:
        if state is None or state.config is None:
            where = f"snapshot {short_id(state.snapshot_id)}" if state else "the model"
            raise InvalidArgument(f"{where} has no config.json: pass config= or model=")
        text, origin = state.config, f"config.json of snapshot {short_id(state.snapshot_id)}"
    elif isinstance(config, (str, Path)):
        origin = str(config)
        try:
            text = Path(config).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"{origin}: {exc.strerror}") from None
    else:
        raise InvalidArgument(f"config of type {type(config).__name__} is not a config, dict or path")
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{origin}: not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise InvalidArgument(f"{origin}: not a JSON object")
    return values, origin


def _transformers_config(config: Any, state: LazyStateDict | None) -> Any:
    """A transformers config from an object, a dict, a config.json path or the snapshot's config.json."""
    transformers = _transformers()
    if isinstance(config, transformers.PretrainedConfig):
        return config
    values, origin = _config_values(config, state)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise InvalidArgument(f"{origin} has no model_type: pass config= or model=")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"{origin}: {exc}") from None


def _is_transformers_class(model: Any) -> bool:
    return isinstance(model, type) and hasattr(model, "config_class") and hasattr(model, "base_model_prefix")


def _construct(model: Any, config: Any, state: LazyStateDict | None, stored: Mapping[str, Any]) -> nn.Module:
    """Build the model skeleton (parameters on `meta`): transformers from a config (or a class +
    config), or any callable. `stored` holds the stored tensors' names, which pick the head when the
    config names no architecture."""
    is_config = type(model).__name__.endswith("Config") and hasattr(model, "to_dict")
    if model is None or is_config or _is_transformers_class(model):
        transformers = _transformers()
        hf_config = _transformers_config(model if is_config else config, state)
        if _is_transformers_class(model):
            return _on_meta(lambda: model(hf_config))
        architectures = getattr(hf_config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is not None:
            return _on_meta(lambda: cls(hf_config))
        return _implied_by_tensors(transformers, hf_config, stored)
    if not callable(model):
        raise InvalidArgument(f"model {model!r} is neither a config, a module class nor a factory")
    return _on_meta(lambda: model(config) if config is not None else model())


def _implied_by_tensors(transformers: Any, hf_config: Any, stored: Mapping[str, Any]) -> nn.Module:
    """The model for a config that names no architecture (SmolLM2's config.json names none): the
    causal-LM class when the stored tensors give it everything, its head included (an `lm_head`
    stored, or tied to the stored embeddings); else the bare model, which has no head to lose.
    A stored `lm_head.weight` that no causal-LM class takes is refused: building the bare model
    would silently drop the head and return no logits."""
    try:
        causal = _on_meta(lambda: transformers.AutoModelForCausalLM.from_config(hf_config))
    except ValueError:  # this model type has no causal-LM class
        causal = None
    if causal is not None:
        _tie(causal)
        if not _unstored_parameters(causal, stored):
            return causal
    if "lm_head.weight" in stored:
        raise InvalidArgument(
            f"config.json names no architectures and no causal-LM class of model_type "
            f"{hf_config.model_type!r} matches the stored tensors: pass model= (a transformers class)"
        )
    return _on_meta(lambda: transformers.AutoModel.from_config(hf_config))


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with its parameters on `meta` (no memory) and its own buffers real."""
    with _empty_weights():
        return build()


def _empty_weights() -> Any:
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise UnsupportedInput("load_model", "needs the accelerate package: pip install accelerate") from None
    return init_empty_weights(include_buffers=False)


# binding ------------------------------------------------------------------------------------------


def _stored_name(name: str, state: Mapping[str, Any], prefix: str) -> str | None:
    """The snapshot's name for a model tensor: as is, or with the base-model prefix added/removed
    (checkpoints of a bare `BertModel` and of `BertForX` differ by `bert.`)."""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
    return next((candidate for candidate in candidates if candidate in state), None)


def _model_tensors(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, bool]]]:
    """Every parameter and persistent buffer, grouped by identity (tied weights share a group)."""
    groups: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, param in module._parameters.items():
            if param is not None:
                groups.setdefault(id(param), []).append((prefix + attr, module, attr, True))
        for attr, buffer in module._buffers.items():
            if buffer is not None and attr not in module._non_persistent_buffers_set:
                groups.setdefault(id(buffer), []).append((prefix + attr, module, attr, False))
    return groups


def _unstored_parameters(model: nn.Module, stored: Mapping[str, Any]) -> list[str]:
    """The model's parameters (one name per tied group) that `stored` holds under no name."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return [
        group[0][0]
        for group in _model_tensors(model).values()
        if any(is_param for *_, is_param in group)
        and not any(_stored_name(name, stored, prefix) for name, *_ in group)
    ]


def bind(model: nn.Module, state: LazyStateDict) -> list[str]:
    """Replace every parameter and persistent buffer found in `state` by a LazyWeight (one per
    stored tensor, shared by tied attributes) and move the model's own buffers to the target
    device. Returns the stored tensors the model does not use.
    A parameter the snapshot lacks, or one stored with another shape, is refused by name."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    used: set[str] = set()
    missing: list[str] = []
    for group in _model_tensors(model).values():
        found = [(name, stored) for name, *_ in group if (stored := _stored_name(name, state, prefix))]
        if not found:
            if any(is_param for *_, is_param in group):
                missing.append(group[0][0])
            continue
        model_name, stored = found[0]
        handle = state[stored]
        expected = getattr(group[0][1], group[0][2]).shape
        if tuple(handle.shape) != tuple(expected):
            raise InvalidArgument(
                f"tensor {stored!r} is stored with shape {list(handle.shape)}, "
                f"the model's {model_name!r} has {list(expected)}"
            )
        owners = [(module, attr, is_param) for _, module, attr, is_param in group]
        binding = _Binding(handle, state.device, owners)
        binding.attach(LazyWeight(binding))
        used.add(stored)
    if missing:
        shown = ", ".join(repr(name) for name in missing[:3])
        raise InvalidArgument(
            f"{len(missing)} parameter(s) of {type(model).__name__} are not in snapshot "
            f"{short_id(state.snapshot_id)}: {shown}{' ...' if len(missing) > 3 else ''}"
        )
    for module in model.modules():  # buffers the model computed itself (rotary inv_freq, position_ids)
        for attr, buffer in module._buffers.items():
            if buffer is not None and not isinstance(buffer, LazyWeight) and buffer.device != state.device:
                module._buffers[attr] = buffer.to(state.device)
    return sorted(set(state) - used)


def _tie(module: nn.Module) -> None:
    tie_weights = getattr(module, "tie_weights", None)  # torch types module attributes as tensors
    if tie_weights is not None:
        # transformers ties lm_head to the embeddings when loading, not when constructing; and
        # outside init_empty_weights, which would re-create the tied parameter on assignment.
        tie_weights()


def eager_model(tensors: Mapping[str, torch.Tensor], model: Any = None, *, config: Any = None) -> nn.Module:
    """The same kind of model as `load_model` builds, with `tensors` assigned (no copy): the eager
    reference that drift checks and benchmarks compare against."""
    module = _construct(model, config, None, tensors)
    prefix = getattr(module, "base_model_prefix", "") or ""
    wanted = [*(name for name, _ in module.named_parameters()), *module.state_dict()]
    found = {name: stored for name in wanted if (stored := _stored_name(name, tensors, prefix))}
    module.load_state_dict(
        {name: tensors[stored] for name, stored in found.items()}, strict=False, assign=True
    )
    _tie(module)
    missing = [name for name, param in module.named_parameters() if param.is_meta]
    if missing:
        raise InvalidArgument(f"{len(missing)} parameter(s) missing from the reference: {missing[0]!r}")
    return module.eval()


def load_model(
    store: str | Path,
    ref: str = DEFAULT_REF,
    model: type[nn.Module] | Callable[..., nn.Module] | Any = None,
    *,
    config: Any = None,
    device: str | torch.device = "cpu",
    budget: int | str | None = None,
    prefetch: int = 0,
    workers: int | None = None,
    cache: str | Path | None = None,
    readahead: bool | None = None,
) -> nn.Module:
    """A working model whose weights are read from `store@ref` when first used.

    `model`: None (a transformers model from the snapshot's config.json or `config`), a transformers
    config, a transformers model class, or any class/factory building an `nn.Module` (called with
    `config` when given; a config that names no `architectures` gets the causal-LM class when the
    stored tensors include its head, an `lm_head` or tied embeddings). The returned module is in
    eval mode; `model.blockstore` is its `LazyStateDict` (for `stats()`). `store` and `cache` are as
    for `open`. `readahead` (default: on for an object store when there is no `budget`) starts
    reading every stored tensor at once in the order the forward uses them (`Readahead`), so a
    first forward does not wait out a round trip per tensor.

    The model pins its snapshot against `gc` until `close(model)` (or the end of a
    `with closing(model):` block); one never closed is unpinned when it is garbage collected or the
    process exits.
    """
    state = open(store, ref, device=device, budget=budget, prefetch=prefetch, workers=workers, cache=cache)
    try:
        if readahead or (readahead is None and state.remote and budget is None):
            state.read_ahead(forward_order(state))  # while the model is built
        module = _construct(model, config, state, state)
        _tie(module)
        unused = bind(module, state)
    except BaseException:
        state.close()
        raise
    module.eval()
    # torch types Module attributes as tensors or modules; these two are plain attributes.
    module.blockstore = state  # type: ignore[assignment]
    module.blockstore_unused = unused  # type: ignore[assignment]
    return module


def state_of(target: nn.Module | LazyStateDict) -> LazyStateDict:
    """The `LazyStateDict` a model from `load_model` reads from (for `stats()`, `close()`, ...)."""
    state = target if isinstance(target, LazyStateDict) else getattr(target, "blockstore", None)
    if not isinstance(state, LazyStateDict):
        raise InvalidArgument(f"{type(target).__name__} was not loaded by blockstore.runtime.load_model")
    return state


def close(target: nn.Module | LazyStateDict) -> None:
    """Release what `load_model` (or `open`) holds: the snapshot's pin against gc and the store.
    Weights already materialized stay usable; a weight first touched after this raises. Closing
    twice is harmless."""
    state_of(target).close()


_Loaded = TypeVar("_Loaded", bound="nn.Module | LazyStateDict")


@contextmanager
def closing(target: _Loaded) -> Iterator[_Loaded]:
    """`with closing(load_model(store)) as model:` — the model, closed (`close`) when the block ends."""
    try:
        yield target
    finally:
        close(target)

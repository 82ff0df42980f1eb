"""blockstore as a vLLM load format: `vllm serve DIR --load-format blockstore`.

vLLM finds this module through the entry point group `vllm.general_plugins` (declared in
pyproject.toml), which every vLLM process (front end, engine core, workers) loads at start, so
`register` adds the load format everywhere without anyone importing blockstore by hand.

The loader follows vLLM's own `runai_streamer_loader.py`: options come from
`--model-loader-extra-config` (`store`, `ref`, `cache_dir`, `concurrency`, `memory_limit`; see
`serving.ServeOptions`), `load_weights` hands `model.load_weights` an iterator of (name, tensor)
pairs, and the engine's weight loaders copy each into its parameter (shards, fuses and pads
included). The tensors come from `serving.WeightSource`: streamed under the memory cap, every chunk
checked. Everything engine-neutral lives in `serving`; this module is only vLLM's side.

Not supported yet: tensor or pipeline parallelism (each rank would read every tensor; refused in
one line), and quantized vLLM checkpoints (a store holds what pack read: plain safetensors).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from blockstore.errors import BlockstoreError, InvalidArgument

from ..stream import StreamReport
from .memory import HostMemory
from .serving import LOAD_FORMAT, ServeOptions, WeightSource

logger = init_logger("vllm.blockstore")  # under vLLM's logger, so its handler and format apply
REPORT_ENV = "BLOCKSTORE_LOAD_REPORT"
"""When set, the loader writes what it measured (JSON) to this path: for tests and benchmarks."""


class BlockstoreModelLoader(BaseModelLoader):
    """Loads a model's weights from a blockstore snapshot (a local store or s3://)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = ServeOptions.parse(load_config.model_loader_extra_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        parallel = vllm_config.parallel_config
        for what, size in (
            ("tensor", parallel.tensor_parallel_size),
            ("pipeline", parallel.pipeline_parallel_size),
        ):
            if size > 1:
                raise _logged(
                    InvalidArgument(
                        f"load format {LOAD_FORMAT} does not support {what} parallelism yet "
                        f"({what}_parallel_size={size}); serve on one device"
                    )
                )
        return super().load_model(vllm_config, model_config, prefix)

    def _source(self, model_config: ModelConfig) -> WeightSource:
        return WeightSource(self.options, Path(model_config.model))

    def download_model(self, model_config: ModelConfig) -> None:
        """Fill the local read-through cache of an s3:// store with every chunk of the snapshot
        (each checked), so the next start reads nothing remote."""
        try:
            with self._source(model_config) as source:
                started = time.perf_counter()
                chunks = source.warm()
                logger.info(
                    "blockstore: %d chunks of %s checked and cached in %.2f s",
                    chunks,
                    source.label,
                    time.perf_counter() - started,
                )
        except BlockstoreError as exc:
            raise _logged(exc) from None

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        try:
            with self._source(model_config) as source:
                self._load(model, model_config, source)
        except BlockstoreError as exc:
            raise _logged(exc) from None

    def _load(self, model: nn.Module, model_config: ModelConfig, source: WeightSource) -> None:
        memory = HostMemory()
        try:
            self._stream_into(model, model_config, source, memory)
        finally:
            memory.stop()

    def _stream_into(
        self, model: nn.Module, model_config: ModelConfig, source: WeightSource, memory: HostMemory
    ) -> None:
        report = StreamReport()
        current: dict[str, Any] = {}

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in source.tensors(lossy_dtype=model_config.dtype, report=report):
                current["name"], current["shape"] = name, list(tensor.shape)
                yield name, tensor
            current.clear()

        started = time.perf_counter()
        try:
            loaded = cast(Any, model).load_weights(weights())  # every vLLM model class has one
        except BlockstoreError:
            raise
        except Exception as exc:  # the model's weight loaders refuse a name or a shape
            if not current:
                raise
            cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            raise source.mismatch(
                f"tensor {current['name']!r} {current['shape']} was refused by "
                f"{type(model).__name__}.load_weights ({cause})"
            ) from None
        seconds = time.perf_counter() - started
        if loaded is not None and model_config.quantization is None:
            missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
            if missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                raise source.mismatch(
                    f"it holds no weights for {len(missing)} of the model's parameters: {shown}"
                )
        peaks = memory.stop()
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        logger.info(
            "blockstore: Loading weights took %.2f seconds: %d tensors, %.1f MB from %s "
            "(%.1f MB stored), %d threads; host memory peaked %s above the start, %s of it allocated "
            "(parameters %.1f MB, stream cap %.1f MB, held at most %.1f MB)",
            seconds,
            report.tensors,
            report.raw_bytes / 1e6,
            source.label,
            report.stored_bytes / 1e6,
            source.concurrency,
            _mb(peaks["rss"]),
            _mb(peaks["anon"]),
            parameter_bytes / 1e6,
            report.memory_limit / 1e6,
            report.peak_held_bytes / 1e6,
        )
        for tier, count in sorted(report.dequantized.items()):
            logger.info(
                "blockstore: %d static tensors stored at %s were dequantized to %s on the way in",
                count,
                tier,
                str(model_config.dtype).removeprefix("torch."),
            )
        _write_report(
            {
                "store": source.location,
                "snapshot": source.snapshot_id.hex(),
                "seconds": seconds,
                "stream": report.to_json(),
                "rss_start": memory.rss_start,
                "peak_rss_above_start": peaks["rss"],
                "peak_anon_above_start": peaks["anon"],
                "parameter_bytes": parameter_bytes,
                "concurrency": source.concurrency,
            }
        )


def _mb(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.1f} MB"


def _logged(exc: BlockstoreError) -> BlockstoreError:
    """Log blockstore's one line before vLLM wraps the failure in its own traceback."""
    logger.error("blockstore: %s", exc)
    return exc


def _write_report(report: dict[str, Any]) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def register() -> None:
    """The `vllm.general_plugins` entry point: add the load format (once per process)."""
    from vllm.model_executor import model_loader

    if (
        getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", {}).get(LOAD_FORMAT)
        is not BlockstoreModelLoader
    ):
        register_model_loader(LOAD_FORMAT)(BlockstoreModelLoader)


__all__ = ["BlockstoreModelLoader", "register"]

"""Serving engines that load weights from a store.

`serving` holds what every engine shares (options, the model directory an engine starts from, a
weight source that streams a pinned snapshot under a memory cap); each engine gets one small module
of its own that maps that onto its loader interface: `vllm` (a vLLM load format, registered through
the `vllm.general_plugins` entry point). Importing this package imports no engine.
"""

from .serving import LOAD_FORMAT, MARKER, ServeOptions, WeightSource, write_model_dir

__all__ = ["LOAD_FORMAT", "MARKER", "ServeOptions", "WeightSource", "write_model_dir"]

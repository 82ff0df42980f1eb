"""blockstore: a versioned, content-addressed model store for LLM inference.

The core package holds the storage layer (chunks, codecs, manifests, the LMDB store and the
operations on it). `blockstore.patches`, `blockstore.runtime`, `blockstore.cli` and
`blockstore.benchmarks` are installed from the top-level folders of the same names.
"""

__version__ = "0.1.0"

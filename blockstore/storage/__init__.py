"""Where a store's bytes live: one contract (`base.Store`), its backends (LMDB, S3) and wrappers."""

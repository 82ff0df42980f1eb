"""The data model: chunks, tensor entries and snapshots, dtypes, hashes, the safetensors reader and
the static/dynamic policy. Nothing here touches a store."""

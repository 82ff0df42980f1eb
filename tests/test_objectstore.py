"""The store on S3-compatible object storage, against real servers started by the tests (moto and
SeaweedFS on 127.0.0.1): the shared store suite, conditional writes, racing publishers, a killed pack,
and the lazy runtime and CLI unchanged on an s3:// store."""

from __future__ import annotations

import pytest

from blockstore.objectstore import ObjectStore

from .store_suite import CatalogSuite, ChunkStoreSuite


class TestObjectStore(ChunkStoreSuite, CatalogSuite):
    @pytest.fixture
    def store(self, s3_url: str):
        with ObjectStore.create(s3_url) as opened:
            yield opened

"""Test kits for code built on blockstore (zarr's `zarr.testing` habit): `store.StoreSuite` checks
a store backend or wrapper against the whole `blockstore.storage.base.Store` contract. Needs pytest."""

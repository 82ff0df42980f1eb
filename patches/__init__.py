"""Patch bundles: diff, apply, rollback (DESIGN.md §6). Not built yet."""

"""Benchmarks, evidence packs and the regression gate (docs/design.md §9)."""

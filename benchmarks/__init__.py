"""Benchmarks, evidence packs and the regression gate (DESIGN.md §8). Not built yet."""

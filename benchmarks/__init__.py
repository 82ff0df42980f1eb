"""Benchmarks, evidence packs and the regression gate."""

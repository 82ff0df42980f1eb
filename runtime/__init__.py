"""Lazy materialization, precision policy and torch integration (DESIGN.md §5). Not built yet."""

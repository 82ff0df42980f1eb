"""The one compiled module of blockstore; everything else is declared in pyproject.toml.

`blockstore._planes` joins byte planes in one pass (see blockstore/planes.py). It is optional: where
it cannot be built (no C compiler), the install still succeeds and blockstore joins planes with
numpy, to the same bytes, more slowly.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("blockstore._planes", ["blockstore/_planes.c"], optional=True)])

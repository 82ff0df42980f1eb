"""The one compiled module of blockstore; everything else is declared in pyproject.toml.

`blockstore.codecs._planes` joins byte planes in one pass (see blockstore/codecs/planes.py) and unpacks
nibble-coded delta differences onto their base (blockstore/codecs/nibbles.py). It is optional: where
it cannot be built (no C compiler), the install still succeeds and blockstore does both with numpy,
to the same bytes, more slowly.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("blockstore.codecs._planes", ["blockstore/codecs/_planes.c"], optional=True)])

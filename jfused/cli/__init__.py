"""The `jfused` command line (`bench`, `train`).

The one part of `jfused` that imports `flax_layers` (the layer above it): `jfused bench block`
and `jfused train` run its modules, and import them only when those commands run, so the
library itself never depends on Flax layers.
"""

from jfused.cli.commands import main

__all__ = ["main"]

"""Set-up shared by the tests that build tunix models.

Importing tunix turns flax's `flax_always_shard_variable` off for the whole
process (`tunix.utils.env_utils`); tunix's models need it off, the other
tests of the same worker need it as it was. `import_tunix` imports the tunix
modules (skipping the test module when tunix is missing) and puts the flag
back; the `tunix_flax_config` fixture turns it off around each tunix test.
"""

from __future__ import annotations

import flax
import pytest

ALWAYS_SHARD = flax.config.flax_always_shard_variable

#: Warnings flax and tunix raise on tunix's behalf (not from peft's code).
WARNING_FILTERS = [
    # tunix builds nnx.Param(..., sharding=...): flax warns from variablelib.
    pytest.mark.filterwarnings(
        "ignore:'sharding' is deprecated:DeprecationWarning"),
    # tunix's Einsum reads `self.w.value`; its shard() uses pxla.
    pytest.mark.filterwarnings(r'ignore::DeprecationWarning:tunix\..*'),
]


def import_tunix(*names: str):
  """The tunix modules `names` (skips the module if tunix is missing)."""
  modules = tuple(pytest.importorskip(n) for n in names)
  flax.config.update('flax_always_shard_variable', ALWAYS_SHARD)
  return modules


@pytest.fixture(autouse=True)
def tunix_flax_config():
  flax.config.update('flax_always_shard_variable', False)
  yield
  flax.config.update('flax_always_shard_variable', ALWAYS_SHARD)

"""Whole pytrees and models: `save_pytree` / `restore_pytree`, `save_model`.

`save_model` / `restore_model` keep the full `nnx.State` of a model (float,
LoRA-wrapped or quantized: int4 values and Q4_0 blocks restore bit-exact);
`save_pytree` / `restore_pytree` any pytree of arrays (e.g. linen params),
with strict key/shape/dtype checks.
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx

from peft.checkpoint._atomic import _read
from peft.checkpoint._atomic import _resolve
from peft.checkpoint._atomic import _write
from peft.checkpoint._orbax import _abs
from peft.checkpoint._orbax import _restore

__all__ = ['save_pytree', 'restore_pytree', 'save_model', 'restore_model']


def save_pytree(directory: Any, tree: Any, *, overwrite: bool = False) -> str:
  """Saves a pytree of arrays (e.g. linen params) with orbax; returns the path.

  Works for any dtype orbax knows, including `jnp.int4` (a linen checkpoint
  from `quantize_checkpoint` keeps its int4 kernels and float scales exactly).

  Example:

  ```python
  path = save_pytree('/tmp/params', {'Dense_0': {'kernel': k, 'scale': s}})
  params = restore_pytree(path)
  ```

  """
  directory = _abs(directory)
  _write(directory, tree, overwrite)
  return directory


def restore_pytree(directory: Any, target: Any = None) -> Any:
  """Restores a pytree saved by `save_pytree`, strictly against `target`.

  `target` (optional) is a pytree of arrays or `jax.ShapeDtypeStruct`s with the
  expected structure; missing/unexpected keys and shape/dtype mismatches raise
  a `ValueError` listing them. Without `target` the tree is restored as saved
  (dict keys come back as strings, dtypes as saved).

  Example:

  ```python
  params = restore_pytree('/tmp/params', target=jax.eval_shape(init_fn))
  ```

  """
  directory = _resolve(_abs(directory))
  if target is None:
    if not os.path.isdir(directory):
      raise ValueError(f'directory: no checkpoint at {directory}')
    return _restore(directory)
  return _read(
      directory, target, f'checkpoint {directory}',
      'pass a target with the structure the checkpoint was saved with.',
  )


def save_model(directory: Any, model: nnx.Module, *, overwrite: bool = False
               ) -> str:
  """Saves the full state of an NNX model (any wrappers, quantized or not).

  Restore it with `restore_model(directory, abstract_model)`. Quantized
  weights (int4 values, packed Q4_0 blocks and their scales) are saved as they
  are stored, so the round trip is bit-exact.

  Example:

  ```python
  save_model('/tmp/q4', surgery.quantize(model, method='q4_0'))
  abstract = nnx.eval_shape(lambda: surgery.quantize(make_model(),
                                                     method='q4_0'))
  model = restore_model('/tmp/q4', abstract)
  ```

  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  return save_pytree(directory, nnx.to_pure_dict(nnx.state(model)),
                     overwrite=overwrite)


def restore_model(directory: Any, model: nnx.Module) -> nnx.Module:
  """Restores a `save_model` checkpoint into `model` (abstract or concrete).

  `model` gives the structure: typically `nnx.eval_shape(lambda: make())`
  after the same surgery. Returns a new concrete model; `model` itself is not
  changed. Strict: differing keys, shapes or dtypes raise `ValueError`.

  Example:

  ```python
  abstract = nnx.eval_shape(lambda: make_model())
  model = restore_model('/tmp/ckpt', abstract)
  ```

  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  graphdef, state = nnx.split(model)
  target = nnx.to_pure_dict(state)
  restored = _read(
      _abs(directory), target, f'model checkpoint {_abs(directory)}',
      'build `model` with the same architecture and surgery as the saved one.',
  )
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)

"""The variables holding quantized storage, created sharded like the kernel.

`QuantizedWeight` is the variable type of packed values and their scales.
`storage_variable` creates one with `out_sharding` metadata (and, under a
mesh with eager sharding, placed accordingly); `kernel_names` reads the
sharding names of a float kernel variable. The names of the storage follow
`peft.quantization.storage_names`; a mesh axis that does not divide a storage
axis (e.g. the `K // 32` blocks of Q4_0 on a 4-way axis when K = 64) is
dropped, so that axis is replicated instead of failing.

Examples:
  >>> import jax.numpy as jnp
  >>> v = storage_variable(jnp.zeros((4, 2), jnp.int8), ('data', 'model'))
  >>> type(v).__name__, v.get_metadata()['out_sharding']
  ('QuantizedWeight', ('data', 'model'))
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
from jax.sharding import NamedSharding

from peft.quantization import QArray
from peft.quantization import QuantizationMethod
from peft.quantization import quantize

__all__ = ['QuantizedWeight', 'as_method', 'check_block_axis', 'check_storage',
           'kernel_names', 'storage_layout', 'storage_variable']

_Q4_0_BLOCK = 32


class QuantizedWeight(nnx.Variable):
  """A variable holding quantized storage: packed values or their scales.

  Not an `nnx.Param`, so optimizers built with `wrt=nnx.Param` (or
  `nnx.LoRAParam`) leave it alone: the base of a QLoRA model stays frozen.
  A quantized layer keeps its kernel in two of them, `values` and `scale`
  (the leaves of a `peft.quantization.QArray`), each an array with its own
  `out_sharding` metadata, so the usual flax sharding recipes
  (`nnx.get_partition_spec`, `nnx.eval_shape` under `jax.set_mesh`) work.
  The layer's `weight` property gives a `QuantizedWeight` view holding the
  whole `QArray`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft.quantization import quantize
    >>> w = QuantizedWeight(quantize(jnp.ones((32, 4)), 'int4').values)
    >>> w.get_value().dtype
    dtype(int4)
  """


def kernel_names(variable: nnx.Variable) -> tuple[Any, ...] | None:
  """The sharding names of a kernel variable, one per axis (None if unnamed).

  Stacking axes added by `nnx.vmap` without a name get None.

  Examples:
    >>> import jax.numpy as jnp
    >>> kernel_names(nnx.Param(jnp.ones((3, 4, 5)), out_sharding=('a', 'b'),
    ...                        eager_sharding=False))
    (None, 'a', 'b')
  """
  names = variable.get_metadata().get('out_sharding')
  ndim = len(getattr(variable.get_value(), 'shape', ()))
  if not names or not isinstance(names,
                                 (tuple, list, jax.sharding.PartitionSpec)):
    return None
  names = tuple(names)
  if len(names) < ndim:  # stacking axes added without a name
    names = (None,) * (ndim - len(names)) + names
  return names if len(names) == ndim else None


def _current_mesh(meta):
  mesh = meta.get('mesh')
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      mesh = None
  return mesh


def _mesh_axes(name, meta) -> tuple[str, ...]:
  """The mesh axes a (possibly logical) sharding name maps to."""
  rules = tuple(meta.get('sharding_rules') or ()) + tuple(
      nn.get_logical_axis_rules())
  for alias, mapped in rules:  # a logical name maps to its mesh axes
    if name is not None and alias == name:
      name = mapped
      break
  if isinstance(name, str):
    return (name,)
  if isinstance(name, (tuple, list)):
    return tuple(n for n in name if isinstance(n, str))
  return ()


def _fit_names(names, shape, meta, mesh):
  """`names` with None where the mesh axes do not divide the storage axis."""
  if mesh is None:
    return tuple(names)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  out = []
  for name, dim in zip(names, shape):
    n = math.prod(sizes.get(a, 1) for a in _mesh_axes(name, meta))
    out.append(name if dim % n == 0 else None)
  return tuple(out)


def _concrete_mesh(value):
  """The mesh of a concrete array placed with a NamedSharding, else None."""
  sharding = getattr(value, 'sharding', None)  # None for a tracer
  if isinstance(sharding, NamedSharding):
    return sharding.mesh
  return None


def storage_variable(value, names=None, source_meta=None, like=None,
                     var_type=QuantizedWeight, **extra) -> nnx.Variable:
  """A `var_type` holding `value`, annotated and placed with `names`.

  Args:
    value: the array (or `jax.ShapeDtypeStruct` under `nnx.eval_shape`).
    names: the storage's sharding names (one per axis of `value`), or None.
    source_meta: the float kernel's metadata: its `mesh`, `sharding_rules`
      and `eager_sharding` are kept.
    like: an array whose mesh places `value` when no mesh is current (the
      model was built under `jax.set_mesh` and is converted outside it).
    var_type: the variable class.
    **extra: more metadata.

  Returns:
    The variable; with eager sharding under a mesh it is placed like a flax
    Param created with `out_sharding`.
  """
  if names is None:
    return var_type(value, **extra)
  source_meta = source_meta or {}
  meta = dict(extra)
  for key in ('mesh', 'sharding_rules'):
    if source_meta.get(key):
      meta[key] = source_meta[key]
  mesh = _current_mesh(meta)
  shape = getattr(value, 'shape', ())
  mesh_of_like = _concrete_mesh(like) if mesh is None else None
  names = _fit_names(names, shape, meta,
                     mesh if mesh is not None else mesh_of_like)
  meta['out_sharding'] = names
  eager = source_meta.get('eager_sharding')
  if eager is None:
    eager = nnx.using_eager_sharding()
  if eager and mesh is not None:
    try:
      return var_type(value, eager_sharding=True, **meta)
    except TypeError:  # e.g. a single-device array under an abstract mesh
      mesh_of_like = _concrete_mesh(like)
  var = var_type(value, eager_sharding=False, **meta)
  if eager and mesh_of_like is not None:
    spec = nnx.get_partition_spec(var).get_value()
    var.set_value(jax.device_put(value, NamedSharding(mesh_of_like, spec)))
  return var


def as_method(method: Any, what: str) -> QuantizationMethod:
  """`method` as a `QuantizationMethod`; TypeError/ValueError name `what`.

  Examples:
    >>> as_method('Q4_0', 'f').value
    'q4_0'
  """
  if isinstance(method, QuantizationMethod):
    return method
  if not isinstance(method, str):
    raise TypeError(
        f'{what}: `method` must be a QuantizationMethod or its name (e.g.'
        f" 'int4'), got {type(method).__name__}."
    )
  return QuantizationMethod(method)  # ValueError listing the valid names


def check_block_axis(method, kernel_shape, what: str) -> None:
  """Raises a ValueError when a Q4_0 block axis is not a multiple of 32.

  Examples:
    >>> check_block_axis(QuantizationMethod.Q4_0, (64, 32), 'f')  # fine
  """
  if method is QuantizationMethod.Q4_0:
    axis, which = len(kernel_shape) - 1, 'last'
  elif method is QuantizationMethod.Q4_0_TRANSPOSE:
    axis, which = len(kernel_shape) - 2, 'second-to-last'
  else:
    return
  n = kernel_shape[axis] if axis >= 0 else 0
  if axis < 0 or n % _Q4_0_BLOCK:
    raise ValueError(
        f'{what}: method={method.value!r} quantizes the kernel in blocks of'
        f' {_Q4_0_BLOCK} along its {which} axis (axis {axis}), but the'
        f' kernel has shape {tuple(kernel_shape)}: length {n} on that axis is'
        f' not a multiple of {_Q4_0_BLOCK}. Use a layer whose axis {axis} is'
        f' a multiple of {_Q4_0_BLOCK}, or a per-channel method (int4, int8).'
    )


def check_storage(method, geometry, shape, kernel_sharding, what: str):
  """Raises a ValueError when `geometry` / `shape` cannot hold `method`.

  Checks the Q4_0 block axis, that per-channel scales have something to
  reduce over, and that `kernel_sharding` names every kernel axis.

  Examples:
    >>> from peft.geometry import Geometry
    >>> check_storage(QuantizationMethod.INT4, Geometry.linear(0, 4), (0, 4),
    ...               None, 'f')
    Traceback (most recent call last):
    ...
    ValueError: f: the contracted kernel axes of '...i,io->...o' have size 0 (kernel shape (0, 4), e.g. in_features=0): per-channel scales need at least one input feature.
  """
  check_block_axis(method, shape, what)
  if method not in (QuantizationMethod.Q4_0,
                    QuantizationMethod.Q4_0_TRANSPOSE) and 0 in [
                        geometry.kernel_shape[a]
                        for a in geometry.contracted_axes]:
    raise ValueError(
        f'{what}: the contracted kernel axes of {geometry.einsum_str!r}'
        f' have size 0 (kernel shape {geometry.kernel_shape}, e.g.'
        ' in_features=0): per-channel scales need at least one input'
        ' feature.'
    )
  if kernel_sharding is not None and len(tuple(kernel_sharding)) != len(
      shape):
    raise ValueError(
        f'{what}: kernel_sharding={tuple(kernel_sharding)} must name each'
        f' of the {len(shape)} kernel axes {shape} (None for unsharded).'
    )


def storage_layout(method, shape, dtype, axes, group_size=None,
                   double_quant=False) -> QArray:
  """The storage `QArray` of a kernel of `shape`, as shapes (no compute).

  Raises the ValueError of `quantize` for a shape that cannot hold `method`
  (e.g. a `group_size` that does not divide the contracted size).

  Examples:
    >>> storage_layout('q4_0', (64, 32), 'float32', (0,)).values.shape
    (64, 1, 16)
    >>> storage_layout('nf4', (128, 32), 'float32', (0,)).scale.shape
    (2, 32)
  """
  return jax.eval_shape(
      lambda w: quantize(w, method, axes, group_size=group_size,
                         double_quant=double_quant),
      jax.ShapeDtypeStruct(tuple(shape), dtype))

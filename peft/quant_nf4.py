"""NF4 as a `QuantizationMethod`: the `peft.nf4` codec in a kernel's layout.

`peft.nf4` reproduces bitsandbytes' `quantize_4bit(..., quant_type='nf4')`
on a tensor read in row-major order. Here the tensor is a kernel with
contracted axes `axes` (sorted, non-negative): it is read as bitsandbytes
reads the PyTorch weight, i.e. with the output axes first and the contracted
axes last (flattened row-major), so that blocks of `block` (64) run along the
contracted axes. The storage is then laid back out like the kernel, so that
it slices (and shards) as the kernel does:

* `values`: uint8, the kernel's shape with the last contracted axis halved;
  byte `j` of that axis holds the codes of elements `2j` (high nibble, as in
  bitsandbytes) and `2j + 1` (low nibble).
* `scale`: the block absmax in the layout of `group_size=block` scales
  (`(K // 64, N)` for a `[K, N]` kernel): float32, or with double
  quantization the uint8 codes of `absmax - offset`.
* `stats` (double quantization only): float32 `[1 + ceil(n_blocks / 256)]`,
  the offset (mean absmax) then bitsandbytes' scale of each 256 absmax, in
  bitsandbytes' (output-major) order of the blocks.

Examples:
  >>> import jax.numpy as jnp
  >>> v, s, st = _nf4_encode(jnp.ones((128, 3)), (0,), 64, False)
  >>> v.shape, v.dtype, s.shape, st
  ((64, 3), dtype('uint8'), (2, 3), None)
  >>> _nf4_decode(v, s, st, (0,), (128, 3)).tolist()[0]
  [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from peft import nf4 as _nf4
from peft.nf4_double_quant import _dequantize_dynamic
from peft.nf4_double_quant import _no_fma
from peft.quant_methods import _scale_layout
from peft.quant_methods import _split_for_scale

__all__ = []


class NF4Spec(NamedTuple):
  """Static description of an NF4 quantization: contracted axes, block."""

  axes: tuple[int, ...]
  block: int
  double_quant: bool


def _check_nf4_shape(shape, axes, block, fn_name, name='x'):
  """The scale layout of NF4 `shape`; ValueError when it cannot hold NF4."""
  if not axes:
    raise ValueError(
        f'{fn_name}: NF4 needs at least one contracted axis in `{name}`'
        f' (shape {shape}); pass `axis_to_reduce`.')
  layout = _scale_layout(shape, axes, block, fn_name, name)
  if shape[axes[-1]] % 2:
    raise ValueError(
        f'{fn_name}: NF4 packs two 4-bit codes per byte along the last'
        f' contracted axis ({axes[-1]}) of `{name}`, which has odd length'
        f' {shape[axes[-1]]} (shape {shape}); pad it to an even length.')
  return layout


def _perm(ndim, axes):
  """Output axes first, contracted axes last (bitsandbytes' reading order)."""
  return tuple(a for a in range(ndim) if a not in axes) + tuple(axes)


def _from_rows(flat, perm, dims):
  """`flat` (row-major over `dims` permuted by `perm`) back in kernel order."""
  moved = flat.reshape(tuple(dims[a] for a in perm))
  return jnp.transpose(moved, np.argsort(perm))


def _to_rows(x, perm):
  return jnp.transpose(x, perm).reshape(-1)


def nf4_values_shape(shape, axes):
  """Shape of the packed codes: `shape` with the last contracted axis halved.

  Examples:
    >>> nf4_values_shape((128, 8), (0,))
    (64, 8)
  """
  out = list(shape)
  out[axes[-1]] //= 2
  return tuple(out)


def _nf4_encode(x32, axes, block, double_quant):
  """(values, scale, stats) of a finite float32 `x32` (see the module doc)."""
  shape = x32.shape
  perm = _perm(x32.ndim, axes)
  contracted = math.prod(shape[a] for a in axes)
  rows = jnp.transpose(x32, perm).reshape(-1, contracted)
  # pylint: disable-next=protected-access
  q = _nf4._quantize(rows, block, double_quant, 1)
  values = _from_rows(q.codes, perm, nf4_values_shape(shape, axes))
  layout = _scale_layout(shape, axes, block, 'quantize')
  scale = _from_rows(q.absmax, perm, layout)
  if not double_quant:
    return values, scale, None
  stats = jnp.concatenate([q.offset[None], q.absmax_scale])
  return values, scale, stats


def _absmax(scale, stats, axes):
  """The float32 absmax per block, from plain or double-quantized `scale`."""
  if stats is None:
    return scale.astype(jnp.float32)
  perm = _perm(scale.ndim, axes)
  codes = _to_rows(scale, perm)
  absmax = _no_fma(_dequantize_dynamic(codes, stats[1:])) + stats[0]
  return _from_rows(absmax, perm, scale.shape)


def _unpack_axis(values, axis):
  """uint8 codes, two per byte along `axis` (high nibble first) -> int32."""
  pair = jnp.stack([values >> 4, values & 15], axis=axis + 1)
  shape = list(values.shape)
  shape[axis] *= 2
  return pair.reshape(shape).astype(jnp.int32)


def _codebook_values(codes):
  """The NF4 codebook value of each code (float32)."""
  return jnp.asarray(_nf4.NF4_CODEBOOK)[codes]


def _nf4_decode(values, scale, stats, axes, shape):
  """The float32 kernel of shape `shape` stored in NF4 `values` / `scale`."""
  absmax = _absmax(scale, stats, axes)
  v = _codebook_values(_unpack_axis(values, axes[-1]))
  x_shape, s_shape, _ = _split_for_scale(tuple(shape), absmax.shape)
  return (v.reshape(x_shape) * absmax.reshape(s_shape)).reshape(shape)


def _simulate_nf4(x32, axes, block, double_quant):
  """Fake NF4 (garbage where `x32` is not finite: the caller restores it)."""
  finite = jnp.where(jnp.isfinite(x32), x32, jnp.zeros_like(x32))
  values, scale, stats = _nf4_encode(finite, axes, block, double_quant)
  return _nf4_decode(values, scale, stats, axes, x32.shape)


"""Matmuls with a quantized kernel, for any layer geometry (jax only).

`quantized_einsum(x, qarray, geometry)` computes what the layer described by
`geometry` (a `peft.geometry.Geometry`) computes with the dequantized kernel,
`einsum(geometry.call_einsum_str(x.ndim), x, dequantize(qarray))`, without
the bias, by one of two strategies:

* `'blockwise'`: the contraction is seen as `(B, M, K) x (B, K, N)` and the
  kernel is dequantized chunk by chunk inside a `lax.fori_loop` (about 4 MiB
  of float32 weights per step), so the float kernel is never materialised.
  Per-channel INT4 / INT8 sum `x * values` and divide by the scale after the
  dot; Q4_0 unpacks the nibbles of each chunk. This is the fast path on CPU,
  where XLA converts a whole int4 weight to float32 before a matmul.
* `'fused'`: `x @ convert(values)` with the per-channel scale applied after
  the dot (Q4_0: the dequantizing expression feeds the dot), written so that
  XLA on GPU / TPU fuses the convert into the matmul.

`strategy='auto'` (the default) picks `'blockwise'` on CPU and `'fused'`
elsewhere (the platform of `x`'s device, or `jax.default_backend()` under
tracing). Both give the same numbers up to float rounding of the summation
order. Group-wise scales (INT4 / INT8 / FP8 with `group_size`) and NF4
blocks run along the contracted axes: the loop takes whole groups per chunk
and dequantizes only that chunk (NF4: codebook lookup times the block
absmax; a double-quantized absmax, 1/64 of the weights, is decoded once).
Layouts the blockwise loop does not cover (kernel axes not ordered batch,
contracted, output; an input-only axis summed; Q4_0_TRANSPOSE with several
output axes; an `out_sharding`; groups not along the contracted axes)
dequantize the kernel and call `jnp.einsum`; so does `'fused'` for grouped
scales and NF4 (XLA fuses that dequantization into the dot on GPU / TPU).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from peft.geometry import Geometry
  >>> from peft.quantization import quantize, dequantize
  >>> g = Geometry.linear(64, 32)
  >>> w = jax.random.normal(jax.random.key(0), (64, 32))
  >>> q, x = quantize(w, 'q4_0'), jnp.ones((2, 64))
  >>> y = quantized_einsum(x, q, g, strategy='blockwise')
  >>> bool(jnp.allclose(y, x @ dequantize(q), atol=1e-4))
  True
  >>> z = quantized_einsum(x, q, g, strategy='fused')
  >>> bool(jnp.allclose(y, z, atol=1e-4))
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peft.geometry import Geometry
from peft.quantization import QArray
from peft.quantization import QuantizationMethod
from peft.quantization import dequantize
from peft.quantization import scale_shape
from peft.kernels_blockwise import _bmm
from peft.kernels_blockwise import _grouped_blockwise
from peft.kernels_blockwise import _int_blockwise
from peft.kernels_blockwise import _nf4_blockwise
from peft.kernels_blockwise import _q4_0_blockwise
from peft.kernels_blockwise import _q4_0_transpose_blockwise

__all__ = [
    'STRATEGIES',
    'choose_strategy',
    'kernel_shape',
    'quantized_einsum',
]

#: The values `strategy` accepts.
STRATEGIES = ('auto', 'blockwise', 'fused')

_Q4_0_BLOCK = 32
_INT = (QuantizationMethod.INT4, QuantizationMethod.INT8)
_SCALED = (*_INT, QuantizationMethod.FP8)
# Elements of the float32 weight chunk dequantized per loop step (4 MiB): big
# enough for an efficient matmul, small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 20
_BLOCKWISE = (*_SCALED, QuantizationMethod.Q4_0,
              QuantizationMethod.Q4_0_TRANSPOSE, QuantizationMethod.NF4)


def kernel_shape(q: QArray) -> tuple[int, ...]:
  """The float kernel shape of `q`, derived from its leaves (not `q.shape`).

  `q.shape` is static metadata that goes stale when `nnx.vmap` / `nnx.scan`
  slice the leaves; the leaves' shapes do not.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft.quantization import quantize
    >>> kernel_shape(quantize(jnp.ones((64, 32)), 'q4_0_transpose'))
    (64, 32)
  """
  v = q.values.shape
  if q.method is QuantizationMethod.NF4:  # two codes per byte on axes[-1]
    shape = list(v)
    shape[q.axes[-1]] *= 2
    return tuple(shape)
  if q.method is QuantizationMethod.Q4_0:
    return (*v[:-2], v[-2] * _Q4_0_BLOCK)
  if q.method is QuantizationMethod.Q4_0_TRANSPOSE:
    return (*v[:-3], v[-2] * _Q4_0_BLOCK, v[-3])
  return tuple(v)  # per-channel / group-scaled values: the kernel's shape


def _with_shape(q: QArray) -> QArray:
  shape = kernel_shape(q)
  return q if tuple(q.shape) == shape else dataclasses.replace(q, shape=shape)


def choose_strategy(strategy: str = 'auto', x: Any = None) -> str:
  """`'blockwise'` or `'fused'`: what `strategy` means for `x`'s platform.

  Examples:
    >>> choose_strategy('fused')
    'fused'
    >>> import jax
    >>> choose_strategy('auto') == (
    ...     'blockwise' if jax.default_backend() == 'cpu' else 'fused')
    True
  """
  if strategy not in STRATEGIES:
    raise ValueError(
        f'strategy={strategy!r} is not one of {STRATEGIES}; use'
        " 'blockwise' on CPU, 'fused' on GPU/TPU, or 'auto' to pick by device"
    )
  if strategy != 'auto':
    return strategy
  platform = None
  try:  # a concrete array knows its device; a tracer raises
    platform = next(iter(x.devices())).platform
  except Exception:  # pylint: disable=broad-except
    platform = jax.default_backend()
  return 'blockwise' if platform == 'cpu' else 'fused'


class _Plan(NamedTuple):
  """How to see a contraction as `(B, M, K) x (B, K, N) -> (B, M, N)`."""

  x_perm: tuple[int, ...]  # x axes ordered batch, free, contracted
  nb: int  # kernel batch axes
  nk: int  # kernel contracted axes
  out_perm: tuple[int, ...] | None  # canonical (B, F, N) axes -> output


def _plan(geometry: Geometry, x_ndim: int) -> _Plan | None:
  """The canonical view, or None when the kernel axes are not ordered
  (batch, contracted, output) or the contraction sums input-only axes."""
  ins, outs = geometry.subscripts(x_ndim)
  ws = geometry.kernel
  batch, red, out = geometry.batch, geometry.contracted, geometry.output
  if batch + red + out != ws or not red or not out or len(set(ins)) != len(ins):
    return None
  free = ''.join(c for c in ins if c not in ws)
  if any(c not in outs for c in free):
    return None  # an input-only axis is summed over
  canon = batch + free + out
  if len(outs) != len(canon) or set(outs) != set(canon):
    return None
  x_perm = tuple(ins.index(c) for c in batch + free + red)
  out_perm = tuple(canon.index(c) for c in outs)
  if out_perm == tuple(range(len(out_perm))):
    out_perm = None
  return _Plan(x_perm, len(batch), len(red), out_perm)


def _blocks_along_contracted(q, geometry, k_shape, per_channel) -> bool:
  """Whether grouped / NF4 blocks run along `geometry`'s contracted axes."""
  if per_channel or q.method not in (*_SCALED, QuantizationMethod.NF4):
    return True
  axes = geometry.contracted_axes
  if q.method is QuantizationMethod.NF4 and tuple(
      a % len(k_shape) for a in q.axes) != tuple(axes):
    return False
  try:
    layout = scale_shape(k_shape, q.method, axes, group_size=q.group_size)
  except ValueError:
    return False
  return tuple(q.scale.shape) == tuple(layout)


def _dequantized_einsum(x, q, geometry, cdt, acc, precision, out_sharding):
  """`einsum(x, dequantize(q))`: the convert feeds the dot (fusable)."""
  kernel = dequantize(_with_shape(q), jnp.float32).astype(cdt)
  return jnp.einsum(geometry.call_einsum_str(x.ndim), x.astype(cdt), kernel,
                    precision=precision, preferred_element_type=acc,
                    out_sharding=out_sharding)


def quantized_einsum(
    x: jax.Array,
    qarray: QArray,
    geometry: Geometry,
    *,
    precision: Any = None,
    compute_dtype: Any = None,
    preferred_element_type: Any = None,
    strategy: str = 'auto',
    out_sharding: Any = None,
) -> jax.Array:
  """`einsum(x, dequantize(qarray))` in the layout of `geometry`, no bias.

  Args:
    x: the (already dtype-promoted) inputs.
    qarray: the quantized kernel of one layer (no stacking axes: slice them
      off first, e.g. inside `nnx.vmap`).
    geometry: the layer's `peft.geometry.Geometry`.
    precision: `lax.Precision` of the dots.
    compute_dtype: dtype the weights are dequantized to and the dots take
      (default: `x.dtype`); they accumulate in at least float32.
    preferred_element_type: dtype of the result (default: `compute_dtype`).
    strategy: `'auto'`, `'blockwise'` or `'fused'` (see the module doc).
    out_sharding: passed to the einsum (then the kernel is dequantized whole).

  Returns:
    The contraction, shaped like the layer's output.

  Raises:
    ValueError: `qarray` has leading stacking axes, or `x` does not fit it.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft.geometry import Geometry
    >>> from peft.quantization import quantize
    >>> g = Geometry.from_einsum('ebd,edf->ebf', (2, 32, 8))
    >>> q = quantize(jnp.ones((2, 32, 8)), 'int8', axis_to_reduce=(1,))
    >>> quantized_einsum(jnp.ones((2, 3, 32)), q, g).shape
    (2, 3, 8)
  """
  strategy = choose_strategy(strategy, x)
  k_shape = kernel_shape(qarray)
  if len(k_shape) != len(geometry.kernel_shape):
    raise ValueError(
        f'The quantized kernel has shape {k_shape}, with leading stacking axes'
        f' in front of the layer kernel {geometry.kernel_shape} (the layer was'
        ' built under nnx.vmap); call it inside nnx.vmap / nnx.scan, which'
        ' slice the stacking axes off.'
    )
  cdt = jnp.dtype(compute_dtype if compute_dtype is not None else x.dtype)
  acc = jnp.promote_types(cdt, jnp.float32)
  out_dtype = preferred_element_type or cdt
  plan = _plan(geometry, x.ndim) if out_sharding is None else None
  method = qarray.method
  if plan is not None:
    nb, nk = plan.nb, plan.nk
    kb, kk, kn = k_shape[:nb], k_shape[nb:nb + nk], k_shape[nb + nk:]
    per_channel = method in _SCALED and tuple(qarray.scale.shape) == (
        geometry.channel_scale_shape())
    if method is QuantizationMethod.Q4_0_TRANSPOSE and len(kn) != 1:
      plan = None
    elif method not in _BLOCKWISE or not _blocks_along_contracted(
        qarray, geometry, k_shape, per_channel):
      plan = None
    elif not per_channel and strategy == 'fused':
      plan = None  # the dequantizing expression feeds the dot
  if plan is None:
    y = _dequantized_einsum(x, qarray, geometry, cdt, acc, precision,
                            out_sharding)
    return y.astype(out_dtype)

  xt = jnp.transpose(x, plan.x_perm)
  xb = xt.shape[:plan.nb]
  xf = xt.shape[plan.nb:xt.ndim - plan.nk]
  xk = xt.shape[xt.ndim - plan.nk:]
  if tuple(xb) != tuple(kb) or tuple(xk) != tuple(kk):
    raise ValueError(
        f'inputs of shape {x.shape} do not fit the quantized kernel of shape'
        f' {k_shape}: batch axes {tuple(xb)} vs {tuple(kb)}, contracted axes'
        f' {tuple(xk)} vs {tuple(kk)}.'
    )
  b, m, k, n = math.prod(kb), math.prod(xf), math.prod(kk), math.prod(kn)
  xc = xt.reshape(b, m, k).astype(cdt)
  dims = (b, k, n)
  if b * m * k * n == 0:  # an empty axis: nothing to contract
    y = jnp.zeros((b, m, n), acc)
  elif strategy == 'fused':  # per-channel INT / FP8: scale after the dot
    values = qarray.values.reshape(b, k, n).astype(cdt)
    scale = qarray.scale.astype(acc).reshape(b, 1, n)
    y = _bmm(xc, values, precision, acc) / scale
  elif method is QuantizationMethod.Q4_0:
    y = _q4_0_blockwise(xc, qarray, dims, cdt, acc, precision)
  elif method is QuantizationMethod.Q4_0_TRANSPOSE:
    y = _q4_0_transpose_blockwise(xc, qarray, dims, kk[-1], cdt, acc,
                                  precision)
  elif method is QuantizationMethod.NF4:
    y = _nf4_blockwise(xc, qarray, dims, cdt, acc, precision)
  elif not per_channel:
    groups = math.prod(qarray.scale.shape) // (b * n)
    y = _grouped_blockwise(xc, qarray, dims, groups, cdt, acc, precision)
  else:
    scale = qarray.scale.astype(acc).reshape(b, 1, n)
    y = _int_blockwise(xc, qarray, dims, cdt, acc, precision) / scale
  y = y.astype(out_dtype).reshape(*xb, *xf, *kn)
  if plan.out_perm is not None:
    y = jnp.transpose(y, plan.out_perm)
  return y

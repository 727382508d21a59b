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
from jax import lax
import jax.numpy as jnp

from peft.geometry import Geometry
from peft.quantization import QArray
from peft.quantization import QuantizationMethod
from peft.quantization import dequantize
from peft.quantization import scale_shape
from peft.nf4 import NF4_CODEBOOK
from peft.quant_nf4 import _absmax as _nf4_absmax

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
_BLOCKWISE = (*_SCALED, QuantizationMethod.Q4_0,
              QuantizationMethod.Q4_0_TRANSPOSE, QuantizationMethod.NF4)
# Elements of the float32 weight chunk dequantized per loop step (4 MiB): big
# enough for an efficient matmul, small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 20


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


def _sum_chunks(total, size, fn, init):
  """`init + sum(fn(start, n))` over chunks of `size` covering `[0, total)`.

  `fn` is rematerialised in the backward pass (`jax.checkpoint`), so a
  gradient through the loop does not save every dequantized chunk (which
  would add up to the whole float kernel).
  """
  fn = jax.checkpoint(fn, static_argnums=(1,))
  count, tail = divmod(total, size)
  acc = init
  add = lambda a, b: jax.tree.map(jnp.add, a, b)
  if count == 1:
    acc = add(acc, fn(0, size))
  elif count > 1:
    acc = lax.fori_loop(
        0, count, lambda i, a: add(a, fn(i * size, size)), acc
    )
  if tail:
    acc = add(acc, fn(count * size, tail))
  return acc


def _map_chunks(total, size, fn, out, axis):
  """Writes `fn(start, n)` into `out` along `axis`, chunk by chunk."""
  fn = jax.checkpoint(fn, static_argnums=(1,))
  count, tail = divmod(total, size)
  put = lambda o, start, n: lax.dynamic_update_slice_in_dim(
      o, fn(start, n), start, axis
  )
  if count == 1:
    out = put(out, 0, size)
  elif count > 1:
    out = lax.fori_loop(0, count, lambda i, o: put(o, i * size, size), out)
  if tail:
    out = put(out, count * size, tail)
  return out


def _chunk(total: int, per_row: int) -> int:
  return max(1, min(total, _CHUNK_ELEMENTS // max(1, per_row)))


def _bmm(x, w, precision, acc_dtype):
  """`(B, M, K) x (B, K, N) -> (B, M, N)`."""
  return lax.dot_general(
      x, w, (((2,), (1,)), ((0,), (0,))),
      precision=precision, preferred_element_type=acc_dtype,
  )


def _int_blockwise(xc, q, dims, cdt, acc, precision):
  """Per-channel INT4/INT8/FP8: `sum_k x[k] * values[k]`, then divide by
  scale."""
  b, k, n = dims
  fp8 = q.method is QuantizationMethod.FP8
  values = _fp8_bits(q.values).reshape(b, k, n)
  m = xc.shape[1]
  if q.method is QuantizationMethod.INT4 and n % 2 == 0:
    # Two int4 per byte (low nibble = even column): unpack with shifts,
    # which XLA vectorises, instead of converting int4 element by element.
    packed = lax.bitcast_convert_type(values.reshape(b, k, n // 2, 2), jnp.int8)

    def part(start, size):
      xs = lax.dynamic_slice_in_dim(xc, start, size, 2)
      p = lax.dynamic_slice_in_dim(packed, start, size, 1)
      lo = lax.shift_right_arithmetic(lax.shift_left(p, jnp.int8(4)), jnp.int8(4))
      hi = lax.shift_right_arithmetic(p, jnp.int8(4))
      return (_bmm(xs, lo.astype(cdt), precision, acc),
              _bmm(xs, hi.astype(cdt), precision, acc))

    zero = jnp.zeros((b, m, n // 2), acc)
    lo, hi = _sum_chunks(k, _chunk(k, b * n), part, (zero, zero))
    return jnp.stack([lo, hi], axis=-1).reshape(b, m, n)

  def part(start, size):
    xs = lax.dynamic_slice_in_dim(xc, start, size, 2)
    v = lax.dynamic_slice_in_dim(values, start, size, 1)
    return _bmm(xs, _as_f32(v, fp8).astype(cdt), precision, acc)

  return _sum_chunks(k, _chunk(k, b * n), part, jnp.zeros((b, m, n), acc))


def _fp8_bits(values):
  """float8_e4m3fn storage as its uint8 bits (anything else unchanged).

  Done once, outside the loop: XLA:CPU otherwise widens the whole float8
  array to float16 in front of the loop (a 2-byte copy of the kernel).
  """
  if values.dtype == jnp.float8_e4m3fn:
    return lax.bitcast_convert_type(values, jnp.uint8)
  return values


def _as_f32(v, fp8_bits=False):
  """Stored values as float32; float8_e4m3fn (`fp8_bits`: its uint8 bits
  from `_fp8_bits`) decoded with integer ops.

  XLA:CPU converts float8 to float32 element by element; the bits are quick
  to rebuild: a normal e4m3fn value (exponent field >= 1) is the float32 with
  the same sign, exponent + 120 and mantissa << 20; a subnormal one is
  `mantissa * 2**-9`. Exact for every finite e4m3fn value (the codes hold no
  NaN: `quantize` clips to +-448).
  """
  if not fp8_bits:
    return v.astype(jnp.float32)
  b = v.astype(jnp.uint32)
  em = b & 0x7F
  normal = lax.bitcast_convert_type((em << 20) + jnp.uint32(120 << 23),
                                    jnp.float32)
  magnitude = jnp.where(em >= 8, normal,
                        em.astype(jnp.float32) * jnp.float32(2.0**-9))
  return jnp.where(b >= 128, -magnitude, magnitude)


def _nf4_lookup(codes):
  """`NF4_CODEBOOK[codes]` as a tree of selects on the code bits (vector
  friendly, unlike a gather on CPU)."""
  codes = codes.astype(jnp.int32)
  level = [jnp.float32(v) for v in NF4_CODEBOOK]
  bit = 0
  while len(level) > 1:
    odd = ((codes >> bit) & 1) == 1
    level = [jnp.where(odd, level[i + 1], level[i])
             for i in range(0, len(level), 2)]
    bit += 1
  return level[0]


def _chunk_multiple(total: int, per_row: int, multiple: int) -> int:
  """`_chunk`, rounded down to a multiple of `multiple` (at least one)."""
  return max(multiple, _chunk(total, per_row) // multiple * multiple)


def _grouped_blockwise(xc, q, dims, groups, cdt, acc, precision):
  """INT4 / INT8 / FP8 with `groups` scales along K: each chunk of whole
  groups is dequantized (`values * (1 / scale)`) and fed to the dot."""
  b, k, n = dims
  g = k // groups
  fp8 = q.method is QuantizationMethod.FP8
  values = _fp8_bits(q.values).reshape(b, k, n)
  recip = (jnp.float32(1.0) / q.scale.astype(jnp.float32)).reshape(
      b, groups, 1, n)
  m = xc.shape[1]
  size = _chunk_multiple(k, b * n, g)
  if q.method is QuantizationMethod.INT4 and n % 2 == 0:
    # Nibbles unpacked with shifts (as `_int_blockwise`), each half scaled
    # by its columns' reciprocals.
    packed = lax.bitcast_convert_type(values.reshape(b, k, n // 2, 2),
                                      jnp.int8)
    r_lo, r_hi = recip[..., 0::2], recip[..., 1::2]

    def halves(start, size):
      xs = lax.dynamic_slice_in_dim(xc, start, size, 2)
      p = lax.dynamic_slice_in_dim(packed, start, size, 1)
      lo = lax.shift_right_arithmetic(lax.shift_left(p, jnp.int8(4)),
                                      jnp.int8(4))
      hi = lax.shift_right_arithmetic(p, jnp.int8(4))
      out = []
      for nib, r in ((lo, r_lo), (hi, r_hi)):
        r = lax.dynamic_slice_in_dim(r, start // g, size // g, 1)
        w = nib.astype(jnp.float32).reshape(b, size // g, g, n // 2) * r
        out.append(_bmm(xs, w.reshape(b, size, n // 2).astype(cdt),
                        precision, acc))
      return tuple(out)

    zero = jnp.zeros((b, m, n // 2), acc)
    lo, hi = _sum_chunks(k, size, halves, (zero, zero))
    return jnp.stack([lo, hi], axis=-1).reshape(b, m, n)

  def part(start, size):
    xs = lax.dynamic_slice_in_dim(xc, start, size, 2)
    v = lax.dynamic_slice_in_dim(values, start, size, 1)
    r = lax.dynamic_slice_in_dim(recip, start // g, size // g, 1)
    w = _as_f32(v, fp8).reshape(b, size // g, g, n) * r
    return _bmm(xs, w.reshape(b, size, n).astype(cdt), precision, acc)

  return _sum_chunks(k, size, part, jnp.zeros((b, m, n), acc))


def _nf4_blockwise(xc, q, dims, cdt, acc, precision):
  """NF4: byte row j holds contracted elements 2j (high) and 2j + 1 (low);
  chunks of whole blocks, the codebook looked up per chunk."""
  b, k, n = dims
  blocks = k // q.group_size
  half = q.group_size // 2
  axes = tuple(a % q.values.ndim for a in q.axes)
  absmax = _nf4_absmax(q.scale, q.stats, axes).reshape(b, blocks, 1, n)
  values = q.values.reshape(b, k // 2, n)
  x_hi, x_lo = xc[:, :, 0::2], xc[:, :, 1::2]
  m = xc.shape[1]

  def part(start, size):  # rows [start, start + size) of the byte array
    v = lax.dynamic_slice_in_dim(values, start, size, 1)
    a = lax.dynamic_slice_in_dim(absmax, start // half, size // half, 1)

    def dequantized(codes):
      w = _nf4_lookup(codes).reshape(b, size // half, half, n)
      return (w * a).reshape(b, size, n).astype(cdt)

    xh = lax.dynamic_slice_in_dim(x_hi, start, size, 2)
    xl = lax.dynamic_slice_in_dim(x_lo, start, size, 2)
    return (_bmm(xh, dequantized(v >> 4), precision, acc)
            + _bmm(xl, dequantized(v & 15), precision, acc))

  size = _chunk_multiple(k // 2, b * n * 2, half)
  return _sum_chunks(k // 2, size, part, jnp.zeros((b, m, n), acc))


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


def _nibbles(v, d, cdt):
  """Q4_0 bytes and scales -> the dequantized low and high halves of blocks."""
  d = d.astype(jnp.float32)[..., None]
  lo = (v & 0x0F).astype(jnp.float32) - jnp.float32(8.0)
  hi = (v >> 4).astype(jnp.float32) - jnp.float32(8.0)
  return (d * lo).astype(cdt), (d * hi).astype(cdt)


def _q4_0_blockwise(xc, q, dims, cdt, acc, precision):
  """Q4_0 with blocks along N: chunk over K, split each block in halves."""
  b, k, n = dims
  g = n // _Q4_0_BLOCK
  values = q.values.reshape(b, k, g, _Q4_0_BLOCK // 2)
  scale = q.scale.reshape(b, k, g)
  m = xc.shape[1]

  def part(start, size):
    xs = lax.dynamic_slice_in_dim(xc, start, size, 2)
    v = lax.dynamic_slice_in_dim(values, start, size, 1)
    d = lax.dynamic_slice_in_dim(scale, start, size, 1)
    lo, hi = _nibbles(v, d, cdt)
    half = (b, size, n // 2)
    return (_bmm(xs, lo.reshape(half), precision, acc),
            _bmm(xs, hi.reshape(half), precision, acc))

  zero = jnp.zeros((b, m, n // 2), acc)
  lo, hi = _sum_chunks(k, _chunk(k, b * n), part, (zero, zero))
  half = (b, m, g, _Q4_0_BLOCK // 2)
  return jnp.concatenate([lo.reshape(half), hi.reshape(half)], -1).reshape(
      b, m, n
  )


def _q4_0_transpose_blockwise(xc, q, dims, k_last, cdt, acc, precision):
  """Q4_0_TRANSPOSE (blocks along the last contracted axis, one output axis).

  The storage holds the kernel's columns as rows of blocks, so the loop runs
  over chunks of output columns, each a full contraction.
  """
  b, k, n = dims
  k1 = k // k_last
  g = k_last // _Q4_0_BLOCK
  h = _Q4_0_BLOCK // 2
  values = q.values.reshape(b, k1, n, g, h)
  scale = q.scale.reshape(b, k1, n, g)
  m = xc.shape[1]
  x6 = xc.reshape(b, m, k1, g, 2, h)
  x_lo = x6[:, :, :, :, 0].reshape(b, m, k1, g * h)
  x_hi = x6[:, :, :, :, 1].reshape(b, m, k1, g * h)
  dims_ = (((1, 3), (2, 3)), ((0,), (0,)))  # w (b,k1,nc,gh) . x (b,m,k1,gh)

  def part(start, size):
    v = lax.dynamic_slice_in_dim(values, start, size, 2)
    d = lax.dynamic_slice_in_dim(scale, start, size, 2)
    lo, hi = _nibbles(v, d, cdt)
    shape = (b, k1, size, g * h)
    y = lax.dot_general(lo.reshape(shape), x_lo, dims_, precision=precision,
                        preferred_element_type=acc)
    return y + lax.dot_general(hi.reshape(shape), x_hi, dims_,
                               precision=precision, preferred_element_type=acc)

  out = jnp.zeros((b, n, m), acc)
  out = _map_chunks(n, _chunk(n, b * k), part, out, 1)
  return jnp.swapaxes(out, 1, 2)


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

"""The chunked, dequantizing contractions behind `peft.kernels` (CPU path).

Each function computes `(B, M, K) x (B, K, N) -> (B, M, N)` with a quantized
`(B, K, N)` kernel, dequantizing it chunk by chunk inside a `lax.fori_loop`
(about `peft.kernels._CHUNK_ELEMENTS` float32 weights per step), so the float kernel is
never materialised: per-channel INT4 / INT8 / FP8 (scale after the dot),
group-wise scales and NF4 blocks (whole groups per chunk), and ggml Q4_0 /
Q4_0_TRANSPOSE (nibbles unpacked per chunk). `peft.kernels.quantized_einsum`
chooses among them.

Examples:
  >>> import jax.numpy as jnp
  >>> _nf4_lookup(jnp.array([0, 7, 15], jnp.uint8)).tolist()
  [-1.0, 0.0, 1.0]
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from peft.nf4 import NF4_CODEBOOK
from peft.quant_nf4 import _absmax as _nf4_absmax
from peft.quantization import QuantizationMethod

__all__ = []

_Q4_0_BLOCK = 32


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
  """Rows per chunk: `peft.kernels._CHUNK_ELEMENTS` weights, read at trace
  time (the tunable lives in `peft.kernels`; tests shrink it)."""
  from peft import kernels  # pylint: disable=g-import-not-at-top
  return max(1, min(total, kernels._CHUNK_ELEMENTS // max(1, per_row)))  # pylint: disable=protected-access


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

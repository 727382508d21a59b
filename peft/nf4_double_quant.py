"""bitsandbytes' double quantization of NF4 block statistics, bit for bit.

With `compress_statistics=True` bitsandbytes stores the float32 absmax of
each NF4 block as `offset = mean(absmax)` (torch's float32 sum order,
`_torch_sum`) and the 8-bit codes of `absmax - offset` in its signed dynamic
map (`_DYNAMIC_CODE`), blockwise in blocks of 256 with one float32 scale per
block (`_quantize_dynamic` / `_dequantize_dynamic`). `peft.nf4` uses these.

Examples:
  >>> import jax.numpy as jnp
  >>> x = jnp.array([0.5, -1.0, 0.0])
  >>> codes, scale = _quantize_dynamic(x)
  >>> codes.dtype, scale.tolist()  # one block of 256, scale max|x|
  (dtype('uint8'), [1.0])
  >>> bool(jnp.abs(_dequantize_dynamic(codes, scale) - x).max() < 0.01)
  True
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = []

_DQ_BLOCK = 256  # bitsandbytes' block size for the absmax statistics.
_SUM_LANES = 8  # torch's float32 vector width in its CPU cascade sum.


def _torch_linspace_01(steps: int) -> np.ndarray:
  """`torch.linspace(0.1, 1, steps)` in float32, as torch's CPU kernel computes it."""
  start, end = np.float32(0.1), np.float32(1.0)
  step = float(np.float32((end - start) / np.float32(steps - 1)))
  i = np.arange(steps)
  # start + step * i from the front half, end - step * (steps - 1 - i) from
  # the back half, each with one rounding (a fused multiply-add).
  both = np.where(i < steps // 2, float(start) + step * i,
                  float(end) - step * (steps - 1 - i))
  return both.astype(np.float32)


def _dynamic_code() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), float32."""
  parts = [np.array([0.0, 1.0], np.float32)]
  for i in range(7):
    bounds = _torch_linspace_01(2**i + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    scale = np.float32(10.0**(i - 6))
    parts += [means * scale, means * -scale]
  code = np.sort(np.concatenate(parts)).astype(np.float32)
  code.setflags(write=False)
  return code


_DYNAMIC_CODE = _dynamic_code()


def _dynamic_lut() -> np.ndarray:
  """bitsandbytes' CPU lookup table: grid point g in [0, 65535] -> 8-bit code.

  Grid point g stands for the value 2 g / 65535 - 1 (float32 operations); its
  code is the number of midpoints of the dynamic map strictly below it.
  """
  mid = (_DYNAMIC_CODE[:-1] + _DYNAMIC_CODE[1:]) * np.float32(0.5)
  g = np.arange(65536, dtype=np.float32)
  grid = (g + g) / np.float32(65535) - np.float32(1)
  lut = np.minimum(np.searchsorted(mid, grid, side='left'), 255)
  lut = lut.astype(np.uint8)
  lut.setflags(write=False)
  return lut


_DYNAMIC_LUT = _dynamic_lut()


def _blocks(flat: jax.Array, block_size: int) -> jax.Array:
  """`[n]` -> `[ceil(n / block_size), block_size]`, the short block zero-padded."""
  n = flat.shape[0]
  n_blocks = -(-n // block_size)
  flat = jnp.pad(flat, (0, n_blocks * block_size - n))
  return flat.reshape(n_blocks, block_size)


def _seq_sum(x: jax.Array) -> jax.Array:
  """Sums over the leading axis strictly in order: ((0 + x0) + x1) + ..."""
  zero = jnp.zeros(x.shape[1:], x.dtype)
  if x.shape[0] == 0:
    return zero
  total, _ = jax.lax.scan(lambda acc, v: (acc + v, None), zero, x)
  return total


def _grouped_seq_sum(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
  """In-order sums of full groups of `group` rows, and of the rows left over."""
  full = x.shape[0] // group
  head = x[:full * group].reshape((full, group) + x.shape[1:])
  head = jnp.moveaxis(head, 1, 0)
  return _seq_sum(head), _seq_sum(x[full * group:])


def _torch_sum(x: jax.Array) -> jax.Array:
  """float32 sum of a 1-D array in the order of torch's CPU cascade sum.

  torch reads the row as vectors of 8 lanes (scalars when shorter than 8),
  4 interleaved accumulators (ILP), and a 3-level cascade of partial sums of
  `2**p` terms each, p = max(4, ceil(log2(terms)) // 4); the leftover
  vectors, the accumulators, the tail scalars and the lanes are then added
  in a fixed order. Every addition here is a float32 addition in that order.
  """
  n = x.shape[0]
  lanes = _SUM_LANES if n >= _SUM_LANES else 1
  n_vec = n // lanes
  vecs = x[:n_vec * lanes].reshape(n_vec, lanes)
  n_ilp = n_vec // 4
  rows = vecs[:n_ilp * 4].reshape(n_ilp, 4, lanes)
  power = max(4, (math.ceil(math.log2(n_ilp)) if n_ilp > 1 else 0) // 4)
  step = 1 << power
  chunks, acc0 = _grouped_seq_sum(rows, step)     # level 0, per chunk
  groups, acc1 = _grouped_seq_sum(chunks, step)   # level 1
  supers, acc2 = _grouped_seq_sum(groups, step)   # level 2
  acc3 = _seq_sum(supers)                         # level 3
  acc = ((acc0 + acc1) + acc2) + acc3             # [4, lanes]
  first = _seq_sum(jnp.concatenate([acc[0][None], vecs[n_ilp * 4:]]))
  partial = ((first + acc[1]) + acc[2]) + acc[3]  # [lanes]
  if lanes == 1:
    return partial[0]
  tail = x[n_vec * lanes:]
  return _seq_sum(jnp.concatenate([tail, partial]))


def _no_fma(x: jax.Array) -> jax.Array:
  """Keeps XLA from fusing the product `x` into a following addition (FMA).

  bitsandbytes rounds the product before adding; XLA on CPU contracts
  `a * b + c` into one fused multiply-add unless the product passes through
  a select.
  """
  return jnp.where(jnp.isnan(x), jnp.zeros_like(x), x)


def _runtime_constant(like: jax.Array, value: float) -> jax.Array:
  """`value` as a float32 that XLA cannot constant-fold.

  XLA rewrites a division by a constant into a multiplication by its rounded
  reciprocal, which is not the float32 quotient torch computes.
  """
  return jnp.where(jnp.isnan(like), np.float32(1), np.float32(value))


def _quantize_dynamic(values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bitsandbytes' CPU 8-bit blockwise quantization (blocks of 256, dynamic map).

  Per block: a = max |v|; y = clip(v * (1 / a), -1, 1); the grid point
  g = trunc(fma((y + 1) / 2, 65535, 0.5)) indexes a 65536-entry lookup
  table of codes. The fused multiply-add is evaluated exactly in integers:
  y + 1 is a multiple of 2**-24 in [0, 2], so (y + 1) / 2 = k * 2**-25.
  """
  m = values.shape[0]
  blocks = _blocks(values, _DQ_BLOCK)
  scale = jnp.max(jnp.abs(blocks), axis=1)
  inv = 1.0 / jnp.where(scale > 0, scale, 1.0)
  y = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
  k = ((y + 1.0) * np.float32(2**24)).astype(jnp.int32)  # exact, in [0, 2**25]
  # e = (k * 65535 + 2**24) / 2**25 = q + r / 2**25, with k = hi * 512 + lo.
  hi, lo = k >> 9, k & 511
  rest = lo * 65536 - k + (1 << 24)          # |rest| < 2**26: no overflow
  q = hi + (rest >> 25)                      # floor division by 2**25
  r = rest & ((1 << 25) - 1)
  # float32 rounding of e reaches q + 1 iff 1 - r / 2**25 is at most half an
  # ulp of e, i.e. 2**25 - r <= 2**(bit_length(q)) (ties round to the integer).
  bit_length = 32 - jax.lax.clz(q)
  g = q + ((1 << 25) - r <= (1 << bit_length)).astype(jnp.int32)
  codes = jnp.asarray(_DYNAMIC_LUT)[g]
  codes = jnp.where(scale[:, None] > 0, codes, jnp.uint8(0))
  return codes.reshape(-1)[:m], scale


def _dequantize_dynamic(codes: jax.Array, scale: jax.Array) -> jax.Array:
  m = codes.shape[0]
  values = jnp.asarray(_DYNAMIC_CODE)[codes.astype(jnp.int32)]
  return (_blocks(values, _DQ_BLOCK) * scale[:, None]).reshape(-1)[:m]

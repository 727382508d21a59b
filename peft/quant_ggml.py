"""ggml's Q4_0 block codec (llama.cpp): blocks of 32 values, one float16 scale.

Bit-exact with ggml / `gguf.quants`: see `_q4_0_encode`. `pack_q4_0` and
`unpack_q4_0` convert between codes and ggml's nibble layout.

Examples:
  >>> import jax.numpy as jnp
  >>> codes = jnp.arange(32, dtype=jnp.uint8) % 16
  >>> bool((unpack_q4_0(pack_q4_0(codes)) == codes).all())
  True
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from peft.quant_codecs import _finite
from peft.quant_codecs import _reduce_finite
from peft.quant_methods import Q4_0_BLOCK_SIZE

__all__ = ['pack_q4_0', 'unpack_q4_0']


def _q4_0_blocks(x: jax.Array, transpose: bool) -> tuple[jax.Array, int]:
  """Reshapes so that each block of 32 is one axis; returns (blocks, axis)."""
  if transpose:  # (*lead, K, N) -> (*lead, K // 32, 32, N); blocks on axis -2.
    *lead, k, n = x.shape
    return x.reshape(*lead, k // Q4_0_BLOCK_SIZE, Q4_0_BLOCK_SIZE, n), -2
  *lead, k = x.shape  # (*lead, K) -> (*lead, K // 32, 32); blocks on axis -1.
  return x.reshape(*lead, k // Q4_0_BLOCK_SIZE, Q4_0_BLOCK_SIZE), -1


def _q4_0_encode(blocks: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """ggml's Q4_0 of float32 `blocks` along `axis` (size 32).

  Returns `(q, d)`: `q` the float codes in [0, 15], `d` the float32 scale with
  `axis` kept as size 1 (stored as float16 by ggml). `d` comes from the
  finite values of the block only (as if NaN and inf were 0, see
  `_reduce_finite`); `q` is garbage where `blocks` is not finite.
  """
  # m = the value of largest magnitude with its sign; on ties the first one.
  # (Two plain reductions: on XLA:CPU reducing abs(blocks) over a block axis
  # materializes abs(blocks) first and is slower.)
  x_max, x_min = _reduce_finite(
      lambda b: (
          jnp.max(b, axis=axis, keepdims=True),
          jnp.min(b, axis=axis, keepdims=True),
      ),
      blocks,
  )
  amax = jnp.abs(jnp.maximum(x_max, -x_min))
  m = jnp.where(x_max > -x_min, x_max, x_min)
  # A tie: the block holds both +a and -a as its largest magnitude, or is all
  # zeros (+0.0 and -0.0; the sign of d is part of ggml's bytes). The first
  # one wins, which needs a second pass over the data, done only if some
  # block has a tie.
  tie = x_max == -x_min

  def resolve_ties(m):
    blocks_f = _finite(blocks)  # a NaN or inf position counts as 0 here too
    index = lax.broadcasted_iota(jnp.int32, blocks.shape, blocks.ndim + axis)
    # Among the maxima the largest key wins, i.e. the smallest index; its low
    # bit is that element's sign bit.
    key = jnp.where(
        jnp.abs(blocks_f) == amax,
        (Q4_0_BLOCK_SIZE - index) * 2
        + jnp.signbit(blocks_f).astype(jnp.int32),
        0,
    )
    negative = (jnp.max(key, axis=axis, keepdims=True) & 1) == 1
    return jnp.where(tie, jnp.where(negative, -amax, amax), m)

  m = lax.cond(jnp.any(tie), resolve_ties, lambda m: m, m)
  d = m / jnp.float32(-8.0)
  # ggml multiplies by the float32 reciprocal of the float32 d (not divides).
  inv_d = jnp.where(d == 0, jnp.float32(0.0), jnp.float32(1.0) / d)
  # ggml rounds x * inv_d to float32 before adding 8.5. Left alone, XLA (CPU
  # and GPU) contracts the multiply-add into one FMA with a single rounding,
  # which changes about one block in 60k. OR-ing isnan(d) into the product's
  # bits is an integer no-op the compiler cannot see through (if d is NaN,
  # the product is NaN and stays NaN), so both roundings happen.
  product = lax.bitcast_convert_type(blocks * inv_d, jnp.int32)
  product = product | jnp.isnan(d).astype(jnp.int32)
  product = lax.bitcast_convert_type(product, jnp.float32)
  # product >= -8 * (1 + 2**-22), so product + 8.5 > 0 and floor == trunc.
  q = jnp.minimum(jnp.floor(product + jnp.float32(8.5)), jnp.float32(15.0))
  return q, d


def _q4_0_scale_f32(d: jax.Array) -> jax.Array:
  """The float16 scale ggml stores, back in float32."""
  return d.astype(jnp.float16).astype(jnp.float32)


def _simulate_q4_0(x: jax.Array, transpose: bool) -> jax.Array:
  """Fake Q4_0 (garbage where `x` is not finite)."""
  blocks, axis = _q4_0_blocks(x, transpose)
  q, d = _q4_0_encode(blocks, axis)
  return (_q4_0_scale_f32(d) * (q - jnp.float32(8.0))).reshape(x.shape)


def pack_q4_0(codes: jax.Array) -> jax.Array:
  """Packs 4-bit codes `(..., 32)` into ggml's Q4_0 nibble layout `(..., 16)`.

  Byte `i` of a block holds code `i` in its low nibble and code `i + 16` in its
  high nibble. Codes are unsigned (0..15, the dequantized value being
  `d * (code - 8)`).

  Examples:
    >>> import jax.numpy as jnp
    >>> codes = jnp.arange(32, dtype=jnp.uint8) % 16
    >>> pack_q4_0(codes)[:2]  # 0 | (0 << 4), 1 | (1 << 4)
    Array([ 0, 17], dtype=uint8)
  """
  codes = jnp.asarray(codes)
  if codes.ndim < 1 or codes.shape[-1] != Q4_0_BLOCK_SIZE:
    raise ValueError(
        f'pack_q4_0: `codes` must have a last axis of {Q4_0_BLOCK_SIZE} (one'
        f' block), got shape {codes.shape}.'
    )
  codes = codes.astype(jnp.uint8)
  half = Q4_0_BLOCK_SIZE // 2
  return (codes[..., :half] & 0x0F) | ((codes[..., half:] & 0x0F) << 4)


def unpack_q4_0(values: jax.Array) -> jax.Array:
  """Unpacks Q4_0 nibbles `(..., 16)` uint8 into codes `(..., 32)` uint8.

  Inverse of `pack_q4_0`: element `i` is the low nibble of byte `i`, element
  `i + 16` its high nibble. Codes are in 0..15; values are `d * (code - 8)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> codes = jnp.arange(32, dtype=jnp.uint8) % 16
    >>> bool((unpack_q4_0(pack_q4_0(codes)) == codes).all())
    True
  """
  values = jnp.asarray(values)
  if values.ndim < 1 or values.shape[-1] != Q4_0_BLOCK_SIZE // 2:
    raise ValueError(
        f'unpack_q4_0: `values` must have a last axis of'
        f' {Q4_0_BLOCK_SIZE // 2} (one packed block), got shape'
        f' {values.shape}.'
    )
  if values.dtype != jnp.uint8:
    raise ValueError(
        f'unpack_q4_0: `values` must be uint8 packed nibbles, got dtype'
        f' {values.dtype}.'
    )
  return jnp.concatenate([values & 0x0F, values >> 4], axis=-1)

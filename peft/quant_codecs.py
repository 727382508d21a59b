"""The scaled codecs (INT4, INT8, FP8, SFP8) and the special-value checks.

Pure `jax.numpy` on float32 arrays: scales per channel or group from the
finite values (`_grouped_abs_max`), the codes of each method and their fake
quantization. `peft.quantization` holds the public API built on them.

Examples:
  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0.5], [-1.0]])
  >>> _simulate_scaled(x, QuantizationMethod.INT4, (1, 1))[:, 0]
  Array([ 0.5714286, -1.       ], dtype=float32)
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from peft.quant_methods import FP8_MAX
from peft.quant_methods import QuantizationMethod
from peft.quant_methods import _INT_BITS
from peft.quant_methods import _MIN_SCALE
from peft.quant_methods import _SCALED_QMAX
from peft.quant_methods import _SFP8_DOUBLE_STEP_BELOW
from peft.quant_methods import _SFP8_HUGE_MAX
from peft.quant_methods import _SFP8_MAX
from peft.quant_methods import _SFP8_MIN_SCALE
from peft.quant_methods import _SFP8_PRESCALE
from peft.quant_methods import _SFP8_SMALLEST
from peft.quant_methods import _SFP8_ZERO_AT_OR_BELOW_F32
from peft.quant_methods import _split_for_scale

__all__ = []

# ----------------------------------------------------------------------------
# Special values.

# Q4_0 stores d = max / -8 as float16; |d| >= 65520 (half-way between the
# largest float16, 65504, and 65536) rounds to inf, i.e. |max| >= 8 * 65520.
_Q4_0_MAX_MAGNITUDE = 8.0 * 65520.0


def _finite(x: jax.Array) -> jax.Array:
  """`x` with NaN and +-inf replaced by 0."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def _reduce_finite(reduce_fn, x: jax.Array):
  """`reduce_fn(_finite(x))`: scales see the finite values of `x` only.

  A max reduction cannot be trusted with NaN: XLA's CPU max propagates NaN for
  some shapes and drops it (or the values before it) for others, and a NaN or
  infinite channel max would poison the whole channel. Masking first costs a
  full extra pass (the fast reduction cannot fuse the mask), so `reduce_fn`
  runs on `x` as is, and again on the masked `x` only if the sum of `x` is not
  finite: a sum holding a NaN is NaN in any order, one holding an inf is inf
  or NaN (an overflowing sum of finite values just takes the masked path).
  """
  raw = reduce_fn(x)
  has_nonfinite = ~jnp.isfinite(jnp.sum(x))
  return lax.cond(
      has_nonfinite,
      lambda x, raw: reduce_fn(_finite(x)),
      lambda x, raw: raw,
      x,
      raw,
  )


def _special_value_stats(x: jax.Array, q4_0: bool) -> jax.Array:
  """int32 `[n_nonfinite, first_nonfinite, n_huge, first_huge, *values]`.

  `huge` counts the finite values too large for Q4_0's float16 scale (0 when
  `q4_0` is False); `first_*` are flat indices (meaningless when the count is
  0) and `values` the float32 bits of the values there, so that the message
  needs nothing but these statistics (`x` may be a tracer with concrete
  statistics, e.g. under `jax.grad`).
  """
  flat = x.reshape(-1)
  nonfinite = ~jnp.isfinite(flat)
  if q4_0:
    huge = jnp.abs(flat) >= jnp.float32(_Q4_0_MAX_MAGNITUDE)
    huge = huge & ~nonfinite
    huge_stats = [
        jnp.sum(huge, dtype=jnp.int32),
        jnp.argmax(huge).astype(jnp.int32),
    ]
  else:
    # Literal zeros: an argmax over a constant array would be constant-folded
    # by XLA, which takes minutes for a 1024 x 1024 array.
    huge_stats = [jnp.int32(0), jnp.int32(0)]
  first_nonfinite = jnp.argmax(nonfinite).astype(jnp.int32)
  values = flat[jnp.stack([first_nonfinite, huge_stats[1]])]
  return jnp.stack([
      jnp.sum(nonfinite, dtype=jnp.int32),
      first_nonfinite,
      *huge_stats,
      *lax.bitcast_convert_type(values, jnp.int32),
  ])


def _raise_on_special_values(
    x: jax.Array, method: QuantizationMethod, stats: np.ndarray, name: str
) -> None:
  """The eager `quantize` checks, from `_special_value_stats`."""
  n_nonfinite, first_nonfinite, n_huge, first_huge = (int(v) for v in stats[:4])
  nonfinite_value, huge_value = (
      float(v) for v in np.asarray(stats[4:], np.int32).view(np.float32)
  )
  if n_nonfinite:
    index = tuple(int(i) for i in np.unravel_index(first_nonfinite, x.shape))
    value = nonfinite_value
    raise ValueError(
        f'quantize: `{name}` contains {n_nonfinite} non-finite value(s) (NaN'
        f' or +-inf), the first at index {index} ({value}); the codes of'
        f' {method.name} cannot represent them. Replace them first (e.g.'
        ' `jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)`), or use'
        ' `simulate_quantize`, which keeps them.'
    )
  if n_huge:
    index = tuple(int(i) for i in np.unravel_index(first_huge, x.shape))
    value = huge_value
    raise ValueError(
        f'quantize: `{name}` has {n_huge} value(s) outside the float16 range'
        f' of {method.name}\'s block scale (magnitude >='
        f' {_Q4_0_MAX_MAGNITUDE:g} = 8 * 65520), the first at index {index}'
        f' ({value:g}): d = max / -8 would overflow float16 to inf (as in'
        ' ggml). Scale it down, or use INT8 / INT4 / FP8, whose scales are'
        ' float32.'
    )


def _concrete(a: jax.Array) -> np.ndarray | None:
  """`np.asarray(a)`, or None if `a` is abstract (a tracer under tracing)."""
  try:
    return np.asarray(a)
  except (
      jax.errors.TracerArrayConversionError,
      jax.errors.ConcretizationTypeError,
  ):
    return None


@functools.partial(jax.jit, static_argnums=1)
def _special_value_stats_jit(x: jax.Array, q4_0: bool) -> jax.Array:
  return _special_value_stats(x.astype(jnp.float32), q4_0)


# ----------------------------------------------------------------------------
# Scaled methods (INT4 / INT8 / FP8): one float32 scale per channel or group.


def _grouped_abs_max(
    x: jax.Array, layout: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  """(`x` split as in `_split_for_scale`, max|x| per scale, broadcastable).

  The max is over the finite values of `x` (see `_reduce_finite`).
  """
  x_shape, _, reduce = _split_for_scale(x.shape, layout)
  xs = x.reshape(x_shape)
  amax = _reduce_finite(
      lambda v: jnp.max(jnp.abs(v), axis=reduce, keepdims=True), xs
  )
  return xs, amax


def _reciprocal(scale: jax.Array) -> jax.Array:
  """`1 / scale`: dividing by a per-channel scale is multiplying by this.

  XLA rewrites `a / broadcast(scale)` into `a * broadcast(1 / scale)` (1 ulp
  away from a true division now and then), so `w / scale` in a jitted layer
  depends on shapes. Writing the multiplication explicitly makes every path
  (simulate, dequantize, a layer dividing by `QArray.scale`) agree bit for
  bit on every backend.
  """
  return jnp.float32(1.0) / scale


def _scale_from_amax(amax: jax.Array, qmax: float) -> jax.Array:
  """`qmax / amax`; 1 if that is not finite; at least `_MIN_SCALE[qmax]`.

  amax == 0 (or below qmax / 3.4e38, so that the scale overflows to inf):
  scale 1, every |x| < 0.5 rounds to 0 and the channel becomes 0. (Below
  qmax * 2**-126 the step 1 / scale is subnormal, flushed: zeros too.) The
  floor only matters for a channel max within a few ulps of float32's max,
  where `qmax * (1 / scale)` would round to inf.
  """
  scale = jnp.float32(qmax) / amax
  scale = jnp.where(jnp.isfinite(scale), scale, jnp.float32(1.0))
  return jnp.maximum(scale, jnp.float32(_MIN_SCALE[qmax]))


def _int_codes(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """clip(round(x * scale)) as float32 integers; zero is +0.0 as in storage."""
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  q = jnp.clip(jnp.round(x * scale), lo, hi)
  # round(-0.3) is -0.0, but an integer code 0 dequantizes to +0.0.
  return jnp.where(q == 0, jnp.float32(0.0), q)


def _fp8_codes(x: jax.Array, scale: jax.Array) -> jax.Array:
  """`float8_e4m3fn(clip(x * scale, -448, 448))` (round to nearest even).

  The clip keeps the product, at most a rounding above 448 for the channel
  max, away from e4m3fn's NaN (it has no inf).
  """
  y = jnp.clip(x * scale, jnp.float32(-FP8_MAX), jnp.float32(FP8_MAX))
  return y.astype(jnp.float8_e4m3fn)


def _scaled_codes(
    method: QuantizationMethod, xs: jax.Array, scale: jax.Array
) -> jax.Array:
  """The codes of `method` (INT4 / INT8 as float32 integers, FP8 as e4m3fn)."""
  if method is QuantizationMethod.FP8:
    return _fp8_codes(xs, scale)
  return _int_codes(xs, scale, _INT_BITS[method])


def _simulate_scaled(
    x: jax.Array, method: QuantizationMethod, layout: tuple[int, ...]
) -> jax.Array:
  """Fake INT4 / INT8 / FP8 (garbage where `x` is not finite)."""
  xs, amax = _grouped_abs_max(x, layout)
  scale = _scale_from_amax(amax, _SCALED_QMAX[method])
  codes = _scaled_codes(method, xs, scale).astype(jnp.float32)
  return (codes * _reciprocal(scale)).reshape(x.shape)



# ----------------------------------------------------------------------------
# SFP8.


def _f32_bits(value: float) -> int:
  return int(np.float32(value).view(np.uint32))


def _simulate_sfp8(x: jax.Array, layout: tuple[int, ...]) -> jax.Array:
  """Per-channel (or group) SFP8 (DESIGN.md): 3 mantissa bits, 2 at or below
  1/256.

  The scale comes from the finite values; garbage where `x` is not finite.
  """
  xs, amax = _grouped_abs_max(x, layout)
  # amax > 1.875 * 2**126: 1.875 / amax would be subnormal (flushed to 0 by
  # XLA). Such a channel is first multiplied by 1/4 (exact for every value
  # that does not round to zero anyway), so its scale 1.875 / (amax / 4) is
  # normal and max|w| still maps to 1.875; the unscaling multiplies by 4.
  huge = amax > jnp.float32(_SFP8_HUGE_MAX)
  pre = jnp.where(huge, jnp.float32(_SFP8_PRESCALE), jnp.float32(1.0))
  inv_pre = jnp.where(huge, jnp.float32(1.0 / _SFP8_PRESCALE), 1.0)
  scale = jnp.float32(_SFP8_MAX) / (amax * pre)
  # amax == 0 or tiny (scale inf): scale 1, the channel snaps to zeros. A
  # huge channel whose max is within a few ulps of float32's max gets the
  # smallest scale whose unscaling cannot round to inf.
  scale = jnp.where(jnp.isfinite(scale), scale, jnp.float32(1.0))
  scale = jnp.where(
      huge, jnp.maximum(scale, jnp.float32(_SFP8_MIN_SCALE)), scale
  )
  # Work on the bits of y = x * scale: sign | exponent | 23 mantissa bits.
  # Rounding |y| to the nearest multiple of step = 2**floor(log2|y|) / 8
  # (ties to even) is rounding the mantissa to its top 3 bits: add half the
  # kept lsb (minus one unless the kept part is odd) and clear the dropped
  # bits; a carry moves into the exponent exactly when the rounding reaches
  # the next power of two, and never into the sign. Where
  # 2**floor(log2|y|) <= 1/256, i.e. |y| < 2**-7, the step doubles: 2 bits.
  bits = lax.bitcast_convert_type((xs * pre) * scale, jnp.uint32)
  magnitude = bits & jnp.uint32(0x7FFFFFFF)  # bits of |y|, ordered like |y|
  sign = bits & jnp.uint32(0x80000000)
  kept_lsb = jnp.where(
      magnitude < jnp.uint32(_f32_bits(_SFP8_DOUBLE_STEP_BELOW)),
      jnp.uint32(1 << 21),
      jnp.uint32(1 << 20),
  )
  kept_is_odd = ((bits & kept_lsb) != 0).astype(jnp.uint32)
  rounded = (bits + (kept_lsb >> 1) - 1 + kept_is_odd) & ~(kept_lsb - 1)
  # Below the smallest SFP8 magnitude: snap up to it, or to (signed) zero.
  rounded = jnp.where(
      magnitude < jnp.uint32(_f32_bits(_SFP8_SMALLEST)),
      sign | jnp.uint32(_f32_bits(_SFP8_SMALLEST)),
      rounded,
  )
  rounded = jnp.where(
      magnitude <= jnp.uint32(_f32_bits(_SFP8_ZERO_AT_OR_BELOW_F32)),
      sign,
      rounded,
  )
  y = lax.bitcast_convert_type(rounded, jnp.float32)
  return ((y * _reciprocal(scale)) * inv_pre).reshape(x.shape)

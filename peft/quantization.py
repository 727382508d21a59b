"""Quantization numerics: fake (simulated) and real quantization of arrays.

Everything here is pure `jax.numpy` on one array; the layers that use it live in
`peft.nnx.quantized` and `peft.linen`.

* `simulate_quantize(x, method)` returns `x` rounded onto the grid of `method`
  (same shape and dtype), with a straight-through estimator: its derivative
  with respect to `x` is exactly the identity, in reverse mode (`jax.grad`,
  `jax.vjp`) and forward mode (`jax.jvp`, `jax.jacfwd`, `jax.linearize`),
  which is what quantization-aware training needs.
* `quantize(x, method)` stores the same numbers compactly in a `QArray`
  (`jnp.int4` / `jnp.int8` / `float8_e4m3fn` values with float32 scales per
  channel or per group, or ggml's Q4_0 blocks of 32 four-bit values and one
  float16 scale); `dequantize` inverts it, and `dequantize(quantize(x, m))`
  equals `simulate_quantize(x, m)` bit for bit.
* `check_quantizable(x, method)` runs the checks of an eager `quantize` (NaN /
  inf, Q4_0's float16 range, shapes) without quantizing: call it on a
  concrete array before a jitted `quantize`, which cannot check values.
* `to_ggml_bytes` gives the byte stream llama.cpp / ggml writes for Q4_0.

Scales (INT4, INT8, FP8, SFP8) are per output channel by default: the max is
taken over `axis_to_reduce` (default: every axis but the last, the contracted
axes of a Dense kernel). With `group_size=g` (INT4, INT8, FP8, SFP8), the
contracted axes are flattened (row-major, in axis order) and every `g`
consecutive values of one output channel share a scale; the scale array keeps
the rank of `x`, each contracted axis divided by the part of a group lying
along it (see `QArray`).

All arithmetic is done in float32 (bfloat16 and float16 inputs are upcast and
the result is cast back to the input dtype). XLA on CPU flushes float32
subnormals to zero, so a Q4_0 block whose largest magnitude is below
8 * 2**-126 (about 9.4e-38) gets d = 0 (all codes 8) where ggml keeps a
subnormal d; both dequantize to zeros.

Special values (every method, independent of shapes and backends):

* NaN and +-inf pass through `simulate_quantize` unchanged, exactly where
  they were; the scale of their channel or group (INT4, INT8, FP8, SFP8) or
  block (Q4_0) is computed from the finite values only, as if the non-finite
  ones were 0.
* A channel or block whose largest finite magnitude is 0, or so small that
  its step is a float32 subnormal (below qmax * 2**-126 for INT4 / INT8 /
  FP8, about 2.4e-7 for Q4_0's float16 d), gives zeros, never NaN; float32
  subnormal inputs are flushed to zero by XLA.
* Huge values: INT4 / INT8 / FP8 / SFP8 give finite results for every finite
  input, up to float32's max. The scale `qmax / max|w|` is float32 and never
  subnormal for these methods; where `qmax * (1 / scale)` would round past
  float32's max (a channel max within a few ulps of it), the scale is raised
  to the smallest float32 for which it does not (`_safe_min_scale`). SFP8,
  whose scale `1.875 / max|w|` would be subnormal above 1.59e38, scales such
  a channel in two exact steps (by 1/4, then by `1.875 / (max|w| / 4)`).
  Below these extremes the formulas hold bit for bit.
* Q4_0 stores d = max / -8 as float16: a block holding a magnitude of at
  least 524160 (= 8 * 65520) gets d = +-inf, exactly as ggml / gguf, and
  dequantizes to +-inf (NaN where the code is 8, i.e. 0 * inf).
* `quantize` of a concrete array raises a `ValueError` if `x` holds a NaN or
  an inf (the codes cannot represent them) or, for Q4_0, a magnitude of at
  least 524160. Under tracing (inside `jax.jit`) nothing can be checked:
  non-finite values are stored as the code of 0 (they dequantize to 0) and
  an overflowing Q4_0 block keeps ggml's infinite d. `check_quantizable`
  runs the same checks on their own.
* Zero-size arrays give zero-size results (`simulate_quantize` returns `x`).

Examples:
  >>> import jax.numpy as jnp
  >>> from peft import quantization as q
  >>> w = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
  >>> w_int4 = q.simulate_quantize(w, 'int4')
  >>> qa = q.quantize(w, q.QuantizationMethod.Q4_0)
  >>> qa.nbytes  # 2 blocks of 32 weights, 18 bytes each
  36
  >>> bool((q.dequantize(qa) == q.simulate_quantize(w, 'q4_0')).all())
  True
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'QuantizationMethod',
    'QArray',
    'simulate_quantize',
    'quantize',
    'dequantize',
    'check_quantizable',
    'scale_shape',
    'to_ggml_bytes',
    'storage_names',
    'kernel_names',
    'pack_q4_0',
    'unpack_q4_0',
    'Q4_0_BLOCK_SIZE',
    'FP8_MAX',
]

#: Number of consecutive values sharing one scale in ggml's Q4_0 format.
Q4_0_BLOCK_SIZE = 32

#: Largest finite `float8_e4m3fn` value: max|w| of a channel maps here (FP8).
FP8_MAX = 448.0

# SFP8 constants (DESIGN.md, "Numerics").
_SFP8_MAX = 1.875  # max|w| of a channel maps here.
_SFP8_SMALLEST = 1.4901161193847656e-07  # = 5 * 2**-25, smallest non-zero.
_SFP8_ZERO_BELOW = 1.1175882588358173e-07  # below this: zero.
# `y < _SFP8_ZERO_BELOW` (a real-number comparison) is `y <= float32(c)` for a
# float32 `y`, because float32(c) < c < the next float32.
_SFP8_ZERO_AT_OR_BELOW_F32 = float(np.float32(_SFP8_ZERO_BELOW))
_SFP8_DOUBLE_STEP_BELOW = 2.0**-7  # 2**floor(log2 y) <= 1/256  <=>  y < 1/128.
# Above this channel max, 1.875 / max is below 2**-126 (subnormal, flushed by
# XLA): such channels are pre-scaled by 1/4 (exact) first.
_SFP8_HUGE_MAX = float(np.float32(_SFP8_MAX * 2.0**126))
_SFP8_PRESCALE = 0.25

_F32_MAX = float(np.finfo(np.float32).max)


class QuantizationMethod(str, enum.Enum):
  """How weights are quantized; a string enum (case-insensitive).

  * `NONE`: identity.
  * `INT4` / `INT8`: symmetric integers per output channel (or per group of
    `group_size` contracted values), `scale = (2**(b-1) - 1) / max|w|`,
    `w' = clip(round(w * scale)) / scale` (the division done as a product
    with the float32 `1 / scale`).
  * `Q4_0`: llama.cpp / ggml Q4_0, blocks of 32 along the last axis.
  * `Q4_0_TRANSPOSE`: Q4_0 with blocks along the second-to-last axis.
  * `SFP8`: per-channel scaled 8-bit float with 3 mantissa bits (simulation
    only; there is no packed storage for it).
  * `FP8`: `float8_e4m3fn` values with a float32 scale per output channel
    (or per group), `scale = 448 / max|w|`,
    `w' = float32(e4m3(clip(w * scale, -448, 448))) / scale` (times the
    float32 `1 / scale`); real storage, 1 byte per weight.

  Examples:
    >>> QuantizationMethod('INT4') is QuantizationMethod.INT4
    True
    >>> QuantizationMethod.Q4_0 == 'q4_0'
    True
  """

  NONE = 'none'
  INT4 = 'int4'
  INT8 = 'int8'
  Q4_0 = 'q4_0'
  Q4_0_TRANSPOSE = 'q4_0_transpose'
  SFP8 = 'sfp8'
  FP8 = 'fp8'

  @classmethod
  def _missing_(cls, value: object) -> QuantizationMethod:
    valid = ', '.join(repr(m.value) for m in cls)
    if not isinstance(value, str):
      raise TypeError(
          f'`method` must be a QuantizationMethod or one of the strings'
          f' {valid} (case-insensitive), got {value!r} of type'
          f' {type(value).__name__}.'
      )
    lowered = value.strip().lower()
    for member in cls:
      if member.value == lowered:
        return member
    raise ValueError(
        f'Unknown quantization method {value!r}; `method` must be a'
        f' QuantizationMethod or one of the strings {valid} (case-insensitive).'
    )


_REAL_METHODS = (
    QuantizationMethod.INT4,
    QuantizationMethod.INT8,
    QuantizationMethod.Q4_0,
    QuantizationMethod.Q4_0_TRANSPOSE,
    QuantizationMethod.FP8,
)
_REAL_NAMES = 'int4, int8, fp8, q4_0 and q4_0_transpose'
_Q4_0_METHODS = (QuantizationMethod.Q4_0, QuantizationMethod.Q4_0_TRANSPOSE)
_INT_BITS = {QuantizationMethod.INT4: 4, QuantizationMethod.INT8: 8}
_INT_DTYPES = {
    QuantizationMethod.INT4: jnp.int4,
    QuantizationMethod.INT8: jnp.int8,
}
# Methods with float32 scales per channel / group: their qmax (what max|w|
# maps to) and storage dtype.
_SCALED_QMAX = {
    QuantizationMethod.INT4: 7.0,
    QuantizationMethod.INT8: 127.0,
    QuantizationMethod.FP8: FP8_MAX,
}
_SCALED_DTYPES = {**_INT_DTYPES, QuantizationMethod.FP8: jnp.float8_e4m3fn}


def _safe_min_scale(qmax: float) -> float:
  """Smallest float32 `s` for which `qmax * (1 / s)` stays finite in float32.

  `qmax / max|w|` is at least `qmax / 3.4e38` (a normal float32 for every
  `qmax` here), but `1 / scale` and the product round: for a channel max
  within a few ulps of float32's max, `qmax * (1 / scale)` can round to inf.
  Raising the scale to this floor changes nothing elsewhere (the computed
  scale is larger) and keeps every dequantized value finite.
  """
  qmax32 = np.float32(qmax)
  s = qmax32 / np.float32(_F32_MAX)
  with np.errstate(over='ignore'):
    while not np.isfinite(qmax32 * (np.float32(1.0) / s)):
      s = np.nextafter(s, np.float32(np.inf))
  return float(s)


_MIN_SCALE = {q: _safe_min_scale(q) for q in _SCALED_QMAX.values()}


def _sfp8_safe_min_scale() -> float:
  """Smallest float32 `s` with `(1.875 * (1 / s)) * 4` finite (SFP8, huge)."""
  s = np.float32(_SFP8_MAX) / np.float32(_F32_MAX / 4)
  inv_pre = np.float32(1.0 / _SFP8_PRESCALE)
  with np.errstate(over='ignore'):
    while not np.isfinite(
        (np.float32(_SFP8_MAX) * (np.float32(1.0) / s)) * inv_pre
    ):
      s = np.nextafter(s, np.float32(np.inf))
  return float(s)


_SFP8_MIN_SCALE = _sfp8_safe_min_scale()


# ----------------------------------------------------------------------------
# Argument checking.


def _as_method(method: Any) -> QuantizationMethod:
  if isinstance(method, QuantizationMethod):
    return method
  return QuantizationMethod(method)


def _as_float_array(x: Any, fn_name: str, name: str = 'x') -> jax.Array:
  """`x` as a floating-point jax array, or a TypeError naming `name`."""
  accepts = (
      'a floating-point array (jax.Array or numpy array of float32, bfloat16'
      ' or float16, or a nested list of floats)'
  )
  if not isinstance(x, jax.Array):
    if x is None or isinstance(x, (str, bytes, dict, set)):
      raise TypeError(
          f'{fn_name}: `{name}` must be {accepts}, got'
          f' {type(x).__name__}.'
      )
    try:
      # numpy first: jnp.asarray reads strings inside lists as dtype names.
      host = x if isinstance(x, np.ndarray) else np.asarray(x)
      if host.dtype.kind in 'OSUaV':
        raise TypeError(f'elements of dtype {host.dtype}')
      x = jnp.asarray(host)
    except (TypeError, ValueError) as e:
      raise TypeError(
          f'{fn_name}: `{name}` must be {accepts}, got'
          f' {type(x).__name__} ({e}).'
      ) from e
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f'{fn_name}: `{name}` must be a floating-point array (float32,'
        f' bfloat16 or float16), got dtype {x.dtype}; cast it first, e.g.'
        f' `{name}.astype(jnp.float32)`.'
    )
  return x


def _check_group_size(
    group_size: Any, method: QuantizationMethod, fn_name: str
) -> int | None:
  """Validates `group_size` (None or a positive int) for `method`."""
  if group_size is None:
    return None
  if isinstance(group_size, bool) or not isinstance(
      group_size, (int, np.integer)
  ):
    raise TypeError(
        f'{fn_name}: `group_size` must be None (one scale per output channel)'
        f' or a positive int such as 32, 64 or 128, got {group_size!r} of'
        f' type {type(group_size).__name__}.'
    )
  group_size = int(group_size)
  if group_size <= 0:
    raise ValueError(
        f'{fn_name}: `group_size` must be a positive int such as 32, 64 or'
        f' 128 (or None for one scale per output channel), got {group_size}.'
    )
  if method in _Q4_0_METHODS:
    raise ValueError(
        f'{fn_name}: `group_size` does not apply to {method.name}, whose'
        f' blocks are always {Q4_0_BLOCK_SIZE} values; pass group_size=None,'
        ' or use int4 / int8 / fp8 with group_size.'
    )
  return group_size


def _reduce_axes(
    ndim: int, axis_to_reduce: int | Sequence[int] | None
) -> tuple[int, ...]:
  """Normalizes `axis_to_reduce` to sorted non-negative axes."""
  if axis_to_reduce is None:
    return tuple(range(ndim - 1))
  if isinstance(axis_to_reduce, (int, np.integer)) and not isinstance(
      axis_to_reduce, bool
  ):
    axes = (int(axis_to_reduce),)
  elif isinstance(axis_to_reduce, (tuple, list)) and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool)
      for a in axis_to_reduce
  ):
    axes = tuple(int(a) for a in axis_to_reduce)
  else:
    raise TypeError(
        '`axis_to_reduce` must be None, an int or a tuple of ints (the axes'
        f' over which the per-channel max is taken), got {axis_to_reduce!r}.'
    )
  normalized = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f'`axis_to_reduce` contains axis {a}, out of range for an array with'
          f' {ndim} dimensions; use axes in [{-ndim}, {ndim - 1}].'
      )
    normalized.append(a % ndim)
  if len(set(normalized)) != len(normalized):
    raise ValueError(
        f'`axis_to_reduce` {axis_to_reduce!r} names the same axis twice; list'
        ' each axis once.'
    )
  return tuple(sorted(normalized))


def _check_q4_0_shape(shape: tuple[int, ...], method: QuantizationMethod):
  transpose = method is QuantizationMethod.Q4_0_TRANSPOSE
  axis = -2 if transpose else -1
  if len(shape) < -axis:
    raise ValueError(
        f'{method.name} quantizes blocks of {Q4_0_BLOCK_SIZE} along axis'
        f' {axis}, so `x` needs at least {-axis} dimension(s); got shape'
        f' {shape}.'
    )
  length = shape[axis]
  if length % Q4_0_BLOCK_SIZE:
    name = 'second-to-last' if transpose else 'last'
    raise ValueError(
        f'{method.name} quantizes blocks of {Q4_0_BLOCK_SIZE} consecutive'
        f' values along the {name} axis (axis {axis}) of `x`, but that axis'
        f' has length {length} in shape {shape}, not a multiple of'
        f' {Q4_0_BLOCK_SIZE}. Pad it to a multiple of {Q4_0_BLOCK_SIZE}, or'
        ' use INT4/INT8 (per channel, any shape).'
    )


def _scale_layout(
    shape: tuple[int, ...],
    axes: tuple[int, ...],
    group_size: int | None,
    fn_name: str,
    name: str = 'x',
) -> tuple[int, ...]:
  """Shape of the float32 scales of `x` (INT4 / INT8 / FP8 / SFP8).

  Per channel (`group_size` None): `shape` with size 1 on `axes`. Grouped:
  the contracted `axes` are flattened row-major and cut into groups of
  `group_size` consecutive values; walking the contracted axes from the
  innermost out, a group covers whole axes (scale size 1 there) and then a
  divisor of one axis of size `d` (scale size `d / part`); outer axes keep
  their size. Raises a ValueError if the contracted size is not a multiple of
  `group_size`, or if the groups would straddle two axes unevenly.
  """
  if group_size is None:
    return tuple(1 if i in axes else d for i, d in enumerate(shape))
  contracted = int(np.prod([shape[a] for a in axes], dtype=np.int64))
  if contracted % group_size:
    raise ValueError(
        f'{fn_name}: `group_size`={group_size} must divide the contracted'
        f' size of `{name}`: axes {axes} of shape {shape} hold {contracted}'
        ' values per output channel. Pick a group_size that divides it (32,'
        ' 64 and 128 divide most model dimensions), or pass group_size=None'
        ' for one scale per output channel.'
    )
  out = list(shape)
  remaining = group_size
  for a in reversed(axes):
    d = shape[a]
    if remaining == 1:
      break
    if d == 0:
      out[a], remaining = 0, 1
    elif d % remaining == 0:
      out[a], remaining = d // remaining, 1
    elif remaining % d == 0:
      out[a], remaining = 1, remaining // d
    else:
      raise ValueError(
          f'{fn_name}: groups of `group_size`={group_size} consecutive'
          f' contracted values of `{name}` (shape {shape}, contracted axes'
          f' {axes}) would straddle axis {a} of size {d} unevenly (a group'
          f' still needs {remaining} values there). Use a group_size that'
          f' divides {d}, or a multiple of it that divides {contracted}.'
      )
  return tuple(out)


def _split_for_scale(
    shape: tuple[int, ...], scale_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """How `x` is viewed so that its scales broadcast against it.

  Returns `(x_shape, s_shape, reduce)`: `x` reshaped to `x_shape` and the
  scales reshaped to `s_shape` broadcast, and `reduce` are the axes of
  `x_shape` a scale's max runs over. An axis where the scale has the array's
  size stays; one where it has size 1 is reduced whole; one of size `d` with
  `s` scales becomes `(s, d // s)`, reduced over the second part. All
  reshapes are row-major splits (free in XLA).
  """
  x_shape, s_shape, reduce = [], [], []
  for d, s in zip(shape, scale_shape):
    if s == d:
      x_shape.append(d)
      s_shape.append(d)
    elif s == 1:
      reduce.append(len(x_shape))
      x_shape.append(d)
      s_shape.append(1)
    else:
      x_shape.extend((s, d // s))
      s_shape.extend((s, 1))
      reduce.append(len(x_shape) - 1)
  return tuple(x_shape), tuple(s_shape), tuple(reduce)


def scale_shape(
    shape: Sequence[int],
    method: QuantizationMethod | str,
    axis_to_reduce: int | Sequence[int] | None = None,
    *,
    group_size: int | None = None,
) -> tuple[int, ...]:
  """Shape of the scales of `quantize(x, method, axis_to_reduce, group_size)`.

  For INT4, INT8 and FP8: `x.shape` with size 1 on the reduced axes (per
  channel), or, with `group_size`, each contracted axis divided by the part of
  a group lying along it (for a `[K, N]` kernel: `(K // group_size, N)`). For
  Q4_0: `(*lead, K // 32)`; Q4_0_TRANSPOSE: `(*lead, N, K // 32)`.

  Examples:
    >>> scale_shape((256, 64), 'int4')
    (1, 64)
    >>> scale_shape((256, 64), 'int4', group_size=32)
    (8, 64)
    >>> scale_shape((4, 64, 16), 'fp8', (0, 1), group_size=128)  # 2 heads
    (2, 1, 16)
  """
  method = _as_method(method)
  if isinstance(shape, (int, np.integer)) or not all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool)
      for d in shape
  ):
    raise TypeError(
        f'scale_shape: `shape` must be a tuple of ints, got {shape!r}.'
    )
  shape = tuple(int(d) for d in shape)
  group_size = _check_group_size(group_size, method, 'scale_shape')
  if method not in _REAL_METHODS:
    raise ValueError(
        f'scale_shape: {method.name} has no packed storage; real storage'
        f' exists only for {_REAL_NAMES}.'
    )
  if method in _Q4_0_METHODS:
    _check_q4_0_shape(shape, method)
    if method is QuantizationMethod.Q4_0:
      return (*shape[:-1], shape[-1] // Q4_0_BLOCK_SIZE)
    return (*shape[:-2], shape[-1], shape[-2] // Q4_0_BLOCK_SIZE)
  axes = _reduce_axes(len(shape), axis_to_reduce)
  return _scale_layout(shape, axes, group_size, 'scale_shape', 'shape')


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
# ggml Q4_0.


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


# ----------------------------------------------------------------------------
# simulate_quantize with a straight-through estimator.


@functools.partial(jax.jit, static_argnums=(1, 2))
def _simulate_forward(
    x: jax.Array,
    method: QuantizationMethod,
    layout: tuple[int, ...] | None,
) -> jax.Array:
  x32 = x.astype(jnp.float32)
  # Scales come from the finite values only; the results at NaN / inf are
  # replaced by the NaN / inf itself.
  if method in _SCALED_QMAX:
    out = _simulate_scaled(x32, method, layout)
  elif method is QuantizationMethod.Q4_0:
    out = _simulate_q4_0(x32, transpose=False)
  elif method is QuantizationMethod.Q4_0_TRANSPOSE:
    out = _simulate_q4_0(x32, transpose=True)
  elif method is QuantizationMethod.SFP8:
    out = _simulate_sfp8(x32, layout)
  else:  # Unreachable: NONE returns early in simulate_quantize.
    raise ValueError(f'simulate_quantize: unsupported method {method!r}.')
  return jnp.where(jnp.isfinite(x32), out, x32).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _simulate_ste(
    x: jax.Array,
    method: QuantizationMethod,
    layout: tuple[int, ...] | None,
) -> jax.Array:
  return _simulate_forward(x, method, layout)


@_simulate_ste.defjvp
def _simulate_ste_jvp(method, layout, primals, tangents):
  # Straight-through: the tangent passes unchanged (forward mode), and its
  # transpose, the cotangent, too (reverse mode: jax.grad transposes this
  # linear map).
  (x,), (x_dot,) = primals, tangents
  return _simulate_ste(x, method, layout), x_dot


def simulate_quantize(
    x: jax.Array,
    method: QuantizationMethod | str,
    axis_to_reduce: int | Sequence[int] | None = None,
    *,
    group_size: int | None = None,
) -> jax.Array:
  """Fake-quantizes `x`: rounds it onto `method`'s grid (same shape, dtype).

  The forward pass is exactly the formula of `method` (see
  `QuantizationMethod`; Q4_0 matches ggml bit for bit) computed in float32 and
  cast back to `x.dtype`. The derivative with respect to `x` is exactly the
  identity (a straight-through estimator via `jax.custom_jvp`), in reverse
  mode (`jax.grad`, `jax.vjp`) and forward mode (`jax.jvp`, `jax.jacfwd`,
  `jax.linearize`), so it can sit in a training step (quantization-aware
  training).

  Args:
    x: floating-point array (float32, bfloat16 or float16).
    method: a `QuantizationMethod` or its name, e.g. `'int4'`.
    axis_to_reduce: for INT4, INT8, FP8 and SFP8, the axis or axes over which
      the per-channel max is taken, i.e. the contracted axes (default: every
      axis but the last, i.e. one scale per output feature of a Dense
      kernel). Ignored by Q4_0 (blocks of 32 along the last axis) and
      Q4_0_TRANSPOSE (along axis -2).
    group_size: INT4, INT8, FP8 and SFP8: `None` (default) for one scale per
      output channel, or `g` for one scale per `g` consecutive values of the
      flattened `axis_to_reduce` axes of each channel (32, 64 and 128 are
      usual). The contracted size must be a multiple of `g`.

  Returns:
    The quantized-then-dequantized array, same shape and dtype as `x`. An
    all-zero channel, group or block gives zeros; a finite input gives a
    finite output (except Q4_0 blocks beyond float16's range, as ggml).
    NaN and +-inf come back unchanged where they were, and the scale of
    their channel or block is computed from its finite values only (as if
    the non-finite ones were 0). A zero-size `x` is returned as is. See the
    module docstring, "Special values".

  Raises:
    TypeError: `x` is not a floating-point array; `method`, `axis_to_reduce`
      or `group_size` has the wrong type.
    ValueError: unknown `method`; an axis out of range; a `group_size` that
      does not divide the contracted size; Q4_0 on an axis that is not a
      multiple of 32.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> w = jnp.array([[1.0, 0.2], [0.3, -0.4]])
    >>> simulate_quantize(w, 'int4')  # per column: round(w * 7 / max|w|)
    Array([[ 1.        ,  0.22857143],
           [ 0.2857143 , -0.4       ]], dtype=float32)
    >>> jax.grad(lambda w: simulate_quantize(w, 'int4').sum())(w)
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
    >>> _, t = jax.jvp(lambda w: simulate_quantize(w, 'fp8'), (w,), (2 * w,))
    >>> bool((t == 2 * w).all())  # forward mode: the identity too
    True
    >>> v = jnp.arange(1.0, 9.0).reshape(8, 1)
    >>> simulate_quantize(v, 'int4', group_size=4)[:, 0]  # scales 7/4, 7/8
    Array([1.1428572, 2.2857144, 2.857143 , 4.       , 4.571429 , 5.714286 ,
           6.8571434, 8.       ], dtype=float32)
  """
  method = _as_method(method)
  x = _as_float_array(x, 'simulate_quantize')
  group_size = _check_group_size(group_size, method, 'simulate_quantize')
  if method is QuantizationMethod.NONE:
    return x
  if method in _Q4_0_METHODS:
    _check_q4_0_shape(x.shape, method)
    layout = None
  else:
    axes = _reduce_axes(x.ndim, axis_to_reduce)
    layout = _scale_layout(x.shape, axes, group_size, 'simulate_quantize')
  if x.size == 0:
    return x
  return _simulate_ste(x, method, layout)


# ----------------------------------------------------------------------------
# Real quantization.


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=['values', 'scale'],
    meta_fields=['method', 'shape', 'group_size'],
)
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: packed `values`, their `scale`, `method` and `shape`.

  A jax pytree whose leaves are `values` and `scale` (`method`, `shape`, the
  float array's shape, and `group_size` are static metadata), so it can pass
  through `jax.jit`, be stored in a checkpoint or held by a module. Layouts:

  * INT4 / INT8 / FP8: `values` is `jnp.int4` / `jnp.int8` /
    `jnp.float8_e4m3fn` with `shape`; `scale` is float32 of the same rank;
    the array is `values / scale` (computed as `values * (1 / scale)`, see
    `QuantizationMethod`). Per channel (`group_size` None) the scale has
    size 1 on the reduced axes (`(1, N)` for a `[K, N]` kernel). With groups
    it has, on each contracted axis, that axis's size divided by the part of
    a group lying along it (`(K // group_size, N)` for `[K, N]`): scale `i`
    of an axis of size `d` with `s` scales applies to elements
    `[i * d // s, (i + 1) * d // s)`, so the scales split along the same
    axes as the values (`scale_shape` computes it; `storage_names` names
    its axes).
  * Q4_0: `values` uint8 `(*lead, K // 32, 16)` packed nibbles (ggml layout),
    `scale` float16 `(*lead, K // 32)`.
  * Q4_0_TRANSPOSE: Q4_0 of `swapaxes(x, -1, -2)`: for `shape = (*lead, K, N)`,
    `values` is `(*lead, N, K // 32, 16)` and `scale` `(*lead, N, K // 32)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> qa = quantize(jnp.ones((64, 8)), 'int4')
    >>> qa.values.dtype, qa.scale.shape, qa.nbytes  # 64*8/2 + 8*4 bytes
    (dtype(int4), (1, 8), 288)
    >>> qg = quantize(jnp.ones((64, 8)), 'fp8', group_size=32)
    >>> qg.values.dtype, qg.scale.shape, qg.nbytes  # 64*8 + 2*8*4 bytes
    (dtype(float8_e4m3fn), (2, 8), 576)
  """

  values: jax.Array
  scale: jax.Array
  method: QuantizationMethod
  shape: tuple[int, ...]
  group_size: int | None = None

  def __post_init__(self):
    if not isinstance(self.method, QuantizationMethod):
      object.__setattr__(self, 'method', QuantizationMethod(self.method))
    if not isinstance(self.shape, tuple):
      object.__setattr__(self, 'shape', tuple(int(s) for s in self.shape))
    if self.group_size is not None:
      object.__setattr__(
          self,
          'group_size',
          _check_group_size(self.group_size, self.method, 'QArray'),
      )

  @property
  def ndim(self) -> int:
    """Number of dimensions of the float array."""
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Real storage in bytes (int4 counts half a byte per element).

    Examples:
      >>> import jax.numpy as jnp
      >>> quantize(jnp.ones((4, 64)), 'q4_0').nbytes  # 8 blocks * 18 bytes
      144
    """
    values_size = int(np.prod(self.values.shape))
    scale_size = int(np.prod(self.scale.shape))
    if jnp.dtype(self.values.dtype) == jnp.dtype(jnp.int4):
      values_bytes = (values_size + 1) // 2
    else:
      values_bytes = values_size * jnp.dtype(self.values.dtype).itemsize
    return values_bytes + scale_size * jnp.dtype(self.scale.dtype).itemsize


def _prepare_real(
    x: Any,
    method: Any,
    axis_to_reduce: Any,
    group_size: Any,
    fn_name: str,
    name: str,
) -> tuple[QuantizationMethod, jax.Array, tuple[int, ...] | None, int | None]:
  """Validates `quantize`'s arguments: (method, x, scale layout, group_size)."""
  method = _as_method(method)
  if method not in _REAL_METHODS:
    raise ValueError(
        f'{fn_name}: {method.name} has no packed storage (`method`); real'
        f' storage exists only for {_REAL_NAMES}. Use'
        ' `simulate_quantize(x, method)` for fake quantization instead.'
    )
  x = _as_float_array(x, fn_name, name)
  group_size = _check_group_size(group_size, method, fn_name)
  if method in _Q4_0_METHODS:
    _check_q4_0_shape(x.shape, method)
    return method, x, None, None
  axes = _reduce_axes(x.ndim, axis_to_reduce)
  layout = _scale_layout(x.shape, axes, group_size, fn_name, name)
  return method, x, layout, group_size


def check_quantizable(
    x: jax.Array,
    method: QuantizationMethod | str,
    axis_to_reduce: int | Sequence[int] | None = None,
    *,
    group_size: int | None = None,
    name: str = 'x',
) -> None:
  """Raises what an eager `quantize(x, method, ...)` would raise; else None.

  A jitted `quantize` sees a tracer and cannot check values: call this on the
  concrete array first. It checks the arguments (types, method, axes,
  `group_size`, Q4_0 block shape) and, when `x` is concrete, its values: NaN
  or inf (the codes cannot hold them) and, for Q4_0, magnitudes that would
  overflow the float16 block scale. Messages name the array `name`. For a
  tracer the value checks are skipped silently (nothing can be checked).

  Args:
    x: the array to be quantized.
    method: INT4, INT8, FP8, Q4_0 or Q4_0_TRANSPOSE (or their names).
    axis_to_reduce: as in `quantize`.
    group_size: as in `quantize`.
    name: how the messages call `x`, e.g. `'kernel'`.

  Raises:
    ValueError: `x` holds NaN or inf, or (Q4_0) a magnitude >= 524160; a bad
      `method`, axis, `group_size` or shape.
    TypeError: `x` is not a floating-point array, or an argument has the
      wrong type.

  Examples:
    >>> import jax.numpy as jnp
    >>> check_quantizable(jnp.ones((32, 4)), 'int4')  # fine: returns None
    >>> check_quantizable(jnp.ones((32, 4)).at[3, 1].set(jnp.nan), 'int4',
    ...                   name='kernel')
    Traceback (most recent call last):
      ...
    ValueError: quantize: `kernel` contains 1 non-finite value(s) ...
  """
  method, x, _, _ = _prepare_real(
      x, method, axis_to_reduce, group_size, 'quantize', name
  )
  if x.size == 0:
    return
  # Under tracing the statistics are abstract (and, unused, compiled away).
  stats = _concrete(_special_value_stats_jit(x, method in _Q4_0_METHODS))
  if stats is not None:
    _raise_on_special_values(x, method, stats, name)


def quantize(
    x: jax.Array,
    method: QuantizationMethod | str,
    axis_to_reduce: int | Sequence[int] | None = None,
    *,
    group_size: int | None = None,
) -> QArray:
  """Really quantizes `x` (INT4, INT8, FP8, Q4_0, Q4_0_TRANSPOSE) to a `QArray`.

  `dequantize(quantize(x, m))` equals `simulate_quantize(x, m)` bit for bit
  (with the same `axis_to_reduce` and `group_size`).

  The codes cannot hold NaN or inf: for a concrete `x` (not a tracer), a
  non-finite value raises a `ValueError` saying how many there are and where
  the first is, and so does, for Q4_0, a magnitude >= 524160 (its block's
  float16 scale would overflow to inf). Under tracing (`jax.jit`) nothing is
  checked: non-finite values are stored as the code of 0 (they dequantize to
  0; the scale comes from the finite values), and an overflowing Q4_0 block
  keeps ggml's infinite scale. To check before a jitted `quantize`, call
  `check_quantizable` on the concrete array. Every finite `x` gives finite
  INT4 / INT8 / FP8 storage and dequantized values.

  Args:
    x: floating-point array (float32, bfloat16 or float16).
    method: INT4, INT8, FP8, Q4_0 or Q4_0_TRANSPOSE (or their names).
    axis_to_reduce: INT4 / INT8 / FP8 only: axes over which the per-channel
      max is taken, the contracted axes (default: all but the last).
    group_size: INT4 / INT8 / FP8 only: `None` (one scale per output
      channel) or `g`: one scale per `g` consecutive values of the flattened
      contracted axes of each channel (see `QArray` for the scale layout).

  Returns:
    A `QArray` (see its docstring for the layouts). A zero-size `x` gives a
    zero-size `QArray`.

  Raises:
    ValueError: a concrete `x` holds NaN or inf, or (Q4_0) a magnitude too
      large for the float16 block scale; or a bad `method`, shape or
      `group_size`.
    TypeError: `x` is not a floating-point array, or `axis_to_reduce` /
      `group_size` has the wrong type.

  Examples:
    >>> import jax.numpy as jnp
    >>> w = jnp.linspace(-1.0, 1.0, 256).reshape(32, 8)
    >>> qa = quantize(w, 'q4_0_transpose')  # blocks of 32 down each column
    >>> qa.values.shape, qa.scale.shape, qa.nbytes
    ((8, 1, 16), (8, 1), 144)
    >>> qg = quantize(w, 'int4', group_size=16)  # 2 scales per column
    >>> qg.scale.shape, bool((dequantize(qg) == simulate_quantize(
    ...     w, 'int4', group_size=16)).all())
    ((2, 8), True)
  """
  method, x, layout, group_size = _prepare_real(
      x, method, axis_to_reduce, group_size, 'quantize', 'x'
  )
  if x.size == 0:
    values, scale = _empty_storage(x.shape, method, layout)
  else:
    values, scale, stats = _quantize_arrays_checked(x, method, layout)
    # Under tracing (`x` a tracer, or a constant under jit) the statistics
    # are abstract: nothing is checked, and XLA drops their unused code.
    stats = _concrete(stats)
    if stats is not None:
      _raise_on_special_values(x, method, stats, 'x')
  return QArray(
      values=values,
      scale=scale,
      method=method,
      shape=x.shape,
      group_size=group_size,
  )


def _empty_storage(
    shape: tuple[int, ...],
    method: QuantizationMethod,
    layout: tuple[int, ...] | None,
) -> tuple[jax.Array, jax.Array]:
  """Storage of a zero-size array (the kernels cannot reduce empty axes).

  Scales are 1, the scale of an all-zero channel.
  """
  if method in _SCALED_QMAX:
    return (
        jnp.zeros(shape, _SCALED_DTYPES[method]),
        jnp.ones(layout, jnp.float32),
    )
  blocks = scale_shape(shape, method)
  return (
      jnp.full((*blocks, Q4_0_BLOCK_SIZE // 2), 0x88, jnp.uint8),
      jnp.zeros(blocks, jnp.float16),
  )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_arrays_checked(
    x: jax.Array,
    method: QuantizationMethod,
    layout: tuple[int, ...] | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_quantize_arrays` plus `_special_value_stats` of `x`, in one program."""
  values, scale = _quantize_arrays(x, method, layout)
  q4_0 = method in _Q4_0_METHODS
  return values, scale, _special_value_stats(x.astype(jnp.float32), q4_0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_arrays(
    x: jax.Array,
    method: QuantizationMethod,
    layout: tuple[int, ...] | None,
) -> tuple[jax.Array, jax.Array]:
  # Non-finite values get the code of 0 and are left out of the scales (only
  # reachable under tracing: eager `quantize` rejects them).
  x32 = x.astype(jnp.float32)
  if method in _SCALED_QMAX:
    xs, amax = _grouped_abs_max(x32, layout)
    scale = _scale_from_amax(amax, _SCALED_QMAX[method])
    codes = _scaled_codes(method, _finite(xs), scale)
    values = codes.astype(_SCALED_DTYPES[method]).reshape(x.shape)
    return values, scale.reshape(layout)
  transpose = method is QuantizationMethod.Q4_0_TRANSPOSE
  blocks, axis = _q4_0_blocks(x32, transpose)
  q, d = _q4_0_encode(blocks, axis)
  q = jnp.where(jnp.isfinite(blocks), q, jnp.float32(8.0))  # the code of 0
  codes = q.astype(jnp.uint8)
  scale = jnp.squeeze(d, axis).astype(jnp.float16)
  if not transpose:
    return pack_q4_0(codes), scale
  # codes: (*lead, K//32, 32, N). Pack along the block axis first, then
  # transpose the half-size packed bytes to (*lead, N, K//32, 16).
  half = Q4_0_BLOCK_SIZE // 2
  packed = codes[..., :half, :] | (codes[..., half:, :] << 4)
  return jnp.moveaxis(packed, -1, -3), jnp.swapaxes(scale, -1, -2)


def _check_scaled_layout(q: QArray) -> None:
  """INT4 / INT8 / FP8: the scale's shape must fit the values' shape."""
  values_shape, layout = tuple(q.values.shape), tuple(q.scale.shape)
  ok = values_shape == tuple(q.shape) and len(layout) == len(values_shape)
  if ok:
    for d, s in zip(values_shape, layout):
      if not (s == d or s == 1 or (0 < s < d and d % s == 0)):
        ok = False
  if not ok:
    raise ValueError(
        f'dequantize: `q` is inconsistent: values of shape {values_shape}'
        f' (QArray.shape {q.shape}) cannot take scales of shape {layout};'
        ' each scale axis must have size 1, the values\' size, or a divisor'
        ' of it (see `QArray`).'
    )


def dequantize(q: QArray, dtype: Any = jnp.float32) -> jax.Array:
  """Inverse of `quantize`: the float array of shape `q.shape`, as `dtype`.

  Computed in float32 then cast to `dtype`.

  Examples:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[0.5, -1.0], [0.25, 0.75]])
    >>> dequantize(quantize(w, 'int8'))
    Array([[ 0.5      , -1.       ],
           [ 0.2519685,  0.7480315]], dtype=float32)
  """
  if not isinstance(q, QArray):
    raise TypeError(
        f'dequantize: `q` must be a QArray (from `quantize`), got {type(q)}.'
    )
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(
        f'dequantize: `dtype` must be a floating-point dtype such as'
        f' jnp.float32 or jnp.bfloat16, got {dtype!r}.'
    ) from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'dequantize: `dtype` must be a floating-point dtype such as'
        f' jnp.float32 or jnp.bfloat16, got {dtype}.'
    )
  method = q.method
  if method not in _REAL_METHODS:
    raise ValueError(
        f'dequantize: a QArray cannot hold method {method.name}; real storage'
        f' exists only for {_REAL_NAMES}.'
    )
  if method in _Q4_0_METHODS:
    *lead, n_blocks, _ = q.values.shape
    shape = (*lead, n_blocks * Q4_0_BLOCK_SIZE)
    if method is QuantizationMethod.Q4_0_TRANSPOSE and lead:
      shape = (*lead[:-1], shape[-1], lead[-1])
    if shape != tuple(q.shape):
      raise ValueError(
          f'dequantize: packed values of shape {q.values.shape} hold an array'
          f' of shape {shape}, but the QArray says {q.shape}; it is'
          ' inconsistent.'
      )
  else:
    _check_scaled_layout(q)
  return _dequantize_arrays(q.values, q.scale, method, dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize_arrays(
    values: jax.Array,
    scale: jax.Array,
    method: QuantizationMethod,
    dtype: jnp.dtype,
) -> jax.Array:
  if method in _SCALED_QMAX:
    x_shape, s_shape, _ = _split_for_scale(values.shape, scale.shape)
    codes = values.astype(jnp.float32).reshape(x_shape)
    r = _reciprocal(scale.astype(jnp.float32)).reshape(s_shape)
    return (codes * r).reshape(values.shape).astype(dtype)
  if method is QuantizationMethod.Q4_0:
    codes = unpack_q4_0(values).astype(jnp.float32)  # (*lead, K // 32, 32)
    out = scale.astype(jnp.float32)[..., None] * (codes - jnp.float32(8.0))
    *lead, n_blocks, block = out.shape
    return out.reshape(*lead, n_blocks * block).astype(dtype)
  # Q4_0_TRANSPOSE: transpose the packed bytes (an eighth of the float
  # output's size) to (*lead, K // 32, 16, N), then unpack along axis -2.
  packed = jnp.moveaxis(values, -3, -1)
  codes = jnp.concatenate([packed & 0x0F, packed >> 4], axis=-2)
  d = jnp.swapaxes(scale, -1, -2).astype(jnp.float32)[..., None, :]
  out = d * (codes.astype(jnp.float32) - jnp.float32(8.0))
  *lead, n_blocks, block, n = out.shape
  return out.reshape(*lead, n_blocks * block, n).astype(dtype)


def storage_names(method, names, reduced_axes=(), *, group_size=None,
                  shape=None):
  """Names (e.g. sharding axes) of a `QArray`'s arrays from the kernel's names.

  `names` has one entry per axis of the float array (`None` for unnamed
  axes); the result is `(values_names, scale_names)`, one entry per axis of
  `QArray.values` and `QArray.scale`. INT4 / INT8 / FP8: values keep the
  names and the scale drops them on `reduced_axes` where it has size 1; with
  `group_size` (then `shape`, the float array's shape, is required) a
  reduced axis holding several groups keeps its name, since its scales split
  along it as the values do. Q4_0: values `(*lead, K // 32, 16)` get
  `(*names, None)` and the scale `(*lead, K // 32)` gets `names`: the
  block-count axis is named after the blocked axis. Q4_0_TRANSPOSE: the same
  with the last two axes swapped.

  Examples:
    >>> storage_names('int4', ('embed', 'mlp'), reduced_axes=(0,))
    (('embed', 'mlp'), (None, 'mlp'))
    >>> storage_names('int4', ('embed', 'mlp'), reduced_axes=(0,),
    ...               group_size=128, shape=(4096, 1024))
    (('embed', 'mlp'), ('embed', 'mlp'))
    >>> storage_names('q4_0_transpose', ('embed', 'mlp'))
    (('mlp', 'embed', None), ('mlp', 'embed'))
  """
  method = _as_method(method)
  names = tuple(names)
  group_size = _check_group_size(group_size, method, 'storage_names')
  if method is QuantizationMethod.Q4_0:
    return (*names, None), names
  if method is QuantizationMethod.Q4_0_TRANSPOSE:
    swapped = (*names[:-2], names[-1], names[-2])
    return (*swapped, None), swapped
  reduced = {a % len(names) for a in reduced_axes} if names else set()
  if group_size is None:
    return names, tuple(
        None if i in reduced else n for i, n in enumerate(names)
    )
  if shape is None:
    raise ValueError(
        'storage_names: with `group_size`, pass `shape` (the float array\'s'
        ' shape): which axes keep their names depends on it.'
    )
  shape = tuple(int(d) for d in shape)
  if len(shape) != len(names):
    raise ValueError(
        f'storage_names: `shape` {shape} and `names` {names} must have one'
        ' entry per axis each.'
    )
  layout = _scale_layout(
      shape, tuple(sorted(reduced)), group_size, 'storage_names', 'shape'
  )
  return names, tuple(
      None if i in reduced and layout[i] == 1 else n
      for i, n in enumerate(names)
  )


def kernel_names(method, values_names):
  """The float kernel's axis names from those of `QArray.values`.

  The inverse of `storage_names` on the values.

  Examples:
    >>> kernel_names('q4_0_transpose', ('mlp', 'embed', None))
    ('embed', 'mlp')
  """
  method = QuantizationMethod(method)
  v = tuple(values_names)
  if method is QuantizationMethod.Q4_0:
    return v[:-1]
  if method is QuantizationMethod.Q4_0_TRANSPOSE:
    return (*v[:-3], v[-2], v[-3])
  return v


def to_ggml_bytes(q: QArray) -> np.ndarray:
  """The exact ggml Q4_0 byte stream of a Q4_0 / Q4_0_TRANSPOSE `QArray`.

  Each block of 32 values is 18 bytes: the float16 scale (little-endian), then
  the 16 packed bytes. The result is shaped like ggml's (and
  `gguf.quants.quantize`'s) output: `(*lead, K // 32 * 18)` uint8. For
  Q4_0_TRANSPOSE the stream is that of `swapaxes(x, -1, -2)`, i.e.
  `(*lead, N, K // 32 * 18)`.

  Examples:
    >>> import numpy as np
    >>> qa = quantize(np.ones((2, 64), np.float32), 'q4_0')
    >>> to_ggml_bytes(qa).shape  # 2 rows of 2 blocks of 18 bytes
    (2, 36)
  """
  if not isinstance(q, QArray) or q.method not in (
      QuantizationMethod.Q4_0,
      QuantizationMethod.Q4_0_TRANSPOSE,
  ):
    got = q.method.name if isinstance(q, QArray) else type(q).__name__
    raise ValueError(
        '`to_ggml_bytes` needs a QArray quantized with Q4_0 or Q4_0_TRANSPOSE,'
        f' got {got}.'
    )
  values = np.asarray(q.values, dtype=np.uint8)
  scale = np.asarray(q.scale).astype('<f2').view(np.uint8)
  scale = scale.reshape(*values.shape[:-1], 2)
  blocks = np.concatenate([scale, values], axis=-1)  # (*lead, nb, 18)
  return blocks.reshape(*blocks.shape[:-2], -1)

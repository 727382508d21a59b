"""Quantization methods, their constants and the checks of their arguments.

`QuantizationMethod` names every method; `scale_shape` gives the layout of
the per-channel or per-group scales of the scaled methods. The private
helpers here validate arguments for `peft.quantization` (which re-exports
the public names).

Examples:
  >>> QuantizationMethod('Int8').value
  'int8'
  >>> scale_shape((256, 64), 'int8', group_size=64)
  (4, 64)
"""

from __future__ import annotations

import enum
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['QuantizationMethod', 'scale_shape', 'Q4_0_BLOCK_SIZE', 'FP8_MAX',
           'NF4_BLOCK_SIZE']

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
  * `NF4`: bitsandbytes' 4-bit NormalFloat (QLoRA): blocks of 64 (or
    `group_size`) along the contracted axes, a float32 absmax per block and
    the index of the nearest of 16 NormalFloat values to `w / absmax`;
    `double_quant=True` stores the absmax in 8 bits as bitsandbytes'
    `compress_statistics=True`. Bit-exact with bitsandbytes (`peft.nf4`).

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
  NF4 = 'nf4'

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
    QuantizationMethod.NF4,
)
_REAL_NAMES = 'nf4, int4, int8, fp8, q4_0 and q4_0_transpose'
#: Default block size of NF4 (bitsandbytes' and QLoRA's).
NF4_BLOCK_SIZE = 64
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
  """Validates `group_size` (None or a positive int) for `method`.

  NF4 always has blocks: None means its default, `NF4_BLOCK_SIZE` (64).
  """
  if group_size is None:
    return NF4_BLOCK_SIZE if method is QuantizationMethod.NF4 else None
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
  Q4_0: `(*lead, K // 32)`; Q4_0_TRANSPOSE: `(*lead, N, K // 32)`. NF4: the
  layout of INT4 with `group_size` (default 64): one absmax per block.

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

"""Real quantization: `quantize` to a `QArray`, `dequantize`, `check_quantizable`.

Examples:
  >>> import jax.numpy as jnp
  >>> qa = quantize(jnp.ones((64, 8)), 'int4', group_size=32)
  >>> qa.scale.shape, bool((dequantize(qa) == 1.0).all())
  ((2, 8), True)
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft.quant_array import QArray
from peft.quant_codecs import _concrete
from peft.quant_codecs import _finite
from peft.quant_codecs import _grouped_abs_max
from peft.quant_codecs import _raise_on_special_values
from peft.quant_codecs import _reciprocal
from peft.quant_codecs import _scale_from_amax
from peft.quant_codecs import _scaled_codes
from peft.quant_codecs import _special_value_stats
from peft.quant_codecs import _special_value_stats_jit
from peft.quant_ggml import _q4_0_blocks
from peft.quant_ggml import _q4_0_encode
from peft.quant_ggml import pack_q4_0
from peft.quant_ggml import unpack_q4_0
from peft.quant_methods import Q4_0_BLOCK_SIZE
from peft.quant_methods import QuantizationMethod
from peft.quant_methods import _Q4_0_METHODS
from peft.quant_methods import _REAL_METHODS
from peft.quant_methods import _REAL_NAMES
from peft.quant_methods import _SCALED_DTYPES
from peft.quant_methods import _SCALED_QMAX
from peft.quant_methods import _as_float_array
from peft.quant_methods import _as_method
from peft.quant_methods import _check_group_size
from peft.quant_methods import _check_q4_0_shape
from peft.quant_methods import _reduce_axes
from peft.quant_methods import _scale_layout
from peft.quant_methods import _split_for_scale
from peft.quant_methods import scale_shape
from peft.quant_nf4 import NF4Spec
from peft.quant_nf4 import _check_nf4_shape
from peft.quant_nf4 import _nf4_decode
from peft.quant_nf4 import _nf4_encode
from peft.quant_nf4 import nf4_values_shape
from peft.quant_simulate import simulate_quantize  # noqa: F401 (docstrings)

__all__ = ['quantize', 'dequantize', 'check_quantizable']


def _prepare_real(
    x: Any,
    method: Any,
    axis_to_reduce: Any,
    group_size: Any,
    fn_name: str,
    name: str,
    double_quant: Any = False,
) -> tuple[QuantizationMethod, jax.Array, Any, int | None]:
  """Validates `quantize`'s arguments: (method, x, layout, group_size).

  The layout is the scales' shape, None for Q4_0, an `NF4Spec` for NF4.
  """
  method = _as_method(method)
  if not isinstance(double_quant, (bool, np.bool_)):
    raise TypeError(f'{fn_name}: `double_quant` must be a bool, got'
                    f' {type(double_quant).__name__}.')
  if double_quant and method is not QuantizationMethod.NF4:
    raise ValueError(f'{fn_name}: `double_quant=True` applies to NF4 only,'
                     f' not {method.name}; drop it or use method=\'nf4\'.')
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
  if method is QuantizationMethod.NF4:
    _check_nf4_shape(x.shape, axes, group_size, fn_name, name)
    return method, x, NF4Spec(axes, group_size, bool(double_quant)), group_size
  layout = _scale_layout(x.shape, axes, group_size, fn_name, name)
  return method, x, layout, group_size


def check_quantizable(
    x: jax.Array,
    method: QuantizationMethod | str,
    axis_to_reduce: int | Sequence[int] | None = None,
    *,
    group_size: int | None = None,
    name: str = 'x',
    double_quant: bool = False,
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
      x, method, axis_to_reduce, group_size, 'quantize', name, double_quant
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
    double_quant: bool = False,
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
      x, method, axis_to_reduce, group_size, 'quantize', 'x', double_quant
  )
  if x.size == 0:
    values, scale, dq_stats = _empty_storage(x.shape, method, layout)
  else:
    values, scale, dq_stats, stats = _quantize_arrays_checked(
        x, method, layout)
    # Under tracing (`x` a tracer, or a constant under jit) the statistics
    # are abstract: nothing is checked, and XLA drops their unused code.
    stats = _concrete(stats)
    if stats is not None:
      _raise_on_special_values(x, method, stats, 'x')
  axes = None
  if method is QuantizationMethod.NF4:
    axes = tuple(a - x.ndim for a in layout.axes)
  return QArray(
      values=values,
      scale=scale,
      method=method,
      shape=x.shape,
      group_size=group_size,
      stats=dq_stats,
      axes=axes,
  )


def _empty_storage(
    shape: tuple[int, ...],
    method: QuantizationMethod,
    layout: Any,
) -> tuple[jax.Array, jax.Array]:
  """Storage of a zero-size array (the kernels cannot reduce empty axes).

  Scales are 1, the scale of an all-zero channel (NF4: absmax 0).
  """
  if method in _SCALED_QMAX:
    return (
        jnp.zeros(shape, _SCALED_DTYPES[method]),
        jnp.ones(layout, jnp.float32),
        None,
    )
  if method is QuantizationMethod.NF4:
    s_shape = _scale_layout(shape, layout.axes, layout.block, 'quantize')
    return (
        jnp.full(nf4_values_shape(shape, layout.axes), 0x77, jnp.uint8),
        jnp.zeros(s_shape, jnp.uint8 if layout.double_quant else jnp.float32),
        jnp.zeros((1,), jnp.float32) if layout.double_quant else None,
    )
  blocks = scale_shape(shape, method)
  return (
      jnp.full((*blocks, Q4_0_BLOCK_SIZE // 2), 0x88, jnp.uint8),
      jnp.zeros(blocks, jnp.float16),
      None,
  )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_arrays_checked(
    x: jax.Array,
    method: QuantizationMethod,
    layout: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_quantize_arrays` plus `_special_value_stats` of `x`, in one program."""
  values, scale, dq_stats = _quantize_arrays(x, method, layout)
  q4_0 = method in _Q4_0_METHODS
  return (values, scale, dq_stats,
          _special_value_stats(x.astype(jnp.float32), q4_0))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_arrays(
    x: jax.Array,
    method: QuantizationMethod,
    layout: Any,
) -> tuple[jax.Array, jax.Array]:
  # Non-finite values get the code of 0 and are left out of the scales (only
  # reachable under tracing: eager `quantize` rejects them).
  x32 = x.astype(jnp.float32)
  if method in _SCALED_QMAX:
    xs, amax = _grouped_abs_max(x32, layout)
    scale = _scale_from_amax(amax, _SCALED_QMAX[method])
    codes = _scaled_codes(method, _finite(xs), scale)
    values = codes.astype(_SCALED_DTYPES[method]).reshape(x.shape)
    return values, scale.reshape(layout), None
  if method is QuantizationMethod.NF4:
    return _nf4_encode(_finite(x32), layout.axes, layout.block,
                       layout.double_quant)
  transpose = method is QuantizationMethod.Q4_0_TRANSPOSE
  blocks, axis = _q4_0_blocks(x32, transpose)
  q, d = _q4_0_encode(blocks, axis)
  q = jnp.where(jnp.isfinite(blocks), q, jnp.float32(8.0))  # the code of 0
  codes = q.astype(jnp.uint8)
  scale = jnp.squeeze(d, axis).astype(jnp.float16)
  if not transpose:
    return pack_q4_0(codes), scale, None
  # codes: (*lead, K//32, 32, N). Pack along the block axis first, then
  # transpose the half-size packed bytes to (*lead, N, K//32, 16).
  half = Q4_0_BLOCK_SIZE // 2
  packed = codes[..., :half, :] | (codes[..., half:, :] << 4)
  return jnp.moveaxis(packed, -1, -3), jnp.swapaxes(scale, -1, -2), None


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
  elif method is QuantizationMethod.NF4:
    shape = _check_nf4_qarray(q)
    return _dequantize_nf4(q.values, q.scale, q.stats,
                           tuple(a % len(shape) for a in q.axes), shape,
                           dtype)
  else:
    _check_scaled_layout(q)
  return _dequantize_arrays(q.values, q.scale, method, dtype)


def _check_nf4_qarray(q: QArray) -> tuple[int, ...]:
  """The float shape of an NF4 `q` (from its leaves); ValueError if bad."""
  axes = q.axes
  ndim = q.values.ndim
  ok = bool(axes) and all(-ndim <= a < 0 for a in axes)
  if ok:
    shape = list(q.values.shape)
    shape[axes[-1]] *= 2
    shape = tuple(shape)
    layout = _scale_layout(shape, tuple(a % ndim for a in axes),
                           q.group_size, 'dequantize')
    ok = tuple(q.scale.shape) == layout and (
        q.stats is None) == (q.scale.dtype != jnp.uint8)
  if not ok:
    raise ValueError(
        f'dequantize: `q` is an inconsistent NF4 QArray: values'
        f' {q.values.shape}, scale {q.scale.shape} {q.scale.dtype}, axes'
        f' {axes}, group_size {q.group_size}; build it with `quantize`.')
  return shape


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _dequantize_nf4(values, scale, stats, axes, shape, dtype):
  return _nf4_decode(values, scale, stats, axes, shape).astype(dtype)


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

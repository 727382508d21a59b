"""`simulate_quantize`: fake quantization with a straight-through estimator.

Examples:
  >>> import jax.numpy as jnp
  >>> simulate_quantize(jnp.array([[0.3], [1.0]]), 'int8')[:, 0]
  Array([0.2992126, 1.       ], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from peft.quant_codecs import _simulate_scaled
from peft.quant_codecs import _simulate_sfp8
from peft.quant_ggml import _simulate_q4_0
from peft.quant_methods import QuantizationMethod
from peft.quant_methods import _Q4_0_METHODS
from peft.quant_methods import _SCALED_QMAX
from peft.quant_methods import _as_float_array
from peft.quant_methods import _as_method
from peft.quant_methods import _check_group_size
from peft.quant_methods import _check_q4_0_shape
from peft.quant_methods import _reduce_axes
from peft.quant_methods import _scale_layout
from peft.quant_nf4 import NF4Spec
from peft.quant_nf4 import _check_nf4_shape
from peft.quant_nf4 import _simulate_nf4

__all__ = ['simulate_quantize']


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
  elif method is QuantizationMethod.NF4:
    out = _simulate_nf4(x32, layout.axes, layout.block, layout.double_quant)
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
    double_quant: bool = False,
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
      usual). The contracted size must be a multiple of `g`. NF4: the block
      size (default 64).
    double_quant: NF4 only: double-quantize the block absmax (bitsandbytes'
      `compress_statistics=True`).

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
  if not isinstance(double_quant, bool):
    raise TypeError('simulate_quantize: `double_quant` must be a bool, got'
                    f' {type(double_quant).__name__}.')
  if double_quant and method is not QuantizationMethod.NF4:
    raise ValueError('simulate_quantize: `double_quant=True` applies to NF4'
                     f' only, not {method.name}.')
  if method is QuantizationMethod.NONE:
    return x
  if method in _Q4_0_METHODS:
    _check_q4_0_shape(x.shape, method)
    layout = None
  elif method is QuantizationMethod.NF4:
    axes = _reduce_axes(x.ndim, axis_to_reduce)
    _check_nf4_shape(x.shape, axes, group_size, 'simulate_quantize')
    layout = NF4Spec(axes, group_size, double_quant)
  else:
    axes = _reduce_axes(x.ndim, axis_to_reduce)
    layout = _scale_layout(x.shape, axes, group_size, 'simulate_quantize')
  if x.size == 0:
    return x
  return _simulate_ste(x, method, layout)

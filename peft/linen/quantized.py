"""Quantization for Flax linen: simulation wrappers, int4 layers, checkpoints.

* `SimulateQuantizedDense` / `SimulateQuantizedEinsum(wrapped=, method=)`:
  quantization-aware training. Same params as the wrapped layer; the forward
  pass fake-quantizes the kernel (`peft.quantization.simulate_quantize`,
  straight-through gradient).
* `quantize_checkpoint(params, method=INT4)`: real quantization of a params
  tree; each `kernel` becomes packed values plus a `scale` sibling.
* `Int4Dense` / `Int4Einsum(wrapped=, method=INT4)`: inference layers reading
  what `quantize_checkpoint` wrote.

The math is not written here: the layer forward passes are those of the NNX
modules `peft.nnx.quantized.SimulateQuantizedLinear/Einsum` and
`Int4Linear/Int4Einsum` (blockwise dequantizing matmul), built on each call
around the linen params (the NNX module is a cheap view; under `jax.jit` only
its computation remains). The codec is `peft.quantization.quantize`.

Examples:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> import peft
  >>> dense = nn.Dense(32)
  >>> x = jnp.ones((2, 64))
  >>> params = dense.init(jax.random.key(0), x)['params']
  >>> params_q = peft.quantize_checkpoint(params, method='int4')
  >>> params_q['kernel'].dtype, params_q['scale'].shape
  (dtype(int4), (1, 32))
  >>> layer = peft.Int4Dense(wrapped=nn.Dense(32))
  >>> layer.apply({'params': params_q}, x).shape
  (2, 32)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import linen as nn
from flax import nnx
from flax.linen import dtypes as _linen_dtypes
import jax
from jax import lax
import jax.numpy as jnp

from peft import geometry as _geometry
from peft import quantization as _q
from peft.linen import interceptor as _interceptor
from peft.linen.lora import _unboxed
from peft.linen.quantized_checkpoint import LAYOUT_MARKERS as _LAYOUT_MARKERS
from peft.linen.quantized_checkpoint import as_method as _as_method
from peft.linen.quantized_checkpoint import box_stats as _box_stats
from peft.linen.quantized_checkpoint import box_storage as _box_storage
from peft.linen.quantized_checkpoint import layout_marker as _layout_marker
from peft.linen.quantized_checkpoint import quantize_checkpoint
from peft.nnx import quantized as _nnx_q

__all__ = [
    'SimulateQuantizedDense',
    'SimulateQuantizedEinsum',
    'Int4Dense',
    'Int4Einsum',
    'quantize_checkpoint',
]

Array = jax.Array
QuantizationMethod = _q.QuantizationMethod

# ---------------------------------------------------------------------------
# Building the NNX layer that does the math, around the linen params.
# ---------------------------------------------------------------------------


def _const(value):
  """An initializer returning `value` (to build an NNX layer around params)."""
  return lambda *_: value


def _nnx_promote(linen_fn):
  """Adapts a linen `promote_dtype(*args, dtype=)` to the NNX signature."""
  if linen_fn is _linen_dtypes.promote_dtype:
    return None  # NNX's default is the same function

  def promote(args, /, *, dtype=None, inexact=True):
    del inexact
    return tuple(linen_fn(*args, dtype=dtype))

  return promote


def _linear_kwargs(dense: nn.Dense) -> dict[str, Any]:
  if dense.dot_general_cls is not None:
    dot_general = dense.dot_general_cls()
  elif dense.dot_general is not None:
    dot_general = dense.dot_general
  else:
    dot_general = lax.dot_general
  kw = dict(
      use_bias=dense.use_bias,
      dtype=dense.dtype,
      param_dtype=dense.param_dtype,
      precision=dense.precision,
      dot_general=dot_general,
  )
  promote = _nnx_promote(dense.promote_dtype)
  if promote is not None:
    kw['promote_dtype'] = promote
  return kw


def _einsum_kwargs(einsum: nn.Einsum) -> dict[str, Any]:
  kw = dict(
      dtype=einsum.dtype,
      param_dtype=einsum.param_dtype,
      precision=einsum.precision,
      preferred_element_type=einsum.preferred_element_type,
  )
  promote = _nnx_promote(einsum.promote_dtype)
  if promote is not None:
    kw['promote_dtype'] = promote
  return kw


def _nnx_linear(dense: nn.Dense, kernel, bias) -> nnx.Linear:
  """An `nnx.Linear` configured like `dense`, holding `kernel` and `bias`."""
  return nnx.Linear(
      kernel.shape[0], dense.features, kernel_init=_const(kernel),
      bias_init=_const(bias), rngs=nnx.Rngs(0), **_linear_kwargs(dense),
  )


def _nnx_einsum(einsum: nn.Einsum, einsum_str, kernel, bias) -> nnx.Einsum:
  """An `nnx.Einsum` configured like `einsum`, holding `kernel` and `bias`."""
  return nnx.Einsum(
      einsum_str, tuple(kernel.shape),
      None if bias is None else tuple(bias.shape),
      kernel_init=_const(kernel), bias_init=_const(bias), rngs=nnx.Rngs(0),
      **_einsum_kwargs(einsum),
  )


def _einsum_bias_shape(geometry: _geometry.Geometry, ndim: int):
  """The bias shape of `nn.Einsum`: the output axes that are kernel axes."""
  _, outs = geometry.subscripts(ndim)
  return tuple(d for c, d in zip(outs, geometry.bias_broadcast_shape(ndim))
               if c in geometry.kernel)


def _quantized_kwargs(layer: nn.Module, method, qarray) -> dict[str, Any]:
  """Arguments of the NNX quantized layers, from a linen Dense / Einsum."""
  kw = dict(method=method, group_size=qarray.group_size,
            double_quant=qarray.double_quant, dtype=layer.dtype,
            param_dtype=layer.param_dtype,
            precision=layer.precision,
            preferred_element_type=getattr(layer, 'preferred_element_type',
                                           None))
  promote = _nnx_promote(layer.promote_dtype)
  if promote is not None:
    kw['promote_dtype'] = promote
  return kw


def _loaded(make, qarray: _q.QArray, bias) -> _nnx_q.QuantizedLayer:
  """The NNX quantized layer `make()` (built from shapes, abstractly, so
  nothing is allocated) holding `qarray` and `bias`."""
  module = nnx.eval_shape(make)
  module.set_weight(qarray)
  module.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
  return module


# ---------------------------------------------------------------------------
# Linen modules.
# ---------------------------------------------------------------------------


def _storage_shapes(kernel_shape, dtype, method, group_size=None,
                    double_quant=False) -> _q.QArray:
  """The storage of a kernel of `kernel_shape`, as shapes (no compute)."""
  return jax.eval_shape(
      lambda w: _q.quantize(w, method, group_size=group_size,
                            double_quant=double_quant),
      jax.ShapeDtypeStruct(tuple(kernel_shape), dtype))


def _check_wrapped(owner: str, wrapped: Any, layer_type: type) -> None:
  if not isinstance(wrapped, layer_type):
    raise TypeError(
        f'{owner}: `wrapped` must be an nn.{layer_type.__name__}, got'
        f' {type(wrapped).__name__}; use the *Dense class for nn.Dense and'
        ' the *Einsum class for nn.Einsum'
    )


class _QuantizedWrapper(nn.Module, _interceptor.StandsForLayer):
  """Fields and checks of the wrappers; shares the wrapped layer's scope.

  Sharing the scope keeps the params where the wrapped layer had them.
  """

  _: dataclasses.KW_ONLY
  wrapped: nn.Module
  method: QuantizationMethod | str = QuantizationMethod.INT4
  group_size: int | None = None
  double_quant: bool = False

  _wrapped_type: ClassVar[type[nn.Module]]
  # True when the params hold packed storage rather than the float kernel.
  packed: ClassVar[bool] = False

  def float_kernel_names(self, names):
    """The float kernel's sharding names from those of the stored `kernel`."""
    if not self.packed:
      return tuple(names)
    return _q.kernel_names(self._method, names)

  def __post_init__(self):
    owner = type(self).__name__
    _check_wrapped(owner, self.wrapped, self._wrapped_type)
    _as_method(self.method, owner, packed=self.packed)
    super().__post_init__()
    if self.scope is not None and self.wrapped.scope is not None:
      nn.share_scope(self, self.wrapped)

  @property
  def _method(self) -> QuantizationMethod:
    return QuantizationMethod(self.method)

  def _einsum_str(self, einsum_str: str | None) -> str:
    einsum_str = nn.merge_param('einsum_str', self.wrapped.einsum_str,
                                einsum_str)
    return einsum_str.replace(' ', '')

  def _float_bias(self, bias_shape) -> Array | None:
    wrapped = self.wrapped
    if not wrapped.use_bias:
      return None
    return self.param('bias', wrapped.bias_init, bias_shape,
                      wrapped.param_dtype)

  def _quantized_kernel(self, kernel_shape) -> _q.QArray:
    """Reads (or at init creates) the `kernel` + `scale` written by
    `quantize_checkpoint`, checked against the expected layout."""
    method = self._method
    wrapped = self.wrapped
    owner = type(self).__name__
    path = '/'.join(self.scope.path) or '<root>'
    try:
      expected = _storage_shapes(kernel_shape, wrapped.param_dtype, method,
                                 self.group_size, self.double_quant)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f'{owner} at {path!r}: kernel of shape {tuple(kernel_shape)} cannot'
          f' be stored as {method.value}: {e}'
      ) from e
    for other, key in _LAYOUT_MARKERS.items():
      if other is not method and self.has_variable('params', key):
        raise ValueError(
            f"{owner} at {path!r}: the params hold {other.value} storage (their"
            f" {key!r} marker says so) but the layer reads method="
            f"{method.value!r}; pass method='{other.value}' or quantize the"
            f" float checkpoint with method='{method.value}'"
        )
    has_kernel = self.has_variable('params', 'kernel')
    if not has_kernel and self.is_mutable_collection('params'):
      # init: quantize a freshly initialised float kernel (same rng as the
      # wrapped layer would use), i.e. quantize_checkpoint(wrapped init).
      box = wrapped.kernel_init(self.make_rng('params'), tuple(kernel_shape),
                                wrapped.param_dtype)
      w = _unboxed(box)
      qarray = _q.quantize(w, method, group_size=self.group_size,
                           double_quant=self.double_quant)
      values, scale = _box_storage(box, qarray, w)
      self.put_variable('params', 'kernel', values)
      self.put_variable('params', 'scale', scale)
      if qarray.stats is not None:
        self.put_variable('params', 'stats', _box_stats(box, qarray))
      if method in _LAYOUT_MARKERS:
        self.put_variable('params', _LAYOUT_MARKERS[method], _layout_marker())
    if not self.has_variable('params', 'kernel'):
      raise ValueError(
          f"{owner} at {path!r}: no 'kernel' in the params; pass the params"
          ' written by peft.quantize_checkpoint(params, method=...)'
      )
    # Boxed storage (nn.Partitioned from quantize_checkpoint or init) is
    # unboxed like linen's own `self.param` does (sharding constraint).
    values = nn.meta.unbox(self.get_variable('params', 'kernel'))
    scale = nn.meta.unbox(self.get_variable('params', 'scale'))
    want_v, want_s = expected.values, expected.scale
    if scale is None or jnp.dtype(values.dtype) != jnp.dtype(want_v.dtype):
      raise ValueError(
          f"{owner} at {path!r}: the params hold a {values.dtype} 'kernel'"
          f"{'' if scale is not None else ' and no scale'}, not the"
          f' {method.value} storage ({want_v.dtype} kernel + scale). Convert'
          ' the float checkpoint with'
          f" peft.quantize_checkpoint(params, method='{method.value}')"
      )
    shape_ok = tuple(values.shape) == tuple(want_v.shape) and jnp.dtype(
        scale.dtype) == jnp.dtype(want_s.dtype)
    if method in (QuantizationMethod.INT4, QuantizationMethod.INT8,
                  QuantizationMethod.FP8) and self.group_size is None:
      # Any per-channel scale that broadcasts against the kernel is fine.
      shape_ok = shape_ok and scale.ndim == values.ndim and all(
          s in (1, v) for s, v in zip(scale.shape, values.shape))
    else:
      shape_ok = shape_ok and tuple(scale.shape) == tuple(want_s.shape)
    if not shape_ok:
      raise ValueError(
          f"{owner} at {path!r}: 'kernel' {tuple(values.shape)} / 'scale'"
          f' {tuple(scale.shape)} do not match a {method.value} kernel of'
          f' shape {tuple(kernel_shape)} (expected {tuple(want_v.shape)} /'
          f' {tuple(want_s.shape)} {want_s.dtype}; check `group_size` and'
          ' `double_quant` against those given to quantize_checkpoint)'
      )
    stats = None
    if expected.stats is not None:
      stats = nn.meta.unbox(self.get_variable('params', 'stats'))
      if stats is None or tuple(stats.shape) != tuple(expected.stats.shape):
        raise ValueError(
            f"{owner} at {path!r}: double_quant=True needs the 'stats' leaf"
            ' written by peft.quantize_checkpoint(params, method=\'nf4\','
            ' double_quant=True)')
    if method in _LAYOUT_MARKERS and not self.has_variable(
        'params', _LAYOUT_MARKERS[method]):
      other = next(m for m in _LAYOUT_MARKERS if m is not method)
      twin = _storage_shapes(kernel_shape, wrapped.param_dtype, other)
      if tuple(twin.values.shape) == tuple(values.shape):
        raise ValueError(
            f'{owner} at {path!r}: {method.value} and {other.value} storage of'
            f' a kernel of shape {tuple(kernel_shape)} look alike, and the'
            f' params have no {_LAYOUT_MARKERS[method]!r} marker saying which'
            ' one they hold; quantize the float checkpoint again with'
            f" peft.quantize_checkpoint(params, method='{method.value}')"
        )
    return _q.QArray(values=values, scale=scale, method=method,
                     shape=tuple(kernel_shape), group_size=expected.group_size,
                     stats=stats, axes=expected.axes)


class SimulateQuantizedDense(_QuantizedWrapper):
  """Wraps an `nn.Dense`; its kernel is fake-quantized in the forward pass.

  Same params as the wrapped layer (initialised identically). Forward:
  `peft.nnx.quantized.SimulateQuantizedLinear` (kernel ->
  `simulate_quantize(kernel, method)`, per output channel for INT4 / INT8);
  the gradient passes straight through to the float kernel.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> class MyModel(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     layer = peft.SimulateQuantizedDense(
    ...         wrapped=nn.Dense(32), method=peft.QuantizationMethod.Q4_0)
    ...     return layer(x)
    >>> params = MyModel().init(jax.random.key(0), jnp.ones((1, 8)))['params']
    >>> jax.tree.map(jnp.shape, params)
    {'Dense_0': {'bias': (32,), 'kernel': (8, 32)}}

  Attributes:
    wrapped: the `nn.Dense`.
    method: a `QuantizationMethod` (or its name); Q4_0 needs `features` and
      Q4_0_TRANSPOSE the input size to be multiples of 32.
  """

  _wrapped_type = nn.Dense

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    dense = self.wrapped
    kernel = self.param('kernel', dense.kernel_init,
                        (jnp.shape(inputs)[-1], dense.features),
                        dense.param_dtype)
    bias = self._float_bias((dense.features,))
    layer = _nnx_q.SimulateQuantizedLinear(
        _nnx_linear(dense, kernel, bias), method=self._method,
        group_size=self.group_size, double_quant=self.double_quant)
    return layer(inputs)


class SimulateQuantizedEinsum(_QuantizedWrapper):
  """Wraps an `nn.Einsum`; its kernel is fake-quantized in the forward pass.

  INT4 / INT8 scales are per channel, reduced over the contracted kernel
  axes (`peft.einsum.reduced_weight_axes`). Forward:
  `peft.nnx.quantized.SimulateQuantizedEinsum`.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> layer = peft.SimulateQuantizedEinsum(
    ...     wrapped=nn.Einsum(shape=(4, 2, 3), einsum_str='bi,imn->bmn'),
    ...     method='int4')
    >>> y, v = layer.init_with_output(jax.random.key(0), jnp.ones((5, 4)))
    >>> y.shape, jax.tree.map(jnp.shape, v['params'])
    ((5, 2, 3), {'bias': (2, 3), 'kernel': (4, 2, 3)})

  Attributes:
    wrapped: the `nn.Einsum`.
    method: a `QuantizationMethod` (or its name).
  """

  _wrapped_type = nn.Einsum

  @nn.compact
  def __call__(self, inputs: Array, einsum_str: str | None = None) -> Array:
    einsum = self.wrapped
    einsum_str = self._einsum_str(einsum_str)
    kernel = self.param('kernel', einsum.kernel_init, tuple(einsum.shape),
                        einsum.param_dtype)
    bias = None
    if einsum.use_bias:
      geometry = _geometry.Geometry.from_einsum(einsum_str, tuple(einsum.shape))
      bias = self._float_bias(_einsum_bias_shape(geometry, jnp.ndim(inputs)))
    layer = _nnx_q.SimulateQuantizedEinsum(
        _nnx_einsum(einsum, einsum_str, kernel, bias), method=self._method,
        group_size=self.group_size, double_quant=self.double_quant)
    return layer(inputs)


class Int4Dense(_QuantizedWrapper):
  """Wraps an `nn.Dense` whose params were written by `quantize_checkpoint`.

  Reads `{'kernel': values, 'scale': scale, 'bias': ...}` (INT4 by default;
  INT8, Q4_0 and Q4_0_TRANSPOSE too, with the matching `method`) and computes
  the layer with `peft.nnx.quantized.Int4Linear`, which dequantizes the
  weight block by block inside the matmul. The output equals
  `SimulateQuantizedDense` with the same method on the float params (to
  float32 rounding). `init` gives the quantized form of the wrapped layer's
  own initialisation.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> class MyModel(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     layer = peft.Int4Dense(
    ...         wrapped=nn.Dense(32), method=peft.QuantizationMethod.Q4_0)
    ...     return layer(x)
    >>> x = jnp.ones((1, 8))
    >>> params = nn.Dense(32).init(jax.random.key(0), x)['params']
    >>> params_q = peft.quantize_checkpoint(params, method='q4_0')
    >>> MyModel().apply({'params': {'Dense_0': params_q}}, x).shape
    (1, 32)

  Attributes:
    wrapped: the `nn.Dense`.
    method: INT4 (default), INT8, FP8, NF4, Q4_0 or Q4_0_TRANSPOSE.
    group_size: as given to `quantize_checkpoint` (INT4 / INT8 / FP8 groups,
      NF4 block size).
    double_quant: NF4 only, as given to `quantize_checkpoint`.
  """

  _wrapped_type = nn.Dense
  packed: ClassVar[bool] = True

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    dense = self.wrapped
    in_features = jnp.shape(inputs)[-1]
    qarray = self._quantized_kernel((in_features, dense.features))
    bias = self._float_bias((dense.features,))
    module = _loaded(lambda: _nnx_q.Int4Linear(
        in_features, dense.features, use_bias=dense.use_bias,
        **_quantized_kwargs(dense, self._method, qarray)), qarray, bias)
    return module(inputs)


class Int4Einsum(_QuantizedWrapper):
  """Wraps an `nn.Einsum` whose params were written by `quantize_checkpoint`.

  Reads `{'kernel': values, 'scale': scale, ...}` and computes the layer with
  `peft.nnx.quantized.Int4Einsum`. `quantize_checkpoint` gives per-channel
  scales over all axes but the last (`[1, ..., 1, out]`); when the kernel's
  contracted axes are exactly those (e.g. `'btd,df->btf'`,
  `'ebd,edf->ebf'` with batch axes aside) the output equals
  `SimulateQuantizedEinsum`; other scale layouts are dequantized as stored.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> einsum = nn.Einsum(shape=(64, 32), einsum_str='bd,df->bf')
    >>> x = jnp.ones((2, 64))
    >>> params_q = peft.quantize_checkpoint(
    ...     einsum.init(jax.random.key(0), x)['params'], method='int4')
    >>> layer = peft.Int4Einsum(wrapped=einsum)
    >>> layer.apply({'params': params_q}, x).shape
    (2, 32)

  Attributes:
    wrapped: the `nn.Einsum`.
    method: INT4 (default), INT8, FP8, NF4, Q4_0 or Q4_0_TRANSPOSE.
    group_size: as given to `quantize_checkpoint` (INT4 / INT8 / FP8 groups,
      NF4 block size).
    double_quant: NF4 only, as given to `quantize_checkpoint`.
  """

  _wrapped_type = nn.Einsum
  packed: ClassVar[bool] = True

  @nn.compact
  def __call__(self, inputs: Array, einsum_str: str | None = None) -> Array:
    einsum = self.wrapped
    einsum_str = self._einsum_str(einsum_str)
    kernel_shape = tuple(einsum.shape)
    qarray = self._quantized_kernel(kernel_shape)
    geometry = _geometry.Geometry.from_einsum(einsum_str, kernel_shape)
    bias_shape = None
    if einsum.use_bias:
      bias_shape = _einsum_bias_shape(geometry, jnp.ndim(inputs))
    bias = self._float_bias(bias_shape) if bias_shape is not None else None
    # Per-channel scales over other axes than the layer's contracted ones
    # (quantize_checkpoint reduces all but the last axis) are read as stored:
    # the matmul then dequantizes the kernel whole (peft.kernels).
    module = _loaded(lambda: _nnx_q.Int4Einsum(
        einsum_str, kernel_shape, bias_shape,
        **_quantized_kwargs(einsum, self._method, qarray)), qarray, bias)
    return module(inputs)

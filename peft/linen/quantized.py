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

from collections.abc import Mapping
import dataclasses
from typing import Any, ClassVar

from flax import linen as nn
from flax import nnx
from flax.linen import dtypes as _linen_dtypes
import jax
from jax import lax
import jax.numpy as jnp

from peft import _compat
from peft import einsum as _einsum
from peft import quantization as _q
from peft.linen.lora import _unboxed
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

_PACKED_METHODS = (
    QuantizationMethod.INT4,
    QuantizationMethod.INT8,
    QuantizationMethod.Q4_0,
    QuantizationMethod.Q4_0_TRANSPOSE,
)


# ---------------------------------------------------------------------------
# Checkpoint quantization.
# ---------------------------------------------------------------------------


def _path_str(path) -> str:
  return '/'.join(str(p) for p in path) or '<root>'


def _as_method(method: Any, what: str, packed: bool) -> QuantizationMethod:
  if not isinstance(method, (QuantizationMethod, str)):
    raise TypeError(
        f'{what}: `method` must be a peft.QuantizationMethod or its name'
        f" (e.g. 'int4'), got {type(method).__name__}"
    )
  method = QuantizationMethod(method)  # ValueError listing valid names
  if packed and method not in _PACKED_METHODS:
    raise ValueError(
        f'{what}: method={method.value!r} has no packed storage; use one of'
        f' {[m.value for m in _PACKED_METHODS]} (SimulateQuantized* layers'
        ' accept every method).'
    )
  return method


def _mesh_axis_size(name, mesh) -> int | None:
  """Devices along the mesh axis (or axes) `name`; None when unknown."""
  if mesh is None or name is None:
    return None
  axes = (name,) if isinstance(name, str) else tuple(name)
  sizes = dict(mesh.shape)
  if not all(isinstance(a, str) and a in sizes for a in axes):
    return None  # e.g. logical names (nn.LogicallyPartitioned)
  size = 1
  for a in axes:
    size *= int(sizes[a])
  return size


def _known_mesh(box: nn.Partitioned, value):
  """The mesh the storage will be placed on, if it can be known here."""
  if box.mesh is not None:
    return box.mesh
  sharding = getattr(value, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return sharding.mesh
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _block_name(name, n_blocks: int, mesh):
  """The block axis keeps the kernel axis' name if the mesh splits it evenly.

  Sharding the `K // 32` blocks like the kernel's `K` axis keeps whole blocks
  on each device; it only works when the mesh axis size divides the number
  of blocks (unknown mesh: the name is kept).
  """
  size = _mesh_axis_size(name, mesh)
  if size is not None and n_blocks % size:
    return None
  return name


def _storage_names(names, method, kernel_shape, scale_shape, mesh):
  """(values names, scale names) of the storage of a kernel named `names`.

  The layout rule is `peft.quantization.storage_names`; here the Q4_0 block
  axis keeps its name only when the mesh divides the block count.
  """
  reduced = tuple(i for i, (s, d) in enumerate(zip(scale_shape, kernel_shape))
                  if s != d)
  values, scale = _q.storage_names(method, names, reduced)
  if method in (QuantizationMethod.Q4_0, QuantizationMethod.Q4_0_TRANSPOSE):
    axis = -1 if method == QuantizationMethod.Q4_0 else -2
    block = _block_name(scale[-1], kernel_shape[axis] // 32, mesh)
    scale = (*scale[:-1], block)
    values = (*scale, None)
  return values, scale


def _box_storage(box, qarray, kernel):
  """`qarray`'s values and scale boxed like the kernel's `box`."""
  if not isinstance(box, nn.Partitioned):
    return qarray.values, qarray.scale
  values_names, scale_names = _storage_names(
      box.names, qarray.method, tuple(qarray.shape), tuple(qarray.scale.shape),
      _known_mesh(box, kernel))
  return (box.replace(value=qarray.values, names=values_names),
          box.replace(value=qarray.scale, names=scale_names))


def _quantize_tree(node: Mapping, method, path) -> Mapping:
  out = {}
  for key, value in node.items():
    if isinstance(value, Mapping):
      out[key] = _quantize_tree(value, method, path + (key,))
    else:
      out[key] = value
  box = kernel = node.get('kernel')
  if isinstance(kernel, nn.meta.AxisMetadata):  # e.g. nn.Partitioned
    kernel = _unboxed(kernel)
  if kernel is not None and not isinstance(kernel, Mapping):
    where = _path_str(path + ('kernel',))
    if 'scale' in node:
      raise ValueError(
          f'quantize_checkpoint: {where!r} already has a sibling'
          " 'scale'; the params look quantized already (quantize the float"
          ' checkpoint once)'
      )
    if getattr(kernel, 'ndim', 0) < 2:
      raise ValueError(
          f'quantize_checkpoint: {where!r} is not an array with at least 2'
          f' axes (got {type(kernel).__name__} of shape'
          f' {getattr(kernel, "shape", None)}); only layer kernels can be'
          ' quantized'
      )
    try:
      qarray = _q.quantize(jnp.asarray(kernel), method)
    except ValueError as e:
      raise ValueError(f'quantize_checkpoint: {where!r}: {e}') from e
    out['kernel'], out['scale'] = _box_storage(box, qarray, kernel)
  if type(node) is dict:  # pylint: disable=unidiomatic-typecheck
    return out
  try:
    return type(node)(out)
  except Exception:  # pylint: disable=broad-except
    return out


def quantize_checkpoint(
    params: Mapping[str, Any],
    method: QuantizationMethod | str = QuantizationMethod.INT4,
) -> Mapping[str, Any]:
  """Really quantizes every `kernel` of a linen params tree.

  Each `{'kernel': w, ...}` becomes `{'kernel': values, 'scale': scale, ...}`
  with the layout of `peft.quantization.quantize(w, method)`:

  * INT4 / INT8: `values` int4 / int8 with `w`'s shape, `scale` float32 of
    shape `[1, ..., 1, out]` (per output channel); the kernel is
    `values / scale`.
  * Q4_0: blocks of 32 along the last axis, 4.5 bits per weight: `values`
    uint8 `(*lead, K // 32, 16)` (packed nibbles, ggml layout) and `scale`
    float16 `(*lead, K // 32)`. Q4_0_TRANSPOSE: blocks along axis -2.

  Other leaves (biases, norms, LoRA `a`/`b`) are untouched; the input is not
  modified. A kernel boxed in `nn.Partitioned` (`nn.with_partitioning`) gives
  boxed `kernel` and `scale` of the same box class and mesh, so
  `nn.get_partition_spec` shards the storage like the kernel: INT4 / INT8
  values take the kernel's names and the scale `(None, ..., out_name)`; Q4_0
  values `(*lead_names, K_name, None)` and scale `(*lead_names, K_name)`,
  where the block axis keeps `K_name` only when the mesh (if known) divides
  the number of blocks `K // 32` (Q4_0_TRANSPOSE: the same along axis -2).
  `Int4Dense` / `Int4Einsum` read the result, boxed or not.

  Examples:
    >>> import jax.numpy as jnp
    >>> import peft
    >>> params = {'dense': {'kernel': jnp.ones((64, 32)), 'bias': jnp.zeros(32)}}
    >>> q = peft.quantize_checkpoint(params, method=peft.QuantizationMethod.Q4_0)
    >>> q['dense']['kernel'].shape, q['dense']['scale'].dtype
    ((64, 1, 16), dtype('float16'))

  Args:
    params: nested mapping of params (e.g. `model.init(...)['params']`).
    method: INT4 (default), INT8, Q4_0 or Q4_0_TRANSPOSE.

  Returns:
    A new tree of the same mapping kind.

  Raises:
    ValueError: for a method without packed storage, a kernel whose block
      axis is not a multiple of 32 (Q4_0), or an already quantized tree.
  """
  method = _as_method(method, 'quantize_checkpoint', packed=True)
  if not isinstance(params, Mapping):
    raise TypeError(
        'quantize_checkpoint: `params` must be a nested mapping (dict /'
        f' FrozenDict) of arrays, got {type(params).__name__}'
    )
  return _quantize_tree(params, method, ())


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


def _int4_module(int4_cls, make_float, qarray, bias, method):
  """An NNX `Int4*` layer holding `qarray` (no quantization is run)."""
  module = nnx.eval_shape(lambda: int4_cls.from_float(make_float(),
                                                      method=method))
  module.weight = _nnx_q.QuantizedWeight(qarray)
  module.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
  return module


# ---------------------------------------------------------------------------
# Linen modules.
# ---------------------------------------------------------------------------


def _check_wrapped(owner: str, wrapped: Any, layer_type: type) -> None:
  if not isinstance(wrapped, layer_type):
    raise TypeError(
        f'{owner}: `wrapped` must be an nn.{layer_type.__name__}, got'
        f' {type(wrapped).__name__}; use the *Dense class for nn.Dense and'
        ' the *Einsum class for nn.Einsum'
    )


class _QuantizedWrapper(nn.Module):
  """Fields and checks of the wrappers; shares the wrapped layer's scope.

  Sharing the scope keeps the params where the wrapped layer had them.
  """

  _: dataclasses.KW_ONLY
  wrapped: nn.Module
  method: QuantizationMethod | str = QuantizationMethod.INT4

  _wrapped_type: ClassVar[type[nn.Module]]
  # Lets LoRA wrappers find the float layer under a quantization wrapper.
  _peft_wraps_layer = True
  # True when the params hold packed storage rather than the float kernel.
  _peft_packed = False

  def _peft_float_kernel_names(self, names):
    """The float kernel's sharding names from those of the stored `kernel`."""
    if not self._peft_packed:
      return tuple(names)
    return _q.kernel_names(self._method, names)

  def __post_init__(self):
    owner = type(self).__name__
    _check_wrapped(owner, self.wrapped, self._wrapped_type)
    _as_method(self.method, owner, packed=self._peft_packed)
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
      expected = jax.eval_shape(
          lambda: _q.quantize(jnp.zeros(kernel_shape, wrapped.param_dtype),
                              method)
      )
    except ValueError as e:
      raise ValueError(
          f'{owner} at {path!r}: kernel of shape {tuple(kernel_shape)} cannot'
          f' be stored as {method.value}: {e}'
      ) from e
    has_kernel = self.has_variable('params', 'kernel')
    if not has_kernel and self.is_mutable_collection('params'):
      # init: quantize a freshly initialised float kernel (same rng as the
      # wrapped layer would use), i.e. quantize_checkpoint(wrapped init).
      box = wrapped.kernel_init(self.make_rng('params'), tuple(kernel_shape),
                                wrapped.param_dtype)
      w = _unboxed(box)
      values, scale = _box_storage(box, _q.quantize(w, method), w)
      self.put_variable('params', 'kernel', values)
      self.put_variable('params', 'scale', scale)
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
    shape_ok = tuple(values.shape) == tuple(want_v.shape)
    if method in (QuantizationMethod.INT4, QuantizationMethod.INT8):
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
          f' {tuple(want_s.shape)})'
      )
    return _q.QArray(values=values, scale=scale, method=method,
                     shape=tuple(kernel_shape))


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
        _nnx_linear(dense, kernel, bias), method=self._method)
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
      bias = self._float_bias(_compat.linen_einsum_bias_shape(
          einsum, einsum_str, inputs, kernel))
    layer = _nnx_q.SimulateQuantizedEinsum(
        _nnx_einsum(einsum, einsum_str, kernel, bias), method=self._method)
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
    method: INT4 (default), INT8, Q4_0 or Q4_0_TRANSPOSE.
  """

  _wrapped_type = nn.Dense
  _peft_packed = True

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    dense = self.wrapped
    in_features = jnp.shape(inputs)[-1]
    qarray = self._quantized_kernel((in_features, dense.features))
    bias = self._float_bias((dense.features,))
    zeros = jnp.zeros((), dense.param_dtype)

    def make_float():
      return nnx.Linear(
          in_features, dense.features, rngs=nnx.Rngs(0),
          kernel_init=lambda k, s, d: jnp.broadcast_to(zeros, s),
          **_linear_kwargs(dense),
      )

    module = _int4_module(_nnx_q.Int4Linear, make_float, qarray, bias,
                          self._method)
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
    method: INT4 (default), INT8, Q4_0 or Q4_0_TRANSPOSE.
  """

  _wrapped_type = nn.Einsum
  _peft_packed = True

  @nn.compact
  def __call__(self, inputs: Array, einsum_str: str | None = None) -> Array:
    einsum = self.wrapped
    einsum_str = self._einsum_str(einsum_str)
    kernel_shape = tuple(einsum.shape)
    qarray = self._quantized_kernel(kernel_shape)
    bias = None
    if einsum.use_bias:
      probe = jax.ShapeDtypeStruct(kernel_shape, einsum.param_dtype)
      bias = self._float_bias(_compat.linen_einsum_bias_shape(
          einsum, einsum_str, inputs, probe))
    method = self._method
    scale_fits_nnx = True
    if method in (QuantizationMethod.INT4, QuantizationMethod.INT8):
      # The blockwise matmul wants one scale per non-contracted kernel index.
      reduced = _einsum.reduced_weight_axes(einsum_str)
      want = tuple(1 if i in reduced else d for i, d in enumerate(kernel_shape))
      scale_fits_nnx = tuple(qarray.scale.shape) == want
    if not scale_fits_nnx:
      # Per-channel scales over another set of axes than the layer's
      # contracted ones: the blockwise matmul cannot use them; dequantize
      # the kernel as stored and run the float layer.
      kernel = _q.dequantize(qarray, einsum.param_dtype)
      return _nnx_einsum(einsum, einsum_str, kernel, bias)(inputs)
    zeros = jnp.zeros((), einsum.param_dtype)

    def make_float():
      return nnx.Einsum(
          einsum_str, kernel_shape,
          None if bias is None else tuple(bias.shape), rngs=nnx.Rngs(0),
          kernel_init=lambda k, s, d: jnp.broadcast_to(zeros, s),
          **_einsum_kwargs(einsum),
      )

    module = _int4_module(_nnx_q.Int4Einsum, make_float, qarray, bias,
                          method)
    return module(inputs)

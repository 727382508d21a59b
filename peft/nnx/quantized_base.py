"""The two quantized layer classes, for any registered layer geometry.

* `SimulateQuantized(wrapped, method=...)`: quantization-aware training; the
  wrapped layer's own forward with `simulate_quantize(kernel, method)` (per
  channel over the contracted axes of its geometry), straight-through
  gradient to the float kernel, which stays the trainable param.
* `QuantizedLayer(geometry, method=...)`: an inference layer holding real
  packed storage (int4 / int8 / fp8 per channel or group, ggml Q4_0 or
  bitsandbytes NF4 blocks) in two
  `QuantizedWeight` variables, `values` and `scale`, allocated from shapes;
  `QuantizedLayer.from_float(layer)` quantizes a float layer into one. The
  matmul is `peft.kernels.quantized_einsum` (`strategy=` chooses how).

`peft.nnx.quantized` re-exports both, with the thin subclasses named after
flax's layers (`Int4Linear`, `SimulateQuantizedEinsum`, ...); the storage
layout and its sharding are described there.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> layer = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  >>> q = QuantizedLayer.from_float(layer, method='q4_0')
  >>> q(jnp.ones((2, 64))).shape, q.nbytes  # 64*32 weights in 18-byte blocks
  ((2, 32), 1152)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from peft import kernels
from peft.geometry import Geometry
from peft.nnx.quantized_simulate import SimulateQuantized
from peft.nnx.quantized_simulate import _check_quant_args
from peft.nnx.quantized_simulate import _layer_entry
from peft.nnx.quantized_simulate import _reduced_axes
from peft.nnx.quantized_storage import QuantizedWeight
from peft.nnx.quantized_storage import as_method as _as_method
from peft.nnx.quantized_storage import check_storage as _check_storage
from peft.nnx.quantized_storage import storage_layout as _storage_layout
from peft.nnx.quantized_storage import kernel_names as _kernel_names
from peft.nnx.quantized_storage import storage_variable as _storage_variable
from peft.quantization import QArray
from peft.quantization import QuantizationMethod
from peft.quantization import dequantize
from peft.quantization import quantize
from peft.quantization import storage_names

__all__ = ['QuantizedWeight', 'SimulateQuantized', 'QuantizedLayer']

_Q4_0 = (QuantizationMethod.Q4_0, QuantizationMethod.Q4_0_TRANSPOSE)
_PACKED = (QuantizationMethod.INT4, QuantizationMethod.INT8, *_Q4_0,
           QuantizationMethod.FP8, QuantizationMethod.NF4)
_SCALED = (QuantizationMethod.INT4, QuantizationMethod.INT8,
           QuantizationMethod.FP8)
_promote_dtype = nnx.nn.dtypes.promote_dtype


class QuantizedLayer(nnx.Module):
  """A layer of any geometry with a really quantized (int4/int8/Q4_0) kernel.

  `__init__` allocates the storage of a zero kernel from shapes (load real
  weights with `set_weight`, `nnx.update`, a checkpoint, or build the layer
  with `from_float`). Outputs are `einsum(x, dequantize(qarray)) + bias` in
  the layout of `geometry`, computed by `peft.kernels.quantized_einsum`.

  Args:
    geometry: the `peft.geometry.Geometry` of one layer; its `bias_shape`
      (None: no bias) gives the bias.
    method: INT4 (default), INT8, FP8, NF4, Q4_0 or Q4_0_TRANSPOSE (or
      their names).
    dtype: computation dtype (None: promoted from inputs and `param_dtype`).
    param_dtype: dtype of the float kernel (and of the bias).
    precision: `lax.Precision` of the matmul.
    preferred_element_type: output dtype of the matmul (None: compute dtype).
    promote_dtype: flax-style `promote_dtype((x, kernel, bias), dtype=)`.
    leading_shape: stacking axes (`nnx.vmap`) in front of the kernel.
    kernel_sharding: sharding names of the float kernel (with the leading
      axes), or None; the storage is annotated (and, under a mesh with eager
      sharding, placed) accordingly.
    strategy: `'auto'`, `'blockwise'` or `'fused'` (see `peft.kernels`).
    group_size: INT4 / INT8 / FP8: one scale per `group_size` contracted
      values (None: per output channel); NF4: the block size (None: 64).
    double_quant: NF4 only: 8-bit block absmax (bitsandbytes'
      `compress_statistics=True`); adds the `stats` variable.

  Attributes:
    values, scale: the `QuantizedWeight` storage (scales per channel, per
      group or per NF4 block, laid out like the values).
    stats: NF4 double-quantization statistics (a `QuantizedWeight`), or
      None.
    bias: an `nnx.Param` or None.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft.geometry import Geometry
    >>> layer = QuantizedLayer(Geometry.from_einsum('bd,dnh->bnh', (64, 2, 8)),
    ...                        method='int8')
    >>> layer.values.shape, layer.scale.shape, layer(jnp.ones((3, 64))).shape
    ((64, 2, 8), (1, 2, 8), (3, 2, 8))
  """

  _float_type: type | None = None  # the float layer type `from_float` takes

  def __init__(
      self,
      geometry: Geometry,
      *,
      method: QuantizationMethod | str = QuantizationMethod.INT4,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      precision: Any = None,
      preferred_element_type: Any = None,
      promote_dtype: Any = _promote_dtype,
      leading_shape: Sequence[int] = (),
      kernel_sharding: Sequence[Any] | None = None,
      strategy: str = 'auto',
      group_size: int | None = None,
      double_quant: bool = False,
  ):
    what = type(self).__name__
    if not isinstance(geometry, Geometry):
      raise TypeError(f'{what}: `geometry` must be a peft.geometry.Geometry,'
                      f' got {type(geometry).__name__}')
    method = _as_method(method, what)
    if method not in _PACKED:
      raise ValueError(
          f'{what}: `method`={method.value!r} has no packed storage; use one'
          f' of {[m.value for m in _PACKED]} (or SimulateQuantized* for fake'
          ' quantization).'
      )
    kernels.choose_strategy(strategy)  # ValueError for an unknown one
    leading_shape = tuple(int(d) for d in leading_shape)
    shape = (*leading_shape, *geometry.kernel_shape)
    _check_storage(method, geometry, shape, kernel_sharding, what)
    _check_quant_args(method, shape, geometry, group_size, double_quant,
                      what, stacked=bool(leading_shape))
    self.geometry = geometry
    self.method = method
    self.dtype = dtype
    self.param_dtype = jnp.dtype(param_dtype)
    self.precision = precision
    self.preferred_element_type = preferred_element_type
    self.promote_dtype = promote_dtype
    self.strategy = strategy
    # The storage of an all-zero kernel, in the codec's own layout.
    layout = _storage_layout(method, shape, self.param_dtype,
                             _reduced_axes(geometry, len(leading_shape)),
                             group_size, double_quant)
    values = jnp.zeros(layout.values.shape, layout.values.dtype)
    scale_fill = jnp.ones if method in _SCALED else jnp.zeros  # zero kernel
    scale = scale_fill(layout.scale.shape, layout.scale.dtype)
    stats = None if layout.stats is None else jnp.zeros(layout.stats.shape)
    self._store(QArray(values, scale, method, shape, layout.group_size,
                       stats, layout.axes), kernel_sharding)
    if geometry.bias_shape is not None:
      self.bias = nnx.Param(
          jnp.zeros((*leading_shape, *geometry.bias_shape), self.param_dtype))
    else:
      self.bias = nnx.data(None)

  @classmethod
  def _layer_args(cls, layer, geometry: Geometry) -> dict[str, Any]:
    """Constructor arguments that fix the geometry, read from `layer`."""
    del layer
    return {'geometry': geometry}

  @classmethod
  def from_float(cls, layer, *, method=None, strategy: str = 'auto',
                 group_size: int | None = None, double_quant: bool = False):
    """Quantizes a float layer (or its `SimulateQuantized` wrapper).

    The layer is built from the float layer's geometry (stacked kernels from
    `nnx.vmap` keep their leading axes), then its kernel is quantized into
    the storage, sharded like the float kernel when that has sharding names.
    A concrete kernel holding NaN or inf raises the `ValueError` of
    `peft.quantization.quantize`. The bias is copied.

    Args:
      layer: a registered float layer (`nnx.Linear`, `nnx.Einsum`, ...; the
        `Int4*` subclasses need their own type), or a `SimulateQuantized`
        wrapper of one (then `method` defaults to the wrapper's method).
      method: INT4 (default), INT8, FP8, NF4, Q4_0 or Q4_0_TRANSPOSE, as an
        enum or name (case-insensitive).
      strategy: the matmul strategy (see `peft.kernels`).
      group_size: INT4 / INT8 / FP8: one scale per `group_size` contracted
        values (None: per output channel); NF4: the block size (None: 64).
        From a `SimulateQuantized` wrapper, its own when None.
      double_quant: NF4 only: 8-bit absmax (bitsandbytes'
        `compress_statistics=True`).

    Returns:
      The quantized layer; `layer` is not modified.

    Examples:
      >>> from flax import nnx
      >>> q = QuantizedLayer.from_float(nnx.Linear(64, 8, rngs=nnx.Rngs(0)))
      >>> type(q).__name__, q.kernel_shape, q.method.value
      ('QuantizedLayer', (64, 8), 'int4')
    """
    what = f'{cls.__name__}.from_float'
    if isinstance(layer, SimulateQuantized):
      if method is None:
        method = layer.method
        group_size = layer.group_size if group_size is None else group_size
        double_quant = double_quant or layer.double_quant
      layer = layer.wrapped
    method = _as_method(QuantizationMethod.INT4 if method is None else method,
                        what)
    if cls._float_type is not None and not isinstance(layer, cls._float_type):
      raise TypeError(
          f'{what}: `wrapped` must be an nnx.{cls._float_type.__name__}, got'
          f' {type(layer).__name__}; use the Int4* class of the layer type, or'
          ' QuantizedLayer for any registered layer.')
    entry = _layer_entry(layer, what)
    geometry = entry.geometry(layer)
    kernel_var = getattr(layer, entry.kernel)
    kernel = kernel_var[...]
    lead = geometry.lead_shape(kernel.shape)
    names = _kernel_names(kernel_var)
    kwargs = dict(
        method=method, dtype=getattr(layer, 'dtype', None),
        param_dtype=kernel.dtype, precision=getattr(layer, 'precision', None),
        preferred_element_type=getattr(layer, 'preferred_element_type', None),
        leading_shape=lead, kernel_sharding=names, strategy=strategy,
        group_size=group_size, double_quant=double_quant,
    )
    if getattr(layer, 'promote_dtype', None) is not None:
      kwargs['promote_dtype'] = layer.promote_dtype
    args = cls._layer_args(layer, geometry)
    new = nnx.eval_shape(lambda: cls(**args, **kwargs))  # nothing allocated
    # An empty kernel has no values to check: quantize it traced.
    fn = quantize if kernel.size else jax.jit(
        quantize, static_argnums=(1, 2), static_argnames=(
            'group_size', 'double_quant'))
    try:
      qarray = fn(kernel, method, _reduced_axes(geometry, len(lead)),
                  group_size=group_size, double_quant=double_quant)
    except ValueError as e:
      raise ValueError(f'{what}: kernel of shape {kernel.shape}: {e}') from e
    new._store(qarray, names, kernel_var.get_metadata(), like=kernel)
    bias = getattr(layer, entry.bias, None) if entry.bias else None
    new.bias = bias.copy() if bias is not None else nnx.data(None)
    return new

  def _store(self, qarray, names, source_meta=None, like=None):
    """Sets the `values` / `scale` variables from a `QArray` (see class)."""
    shape = kernels.kernel_shape(qarray)
    lead = len(self.geometry.lead_shape(shape))
    self.method = qarray.method
    self.group_size = qarray.group_size
    self.axes = qarray.axes
    extra = {}
    vnames = snames = None
    if names is not None and len(names) == len(shape):
      vnames, snames = storage_names(
          qarray.method, names, _reduced_axes(self.geometry, lead),
          group_size=qarray.group_size, shape=shape)
      extra['kernel_sharding'] = tuple(names)
    self.values = _storage_variable(qarray.values, vnames, source_meta, like,
                                    **extra)
    self.scale = _storage_variable(qarray.scale, snames, source_meta, like)
    if qarray.stats is None:
      self.stats = nnx.data(None)
    else:  # a few floats for the whole kernel: replicated
      self.stats = _storage_variable(
          qarray.stats, None if snames is None else (None,), source_meta,
          like)

  def set_weight(self, value) -> None:
    """Replaces the storage by a `QArray` (or a `QuantizedWeight` of one).

    The method becomes the QArray's. Sharding names come from the
    variable's `kernel_sharding` metadata, else stay the current ones.

    Raises:
      TypeError: `value` is not a QArray.
      ValueError: its kernel shape does not end with the geometry's.
    """
    meta = {}
    if isinstance(value, nnx.Variable):
      meta = dict(value.get_metadata())
      value = value.get_value()
    if not isinstance(value, QArray):
      raise TypeError(
          f'{type(self).__name__}.weight must be set to a QArray (or a'
          f' QuantizedWeight holding one), got {type(value).__name__}.'
      )
    value = dataclasses.replace(value, shape=kernels.kernel_shape(value))
    names = meta.get('kernel_sharding')
    if names is None and kernels.kernel_shape(value) == self.kernel_shape:
      old = self.values.get_metadata()
      names = old.get('kernel_sharding')
      meta = {**old, **meta}
    self._store(value, None if names is None else tuple(names), meta)

  @property
  def qarray(self) -> QArray:
    """The quantized kernel as a `QArray` rebuilt from `values` and `scale`."""
    stats = None if self.stats is None else self.stats.get_value()
    q = QArray(values=self.values.get_value(), scale=self.scale.get_value(),
               method=self.method, shape=(), group_size=self.group_size,
               stats=stats, axes=self.axes)
    return dataclasses.replace(q, shape=kernels.kernel_shape(q))

  @property
  def weight(self) -> QuantizedWeight:
    """A view of the kernel: a `QuantizedWeight` holding `qarray`.

    Its metadata has the float kernel's names as `kernel_sharding` (and the
    `mesh` if any). Assigning `layer.weight = ...` calls `set_weight`.
    """
    vmeta = self.values.get_metadata()
    meta = {k: vmeta[k] for k in ('kernel_sharding', 'mesh', 'sharding_rules')
            if vmeta.get(k) is not None}
    return QuantizedWeight(self.qarray, eager_sharding=False, **meta)

  @weight.setter
  def weight(self, value) -> None:
    self.set_weight(value)

  @property
  def kernel_sharding(self) -> tuple[Any, ...] | None:
    """The float kernel's sharding names (None when it had none)."""
    names = self.values.get_metadata().get('kernel_sharding')
    return None if names is None else tuple(names)

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the float kernel (with any leading stacking axes)."""
    return kernels.kernel_shape(self.qarray)

  @property
  def nbytes(self) -> int:
    """Bytes of the quantized kernel: packed values plus scales (no bias).

    INT4: 0.5 byte per weight plus float32 per-channel scales; Q4_0 and
    Q4_0_TRANSPOSE: 18 bytes per 32 weights (0.5625 byte per weight).
    """
    return int(self.qarray.nbytes)

  def storage_partition_specs(self, kernel_names=None) -> QArray:
    """PartitionSpecs for the packed storage, shaped like the `QArray`.

    Maps the float kernel's sharding names (default: `kernel_sharding`)
    onto `values` and `scale` with `peft.quantization.storage_names`.

    Examples:
      >>> from flax import nnx
      >>> q = QuantizedLayer.from_float(
      ...     nnx.Linear(64, 32, rngs=nnx.Rngs(0)), method='q4_0')
      >>> specs = q.storage_partition_specs(('embed', 'mlp'))
      >>> specs.values, specs.scale
      (P('embed', 'mlp', None), P('embed', 'mlp'))
    """
    shape = self.kernel_shape
    if kernel_names is None:
      kernel_names = self.kernel_sharding or (None,) * len(shape)
    names = tuple(kernel_names)
    if len(names) != len(shape):
      raise ValueError(
          f'kernel_names={names} must name each of the {len(shape)} axes of'
          f' the kernel (shape {shape}); use None for unsharded axes.'
      )
    lead = len(self.geometry.lead_shape(shape))
    values, scale = storage_names(self.method, names,
                                  _reduced_axes(self.geometry, lead),
                                  group_size=self.group_size, shape=shape)
    stats = None if self.stats is None else PartitionSpec(None)
    return QArray(values=PartitionSpec(*values), scale=PartitionSpec(*scale),
                  method=self.method, shape=shape,
                  group_size=self.group_size, stats=stats, axes=self.axes)

  def dequantized_kernel(self, dtype: Any = None) -> jax.Array:
    """The float kernel (`param_dtype` by default), with leading axes."""
    return dequantize(self.qarray, dtype or self.param_dtype)

  def to_float(self):
    """The float layer (defined by the `Int4*` subclasses of flax's layers).

    A generic `QuantizedLayer` does not know its float layer type: use
    `dequantized_kernel()` and load it into a layer of that type.
    """
    raise TypeError(
        f'{type(self).__name__}.to_float: only the Int4Linear / Int4Einsum /'
        ' Int4LinearGeneral layers know their float layer type; use'
        ' dequantized_kernel() and load it into a layer of yours')

  def _float_layer(self, layer):
    """Puts the dequantized kernel and the bias into a new float `layer`."""
    layer.kernel = _storage_variable(
        self.dequantized_kernel(), self.kernel_sharding,
        self.values.get_metadata(), like=self.values.get_value(),
        var_type=nnx.Param)
    if self.bias is not None:
      layer.bias = self.bias.copy()
    return layer

  def _float_kwargs(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, promote_dtype=self.promote_dtype,
                preferred_element_type=self.preferred_element_type,
                kernel_init=nnx.initializers.zeros_init(),
                bias_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))

  def __treescope_repr__(self, path, subtree_renderer):
    from peft.nnx import visual  # pylint: disable=g-import-not-at-top
    return visual.quantized_treescope_repr(self, path, subtree_renderer)

  def _forward(self, inputs, geometry: Geometry, out_sharding):
    bias = self.bias[...] if self.bias is not None else None
    probe = jnp.zeros((), self.param_dtype)
    x, probe, bias = self.promote_dtype((inputs, probe, bias),
                                        dtype=self.dtype)
    y = kernels.quantized_einsum(
        x, self.qarray, geometry, precision=self.precision,
        compute_dtype=probe.dtype,
        preferred_element_type=self.preferred_element_type,
        strategy=self.strategy, out_sharding=out_sharding)
    if bias is not None:
      y = y + jnp.reshape(bias, geometry.bias_broadcast_shape(x.ndim))
    return y

  def __call__(self, inputs, out_sharding=None):
    """Applies the layer, dequantizing the kernel inside the matmul."""
    return self._forward(inputs, self.geometry, out_sharding)


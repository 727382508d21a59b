"""`SimulateQuantized`: a registered layer whose kernel is fake-quantized.

Quantization-aware training: the wrapped layer's own forward with
`simulate_quantize(kernel, method, group_size=..., double_quant=...)` over
the contracted axes of its geometry, straight-through gradient to the float
kernel (the trainable param). The argument checks shared with the real
`QuantizedLayer` (`peft.nnx.quantized_base`) live here too.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> layer = SimulateQuantized(nnx.Linear(128, 8, rngs=nnx.Rngs(0)),
  ...                           method='nf4')
  >>> layer(jnp.ones((2, 128))).shape, layer.group_size
  ((2, 8), None)
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from peft.geometry import Geometry
from peft.nnx import registry
from peft.nnx.quantized_storage import as_method as _as_method
from peft.nnx.quantized_storage import check_block_axis as _check_block_axis
from peft.nnx.quantized_storage import kernel_names as _kernel_names
from peft.nnx.quantized_storage import storage_layout as _storage_layout
from peft.quantization import QuantizationMethod
from peft.quantization import simulate_quantize

__all__ = ['SimulateQuantized']


def _layer_entry(layer, what: str) -> registry.LayerType:
  entry = registry.layer_type(layer)
  if entry is None:
    raise TypeError(f'{what}: `wrapped` cannot be quantized: '
                    + registry.unsupported_message(layer))
  return entry


def _reduced_axes(geometry: Geometry, lead: int) -> tuple[int, ...]:
  """Per-channel scales reduce over the contracted axes (after `lead`)."""
  return tuple(a + lead for a in geometry.contracted_axes)


def _check_quant_args(method, shape, geometry, group_size, double_quant,
                      what, stacked=False):
  """ValueError / TypeError for a `group_size` / `double_quant` that cannot
  apply to `method` on a kernel of `shape` (checked on shapes only)."""
  if method is QuantizationMethod.NONE:
    return
  lead = len(geometry.lead_shape(shape))
  axes = _reduced_axes(geometry, lead)
  try:
    if method in (QuantizationMethod.SFP8,):
      simulate = lambda w: simulate_quantize(w, method, axes,
                                             group_size=group_size)
      jax.eval_shape(simulate, jax.ShapeDtypeStruct(shape, jnp.float32))
    else:
      _storage_layout(method, shape, jnp.float32, axes, group_size,
                      double_quant)
  except (ValueError, TypeError) as e:
    raise type(e)(f'{what}: kernel of shape {tuple(shape)}: {e}') from e
  if stacked and double_quant:
    raise ValueError(
        f'{what}: double_quant=True keeps one set of absmax statistics for'
        ' the whole kernel, which nnx.vmap / nnx.scan cannot slice per layer;'
        ' use double_quant=False for stacked layers.')


class SimulateQuantized(registry.ReadsThrough, nnx.Module):
  """Any registered layer whose kernel is fake-quantized in the forward pass.

  The params are the wrapped layer's; the forward is the layer's own
  (`registry.layer_type(wrapped).forward`) with
  `simulate_quantize(kernel, method)`, per channel over the contracted axes
  of its geometry (plus any `nnx.vmap` stacking axes in front), and the
  gradient passes straight through to the float kernel.

  Attributes:
    wrapped: the float layer.
    method: the `QuantizationMethod`.
    geometry: the wrapped layer's `peft.geometry.Geometry` (one layer).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = SimulateQuantized(nnx.Linear(64, 32, rngs=nnx.Rngs(0)),
    ...                           method='int4')
    >>> layer(jnp.ones((2, 64))).shape, layer.geometry.contracted_axes
    ((2, 32), (0,))
  """

  _wrapped_type: type | None = None

  def __init__(self, wrapped, *, method=QuantizationMethod.INT4,
               group_size: int | None = None, double_quant: bool = False):
    what = type(self).__name__
    if self._wrapped_type is not None and not isinstance(
        wrapped, self._wrapped_type):
      raise TypeError(
          f'{what}: `wrapped` must be an nnx.{self._wrapped_type.__name__},'
          f' got {type(wrapped).__name__}; use the SimulateQuantized* class'
          ' matching the layer type, or SimulateQuantized for any registered'
          ' layer.'
      )
    entry = _layer_entry(wrapped, what)
    method = _as_method(method, what)
    geometry = entry.geometry(wrapped)
    shape = tuple(getattr(wrapped, entry.kernel).shape)
    geometry.lead_shape(shape)  # ValueError if the layer is inconsistent
    _check_block_axis(method, shape, what)
    _check_quant_args(method, shape, geometry, group_size, double_quant, what)
    self.wrapped = wrapped
    self.method = method
    self.geometry = geometry
    self.group_size = group_size
    self.double_quant = bool(double_quant)

  def __treescope_repr__(self, path, subtree_renderer):
    from peft.nnx import visual  # pylint: disable=g-import-not-at-top
    return visual.simulated_treescope_repr(self, path, subtree_renderer)

  @property
  def kernel(self) -> nnx.Variable:
    """The wrapped layer's (float, trainable) kernel variable."""
    return getattr(self.wrapped, registry.layer_type(self.wrapped).kernel)

  @property
  def bias(self) -> nnx.Variable | None:
    """The wrapped layer's bias variable (or None)."""
    name = registry.layer_type(self.wrapped).bias
    return getattr(self.wrapped, name, None) if name else None

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the kernel (with any leading `nnx.vmap` stacking axes)."""
    return tuple(self.kernel.shape)

  @property
  def param_dtype(self):
    """The dtype of the float kernel."""
    return jnp.dtype(self.kernel.get_value().dtype)

  @property
  def kernel_sharding(self) -> tuple[Any, ...] | None:
    """The float kernel's sharding names (None when it has none)."""
    return _kernel_names(self.kernel)

  @property
  def dtype(self):
    """The wrapped layer's computation dtype (None: from the inputs)."""
    return getattr(self.wrapped, 'dtype', None)

  @property
  def precision(self):
    """The wrapped layer's matmul precision."""
    return getattr(self.wrapped, 'precision', None)

  def quantized_kernel(self, geometry: Geometry | None = None) -> jax.Array:
    """The fake-quantized kernel the forward pass uses (straight-through)."""
    geometry = geometry or self.geometry
    kernel = self.kernel[...]
    lead = len(geometry.lead_shape(kernel.shape))
    return simulate_quantize(kernel, self.method,
                             axis_to_reduce=_reduced_axes(geometry, lead),
                             group_size=self.group_size,
                             double_quant=self.double_quant)

  def __call__(self, inputs, out_sharding=None):
    """Applies the wrapped layer with the fake-quantized kernel."""
    return registry.layer_type(self.wrapped).forward(
        self.wrapped, inputs, self.quantized_kernel(),
        out_sharding=out_sharding)

"""Which NNX layer types peft can wrap, and the geometry of each.

One registry maps a layer type to a `LayerType`: how to read its
`peft.geometry.Geometry`, the names of its kernel and bias variables, and how
to run it with another kernel (used by simulated quantization). `apply_lora`,
`quantize`, `simulate_quantization` and `merge_lora` handle every registered
type; `nnx.Linear`, `nnx.Einsum` and `nnx.LinearGeneral` are registered here,
and tunix's `Einsum` layers are registered the first time a model that holds
one is seen (when tunix is installed).

Register a layer of your own with `register_layer`:

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import peft.nnx as pnnx
  >>> from peft.geometry import Geometry
  >>> class Proj(nnx.Module):  # a custom layer: x @ w, no bias
  ...   def __init__(self, din, dout, rngs):
  ...     self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)))
  ...   def __call__(self, x):
  ...     return x @ self.w[...]
  >>> _ = pnnx.register_layer(
  ...     Proj, geometry=lambda m: Geometry.linear(*m.w.shape[-2:],
  ...                                              use_bias=False),
  ...     kernel='w', bias=None)
  >>> model = nnx.Sequential(Proj(4, 8, nnx.Rngs(0)))
  >>> model = pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
  >>> type(model.layers[0]).__name__, model.layers[0].lora.a.shape
  ('LoRA', (4, 2))
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from peft.geometry import Geometry

__all__ = [
    'LayerType',
    'ReadsThrough',
    'register_layer',
    'layer_type',
    'geometry_of',
    'registered_types',
]

#: `call(layer, inputs, kernel, out_sharding=None) -> outputs`: the layer's
#: forward pass with `kernel` in place of its own kernel.
CallFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class LayerType:
  """How peft reads one layer type.

  Attributes:
    geometry: `geometry(layer) -> Geometry` of one (unstacked) layer.
    kernel: attribute name of the kernel variable (`[..., *kernel_shape]`).
    bias: attribute name of the bias variable, or None (no bias).
    call: `call(layer, inputs, kernel, out_sharding=None)`, the forward pass
      with another kernel; default: the geometry's einsum plus the bias.
  """

  geometry: Callable[[Any], Geometry]
  kernel: str = 'kernel'
  bias: str | None = 'bias'
  call: CallFn | None = None

  def forward(self, layer, inputs, kernel, out_sharding=None):
    """Runs `layer` on `inputs` with `kernel` (see `call`)."""
    if self.call is not None:
      return self.call(layer, inputs, kernel, out_sharding=out_sharding)
    return _einsum_call(self, layer, inputs, kernel, out_sharding)


_REGISTRY: dict[type, LayerType] = {}


class ReadsThrough:
  """Mixin of wrappers: attributes they lack are read from `self.wrapped`.

  A wrapper stands in for its layer, so code that reads the layer's
  configuration (`in_features`, `einsum_str`, tunix's `shape`) keeps working
  after surgery. Only used when normal lookup fails; private names are not
  forwarded.

  Examples:
    >>> from flax import nnx
    >>> import peft.nnx as pnnx
    >>> pnnx.LoRALinear(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rank=1,
    ...                 rngs=nnx.Rngs(1)).in_features
    3
  """

  def __getattr__(self, name: str):
    wrapped = vars(self).get('wrapped')
    if name.startswith('_') or wrapped is None:
      raise AttributeError(
          f'{type(self).__name__!r} object has no attribute {name!r}')
    return getattr(wrapped, name)


def register_layer(
    layer_type: type,
    *,
    geometry: Callable[[Any], Geometry],
    kernel: str = 'kernel',
    bias: str | None = 'bias',
    call: CallFn | None = None,
) -> LayerType:
  """Registers a layer type so that surgery and the wrappers handle it.

  Subclasses are covered too (the nearest registered base class wins).
  Registering a type again replaces its entry.

  Args:
    layer_type: an `nnx.Module` subclass.
    geometry: `geometry(layer) -> peft.geometry.Geometry` for one layer
      (the kernel shape without stacking axes added by `nnx.vmap`).
    kernel: attribute holding the kernel variable.
    bias: attribute holding the bias variable (or None if the type has none).
    call: the forward pass with another kernel (for simulated
      quantization); default: `einsum(geometry, inputs, kernel) + bias`.

  Returns:
    The `LayerType` entry.

  Raises:
    TypeError: `layer_type` is not a class, or `geometry`/`call` are not
      callable.
  """
  if not isinstance(layer_type, type):
    raise TypeError(
        f'layer_type must be a class, got {type(layer_type).__name__}'
    )
  if not callable(geometry):
    raise TypeError(
        'geometry must be a callable layer -> peft.geometry.Geometry, got'
        f' {type(geometry).__name__}'
    )
  if call is not None and not callable(call):
    raise TypeError(f'call must be callable or None, got {type(call).__name__}')
  if not isinstance(kernel, str) or not (bias is None or isinstance(bias, str)):
    raise TypeError('kernel must be an attribute name (str); bias a str or None')
  entry = LayerType(geometry, kernel, bias, call)
  _REGISTRY[layer_type] = entry
  return entry


def registered_types() -> tuple[type, ...]:
  """The registered layer types (after loading the optional ones)."""
  _load_optional()
  return tuple(_REGISTRY)


def layer_type(layer: Any) -> LayerType | None:
  """The registry entry of `layer`'s type (or a base class), or None."""
  cls = layer if isinstance(layer, type) else type(layer)
  for base in cls.__mro__:
    entry = _REGISTRY.get(base)
    if entry is not None:
      return entry
  if _load_optional(cls):
    return layer_type(cls)
  return None


def geometry_of(layer: Any) -> Geometry:
  """The geometry of a registered layer.

  Raises:
    TypeError: the layer's type is not registered (the message says how to
      register it).
  """
  entry = layer_type(layer)
  if entry is None:
    raise TypeError(unsupported_message(layer))
  return entry.geometry(layer)


def unsupported_message(layer: Any) -> str:
  """Why `layer` cannot be wrapped, and how to register its type."""
  cls = type(layer)
  return (
      f'{cls.__module__}.{cls.__qualname__} has no registered layer geometry;'
      ' register it with peft.nnx.register_layer(type, geometry=lambda m:'
      ' peft.geometry.Geometry.from_einsum(...), kernel=..., bias=...)'
  )


# ----------------------------------------------------------------------------
# The forward pass with another kernel.


def _einsum_call(entry: LayerType, layer, inputs, kernel, out_sharding):
  """Default forward: promote, `einsum(inputs, kernel)`, add the bias."""
  g = entry.geometry(layer)
  bias_var = getattr(layer, entry.bias, None) if entry.bias else None
  bias = None if bias_var is None else bias_var[...]
  dtype = getattr(layer, 'dtype', None)
  x, kernel, bias = nnx.nn.dtypes.promote_dtype(
      (inputs, kernel, bias), dtype=dtype)
  y = jnp.einsum(g.call_einsum_str(x.ndim), x, kernel,
                 precision=getattr(layer, 'precision', None),
                 out_sharding=out_sharding)
  if bias is not None:
    y = y + jnp.reshape(bias, g.bias_broadcast_shape(x.ndim))
  return y


def _dot_kwargs(layer, out_sharding) -> dict[str, Any]:
  kw: dict[str, Any] = {'out_sharding': out_sharding}
  if getattr(layer, 'preferred_element_type', None) is not None:
    kw['preferred_element_type'] = layer.preferred_element_type
  return kw


def _promoted(layer, inputs, kernel):
  bias = layer.bias[...] if layer.bias is not None else None
  return layer.promote_dtype((inputs, kernel, bias), dtype=layer.dtype)


def _linear_call(layer, inputs, kernel, out_sharding=None):
  """`nnx.Linear.__call__` with another kernel (flax's own steps)."""
  x, kernel, bias = _promoted(layer, inputs, kernel)
  y = layer.dot_general(
      x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
      precision=layer.precision, **_dot_kwargs(layer, out_sharding),
  )
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _normalize(axes, ndim: int) -> tuple[int, ...]:
  return tuple(sorted(a if a >= 0 else ndim + a for a in axes))


def _linear_general_call(layer, inputs, kernel, out_sharding=None):
  """`nnx.LinearGeneral.__call__` with another kernel."""
  x, kernel, bias = _promoted(layer, inputs, kernel)
  axis = _normalize(layer.axis, x.ndim)
  batch = _normalize(tuple(layer.batch_axis.keys()), x.ndim)
  nb = len(batch)
  dims = ((axis, tuple(range(nb, nb + len(axis)))), (batch, tuple(range(nb))))
  if layer.dot_general_cls is not None:
    dot_general = layer.dot_general_cls()
  elif layer.dot_general is not None:
    dot_general = layer.dot_general
  else:
    dot_general = lax.dot_general
  y = dot_general(x, kernel, dims, precision=layer.precision,
                  **_dot_kwargs(layer, out_sharding))
  if bias is not None:
    g = _linear_general_geometry(layer)
    y = y + jnp.reshape(bias, g.bias_broadcast_shape(x.ndim))
  return y


def einsum_str_of(layer, einsum_str: str | None = None) -> str:
  """The einsum string of an Einsum layer (given now, or at construction)."""
  s = einsum_str if einsum_str is not None else getattr(layer, 'einsum_str',
                                                        None)
  if s is None:
    raise ValueError(
        'No `einsum_str` was given to the Einsum layer, neither as a'
        ' constructor attribute nor as a call argument; pass one.'
    )
  return ''.join(s.split())


def _einsum_layer_call(layer, inputs, kernel, out_sharding=None,
                       einsum_str=None):
  """`nnx.Einsum.__call__` with another kernel."""
  s = einsum_str_of(layer, einsum_str)
  x, kernel, bias = _promoted(layer, inputs, kernel)
  y = layer.einsum_op(s, x, kernel, precision=layer.precision,
                      **_dot_kwargs(layer, out_sharding))
  if bias is not None:
    g = Geometry.from_einsum(s, tuple(layer.kernel_shape))
    y = y + jnp.reshape(bias, g.bias_broadcast_shape(x.ndim))
  return y


# ----------------------------------------------------------------------------
# Built-in geometries.


def _linear_geometry(layer: nnx.Linear) -> Geometry:
  return Geometry.linear(layer.in_features, layer.out_features,
                         use_bias=layer.bias is not None)


def _linear_general_geometry(layer: nnx.LinearGeneral) -> Geometry:
  return Geometry.linear_general(
      layer.in_features, layer.out_features, axis=layer.axis,
      batch_axis=dict(layer.batch_axis or {}),
      use_bias=layer.bias is not None,
  )


def _einsum_geometry(layer: nnx.Einsum) -> Geometry:
  shape = tuple(layer.kernel_shape)
  bias = None if layer.bias is None else tuple(layer.bias_shape)
  return Geometry.from_einsum(einsum_str_of(layer), shape, bias)


register_layer(nnx.Linear, geometry=_linear_geometry, call=_linear_call)
register_layer(nnx.LinearGeneral, geometry=_linear_general_geometry,
               call=_linear_general_call)
register_layer(nnx.Einsum, geometry=_einsum_geometry, call=_einsum_layer_call)


# ----------------------------------------------------------------------------
# Optional third-party layers, registered when their package is loaded.


def _tunix_einsum_geometry(layer) -> Geometry:
  return Geometry.from_einsum(layer.einsum_str, tuple(layer.shape))


def _tunix_einsum_call(layer, inputs, kernel, out_sharding=None):
  g = _tunix_einsum_geometry(layer)
  return jnp.einsum(g.call_einsum_str(inputs.ndim), inputs, kernel,
                    out_sharding=out_sharding)


def _is_tunix_einsum(cls: type) -> bool:
  return (cls.__name__ == 'Einsum'
          and cls.__module__.startswith('tunix.models.')
          and issubclass(cls, nnx.Module))


_SCANNED = 0  # len(sys.modules) at the last scan


def _load_optional(cls: type | None = None) -> bool:
  """Registers known third-party layer types; True if `cls` got registered.

  Only modules already imported are looked at (nothing is imported here), so
  the cost is a scan of `sys.modules` names when an unknown type is seen.
  """
  global _SCANNED
  if len(sys.modules) == _SCANNED:  # nothing imported since the last scan
    return False
  _SCANNED = len(sys.modules)
  found = False
  for name, module in list(sys.modules.items()):
    if not name.startswith('tunix.models.') or module is None:
      continue
    einsum = getattr(module, 'Einsum', None)
    if isinstance(einsum, type) and _is_tunix_einsum(einsum) and (
        einsum not in _REGISTRY):
      register_layer(einsum, geometry=_tunix_einsum_geometry, kernel='w',
                     bias=None, call=_tunix_einsum_call)
      found = found or (cls is not None and issubclass(cls, einsum))
  return found

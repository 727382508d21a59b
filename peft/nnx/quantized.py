"""Quantized versions of `nnx.Linear`, `nnx.Einsum` and `nnx.LinearGeneral`.

Two families, each one class parameterised by the layer geometry
(`peft.nnx.quantized_base`) plus thin subclasses named after flax's layers:

* `SimulateQuantized(wrapped, method=...)` and `SimulateQuantizedLinear /
  Einsum / LinearGeneral`: quantization-aware training. The wrapped float
  layer keeps its params (the trainable params); the forward pass uses
  `simulate_quantize(kernel, method)` and the gradient flows straight through
  to the float kernel. `SimulateQuantized` takes any layer registered with
  `peft.nnx.register_layer`.
* `QuantizedLayer(geometry, method=...)` and `Int4Linear(in, out)`,
  `Int4Einsum(einsum_str, kernel_shape)`, `Int4LinearGeneral(in, out,
  axis=...)`: inference layers holding real packed storage (per-channel int4
  / int8, or ggml Q4_0 blocks) in `QuantizedWeight` variables, which are not
  `nnx.Param`s, so wrapping one in a LoRA layer gives QLoRA. They are built
  from shapes (load weights into them) or by `from_float(layer)`. Their
  output equals the simulate-quantized float layer's (to float32 rounding);
  the matmul dequantizes chunk by chunk inside a `lax.fori_loop` on CPU
  (`peft.kernels`), so the float32 weight is never materialised.

Storage: two `QuantizedWeight` variables, `values` and `scale`, the leaves of
the `peft.quantization.QArray` of the float kernel (the codec's own layout,
with any stacking axes from `nnx.vmap` in front); `layer.qarray` rebuilds the
QArray and `layer.weight` is a `QuantizedWeight` view holding it. Each
variable has its own `out_sharding` metadata derived from the float kernel's
names (`kernel_sharding`), so `nnx.get_partition_spec` and `nnx.eval_shape`
under a mesh work, and storage created under a mesh is sharded like the
kernel it replaces: INT4 / INT8 `values` = the kernel's names, `scale` = the
same with None on the contracted axes; Q4_0 `values` `(*lead, K // 32, 16)` =
`(*names, None)`, `scale` `(*lead, K // 32)` = `names`; Q4_0_TRANSPOSE: the
same on the kernel with its last two axes swapped. A mesh axis that does not
divide the number of blocks is dropped (that axis is replicated). The
quantization method is an attribute of the layer (`method`), set with the
storage by `set_weight`.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> layer = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  >>> q = Int4Linear.from_float(layer, method='q4_0')
  >>> q(jnp.ones((2, 64))).shape, q.nbytes  # 64*32 weights in 18-byte blocks
  ((2, 32), 1152)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from flax import nnx
from flax.core import FrozenDict
import jax.numpy as jnp

from peft.geometry import Geometry
from peft.nnx import registry
from peft.nnx.quantized_base import QuantizedLayer
from peft.nnx.quantized_base import SimulateQuantized
from peft.nnx.quantized_storage import QuantizedWeight
from peft.quantization import QuantizationMethod

__all__ = [
    'QuantizedWeight',
    'SimulateQuantized',
    'QuantizedLayer',
    'SimulateQuantizedLinear',
    'SimulateQuantizedEinsum',
    'SimulateQuantizedLinearGeneral',
    'Int4Linear',
    'Int4Einsum',
    'Int4LinearGeneral',
]

_INT4 = QuantizationMethod.INT4


def _features(x) -> tuple[int, ...]:
  return (int(x),) if isinstance(x, int) else tuple(int(d) for d in x)


class SimulateQuantizedLinear(SimulateQuantized):
  """`nnx.Linear` whose kernel is fake-quantized in the forward pass.

  The params are the wrapped layer's; the forward uses
  `simulate_quantize(kernel, method)` (per output channel for INT4 / INT8)
  and the gradient passes straight through to the float kernel.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = SimulateQuantizedLinear(
    ...     nnx.Linear(64, 32, rngs=nnx.Rngs(0)), method='q4_0')
    >>> layer(jnp.ones((2, 64))).shape, layer.in_features
    ((2, 32), 64)
  """

  _wrapped_type = nnx.Linear

  @property
  def in_features(self) -> int:
    """`in_features` of the wrapped layer."""
    return self.wrapped.in_features

  @property
  def out_features(self) -> int:
    """`out_features` of the wrapped layer."""
    return self.wrapped.out_features


class SimulateQuantizedEinsum(SimulateQuantized):
  """`nnx.Einsum` whose kernel is fake-quantized in the forward pass.

  INT4 / INT8 scales are per channel, reduced over the contracted kernel
  axes; batch axes such as experts get their own scales.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> inner = nnx.Einsum('bd,dnh->bnh', (64, 2, 32), rngs=nnx.Rngs(0))
    >>> layer = SimulateQuantizedEinsum(inner, method='int4')
    >>> layer(jnp.ones((3, 64))).shape, layer.einsum_str
    ((3, 2, 32), 'bd,dnh->bnh')
  """

  _wrapped_type = nnx.Einsum

  @property
  def einsum_str(self) -> str | None:
    """`einsum_str` of the wrapped layer."""
    return self.wrapped.einsum_str

  def __call__(self, inputs, einsum_str=None, out_sharding=None):
    """Applies the layer with the fake-quantized kernel."""
    if einsum_str is None:
      return super().__call__(inputs, out_sharding=out_sharding)
    g = Geometry.from_einsum(''.join(einsum_str.split()),
                             self.geometry.kernel_shape)
    return registry.layer_type(self.wrapped).call(
        self.wrapped, inputs, self.quantized_kernel(g),
        out_sharding=out_sharding, einsum_str=einsum_str)


class SimulateQuantizedLinearGeneral(SimulateQuantized):
  """`nnx.LinearGeneral` whose kernel is fake-quantized in the forward pass.

  INT4 / INT8 scales are per output channel and per `batch_axis` index,
  reduced over the contracted (`axis`) kernel axes.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> inner = nnx.LinearGeneral(64, (2, 32), rngs=nnx.Rngs(0))
    >>> layer = SimulateQuantizedLinearGeneral(inner, method='q4_0')
    >>> layer(jnp.ones((3, 64))).shape, layer.out_features
    ((3, 2, 32), (2, 32))
  """

  _wrapped_type = nnx.LinearGeneral

  @property
  def in_features(self) -> tuple[int, ...]:
    """`in_features` of the wrapped layer."""
    return self.wrapped.in_features

  @property
  def out_features(self) -> tuple[int, ...]:
    """`out_features` of the wrapped layer."""
    return self.wrapped.out_features

  @property
  def axis(self) -> tuple[int, ...]:
    """`axis` (the contracted input axes) of the wrapped layer."""
    return self.wrapped.axis

  @property
  def batch_axis(self) -> Mapping[int, int]:
    """`batch_axis` of the wrapped layer."""
    return self.wrapped.batch_axis


class Int4Linear(QuantizedLayer):
  """`nnx.Linear` with a really quantized (int4 / int8 / Q4_0) kernel.

  Built from shapes (storage of a zero kernel, to be loaded) or with
  `Int4Linear.from_float(linear, method=...)`. Attributes: `values`, `scale`
  (`QuantizedWeight`, not trainable), `bias` (an `nnx.Param`, or None),
  `method`, `in_features`, `out_features`, `weight` (a view holding the
  `QArray`). `to_float()` gives back an `nnx.Linear` with the dequantized
  kernel.

  Args:
    in_features, out_features: the layer's sizes.
    method: INT4 (default), INT8, Q4_0 or Q4_0_TRANSPOSE.
    use_bias: whether the layer has a bias.
    dtype, param_dtype, precision: as in `nnx.Linear`.
    **kwargs: the other arguments of `QuantizedLayer` (`leading_shape`,
      `kernel_sharding`, `strategy`, `preferred_element_type`,
      `promote_dtype`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = Int4Linear.from_float(nnx.Linear(64, 32, rngs=nnx.Rngs(0)))
    >>> layer(jnp.ones((2, 64))).shape, layer.nbytes  # 64*32/2 + 32*4
    ((2, 32), 1152)
    >>> empty = Int4Linear(64, 32, method='q4_0')  # from shapes: zeros
    >>> empty.values.shape, float(empty(jnp.ones((1, 64))).sum())
    ((64, 1, 16), 0.0)
  """

  _float_type = nnx.Linear

  def __init__(self, in_features: int, out_features: int, *,
               method: QuantizationMethod | str = _INT4, use_bias: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               precision: Any = None, **kwargs):
    self.in_features = int(in_features)
    self.out_features = int(out_features)
    self.use_bias = bool(use_bias)
    geometry = Geometry.linear(in_features, out_features, use_bias=use_bias)
    super().__init__(geometry, method=method, dtype=dtype,
                     param_dtype=param_dtype, precision=precision, **kwargs)

  @classmethod
  def _layer_args(cls, layer, geometry):
    return dict(in_features=layer.in_features, out_features=layer.out_features,
                use_bias=layer.bias is not None)

  def to_float(self) -> nnx.Linear:
    """An `nnx.Linear` holding the dequantized kernel and the same bias."""
    return self._float_layer(nnx.Linear(
        self.in_features, self.out_features, use_bias=self.bias is not None,
        **self._float_kwargs()))


class Int4Einsum(QuantizedLayer):
  """`nnx.Einsum` with a really quantized (int4 / int8 / Q4_0) kernel.

  Q4_0 blocks run along the kernel's last axis, Q4_0_TRANSPOSE along its
  second-to-last. Built from shapes or with `Int4Einsum.from_float(einsum)`.

  Args:
    einsum_str: the layer's einsum string, e.g. `'btd,dnh->btnh'`.
    kernel_shape: the kernel shape of one layer.
    bias_shape: the bias shape, or None for no bias.
    method, dtype, param_dtype, precision, **kwargs: as in `Int4Linear`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> inner = nnx.Einsum('bd,dnh->bnh', (64, 2, 32), rngs=nnx.Rngs(0))
    >>> layer = Int4Einsum.from_float(inner, method='q4_0')
    >>> layer(jnp.ones((3, 64))).shape, layer.einsum_str
    ((3, 2, 32), 'bd,dnh->bnh')
  """

  _float_type = nnx.Einsum

  def __init__(self, einsum_str: str, kernel_shape: Sequence[int],
               bias_shape: Sequence[int] | None = None, *,
               method: QuantizationMethod | str = _INT4, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               **kwargs):
    self.einsum_str = ''.join(einsum_str.split())
    self.bias_shape = None if bias_shape is None else tuple(bias_shape)
    geometry = Geometry.from_einsum(self.einsum_str, kernel_shape,
                                    self.bias_shape)
    super().__init__(geometry, method=method, dtype=dtype,
                     param_dtype=param_dtype, precision=precision, **kwargs)

  @classmethod
  def _layer_args(cls, layer, geometry):
    return dict(einsum_str=geometry.einsum_str,
                kernel_shape=geometry.kernel_shape,
                bias_shape=geometry.bias_shape)

  def __call__(self, inputs, einsum_str=None, out_sharding=None):
    """Applies the layer (with another `einsum_str` if given)."""
    geometry = self.geometry
    if einsum_str is not None:
      geometry = Geometry.from_einsum(''.join(einsum_str.split()),
                                      geometry.kernel_shape,
                                      geometry.bias_shape)
    return self._forward(inputs, geometry, out_sharding)

  def to_float(self) -> nnx.Einsum:
    """An `nnx.Einsum` holding the dequantized kernel and the same bias."""
    return self._float_layer(nnx.Einsum(
        self.einsum_str, self.geometry.kernel_shape, self.bias_shape,
        **self._float_kwargs()))


class Int4LinearGeneral(QuantizedLayer):
  """`nnx.LinearGeneral` with a really quantized (int4 / int8 / Q4_0) kernel.

  INT4 / INT8 scales are per output channel and `batch_axis` index. The
  kernel is `(*batch, *in_features, *out_features)`; Q4_0 blocks run along
  its last axis, Q4_0_TRANSPOSE along its second-to-last (the blockwise fast
  path needs that axis contracted, i.e. a single output axis).

  Args:
    in_features, out_features: ints or tuples, as in `nnx.LinearGeneral`.
    axis: the contracted input axes.
    batch_axis: `{input axis: size}` of the batch axes.
    use_bias, method, dtype, param_dtype, precision, **kwargs: as in
      `Int4Linear`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> inner = nnx.LinearGeneral(64, (2, 32), rngs=nnx.Rngs(0))
    >>> layer = Int4LinearGeneral.from_float(inner, method='int4')
    >>> layer(jnp.ones((3, 64))).shape, layer.out_features
    ((3, 2, 32), (2, 32))
  """

  _float_type = nnx.LinearGeneral

  def __init__(self, in_features: int | Sequence[int],
               out_features: int | Sequence[int], *,
               axis: int | Sequence[int] = -1,
               batch_axis: Mapping[int, int] | None = None,
               use_bias: bool = True,
               method: QuantizationMethod | str = _INT4, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               **kwargs):
    self.in_features = _features(in_features)
    self.out_features = _features(out_features)
    self.axis = _features(axis)
    self.batch_axis = FrozenDict(batch_axis or {})
    self.use_bias = bool(use_bias)
    geometry = Geometry.linear_general(
        self.in_features, self.out_features, axis=self.axis,
        batch_axis=dict(self.batch_axis), use_bias=use_bias)
    super().__init__(geometry, method=method, dtype=dtype,
                     param_dtype=param_dtype, precision=precision, **kwargs)

  @classmethod
  def _layer_args(cls, layer, geometry):
    return dict(in_features=layer.in_features, out_features=layer.out_features,
                axis=layer.axis, batch_axis=dict(layer.batch_axis or {}),
                use_bias=layer.bias is not None)

  def to_float(self) -> nnx.LinearGeneral:
    """An `nnx.LinearGeneral` holding the dequantized kernel and the bias."""
    return self._float_layer(nnx.LinearGeneral(
        self.in_features, self.out_features, axis=self.axis,
        batch_axis=dict(self.batch_axis), use_bias=self.bias is not None,
        **self._float_kwargs()))

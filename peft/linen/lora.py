"""LoRA for Flax linen: `LoRADense`, `LoRAEinsum`, `LoRADenseGeneral` and adapters.

These are the document's linen modules. Their state and math are the NNX
adapters of `peft.nnx.lora` (`LoRALinearAdapter`, `LoRAEinsumAdapter`,
`LoRALinearGeneralAdapter`), run inside linen by a small bridge (built like
`flax.nnx.bridge.ToLinen`, public APIs only) and `nn.share_scope`, so the
parameter layout is the document's:

    {'Dense_0': {'kernel': ..., 'bias': ..., 'lora': {'a': [in, r], 'b': [r, out]}}}

all in the `params` collection. The LoRA scale (`alpha / rank`) is a constant
rebuilt from the constructor arguments; it is not stored in the variables.
When the wrapped kernel is boxed (`nn.with_partitioning`), `a` and `b` are
boxed too, with the names `peft.nnx.lora` derives from the kernel's (`a`:
input axes + None, `b`: None + output axes), so `nn.get_partition_spec`
shards them like the kernel. Params whose factor shapes do not match the
layer (e.g. another rank) raise a ValueError naming the param.

Examples:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> import peft
  >>> class MyModel(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return peft.LoRADense(rank=3, wrapped=nn.Dense(10))(x)
  >>> params = MyModel().init(jax.random.key(0), jnp.ones((1, 4)))['params']
  >>> jax.tree.map(jnp.shape, params['Dense_0']['lora'])
  {'a': (4, 3), 'b': (3, 10)}
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import errors
from flax import linen as nn
import jax.numpy as jnp

# The bridge and the adapters live in their own modules; every name stays
# importable from here.
from peft.linen import interceptor as _interceptor
from peft.linen._bridge import _DoRABase
from peft.linen._bridge import (  # pylint: disable=unused-import
    Array,
    Initializer,
    _A_INIT,
    _B_INIT,
    _FACTORS,
    _unboxed,
    _factor_box,
    _check_factor_shapes,
    _run_adapter,
    _to_linen_value,
    _bridge_call,
    _adapter_kwargs,
    _check_alpha,
    _check_rank,
    _base_layer,
    _check_wrapped,
    _kernel_box,
)
from peft.linen.adapters import LoRADenseAdapter
from peft.linen.adapters import LoRADenseGeneralAdapter
from peft.linen.adapters import LoRAEinsumAdapter
from peft.linen.adapters import (  # pylint: disable=unused-import
    _LoRAAdapterBase,
    _normalize_axes,
)

__all__ = [
    'LoRADense',
    'LoRAEinsum',
    'LoRADenseGeneral',
    'LoRADenseAdapter',
    'LoRAEinsumAdapter',
    'LoRADenseGeneralAdapter',
]


class _LoRAWrapper(nn.Module):
  """Fields and checks of the wrappers; shares the wrapped layer's scope.

  Sharing the scope puts the adapter next to the kernel it adapts.
  """

  _: dataclasses.KW_ONLY
  rank: int
  wrapped: nn.Module
  alpha: float | None = None
  dtype: Any = jnp.float32
  a_init: Initializer = _A_INIT
  b_init: Initializer = _B_INIT
  dora: bool = False

  _wrapped_type: ClassVar[type[nn.Module]]

  def _lora_out(self, adapter: nn.Module, inputs: Array, y: Array) -> Array:
    """`y + adapter(inputs)`, or with `dora` the DoRA output (same core as
    `peft.nnx.dora`: magnitude `lora/magnitude`, norm from the kernel)."""
    if not self.dora:
      return y + adapter(inputs).astype(y.dtype)
    bias = None
    if self.has_variable('params', 'bias'):
      bias = _unboxed(self.get_variable('params', 'bias'))
    kernel = _unboxed(self.get_variable('params', 'kernel'))
    return adapter(inputs, dora_base=_DoRABase(y, bias, kernel)).astype(
        y.dtype)

  def _adapter_fields(self) -> dict[str, Any]:
    """The adapter's arguments that come from the wrapper's own fields."""
    return dict(alpha=self.alpha, dtype=self.dtype, a_init=self.a_init,
                b_init=self.b_init, kernel_sharding=_kernel_box(self))

  def _adapter(self, adapter_cls: type[nn.Module], **kwargs) -> nn.Module:
    """The adapter, named 'lora' in the wrapped layer's scope."""
    try:
      return adapter_cls(name='lora', rank=self.rank, **kwargs,
                         **self._adapter_fields())
    except errors.NameInUseError as e:
      path = '/'.join(self.scope.path) or '<root>'
      raise ValueError(
          f'{type(self).__name__} at {path!r}: this layer already has a LoRA'
          " adapter ('lora'): it was wrapped by LoRA twice, e.g. by two"
          ' nested ModuleInterceptors whose replace_module_fn both return a'
          ' LoRA wrapper for it. A layer holds one LoRA adapter: return the'
          ' module unchanged from one of the replace_module_fns (or wrap'
          ' the layer once).'
      ) from e

  def __post_init__(self):
    _check_rank(self.rank, type(self).__name__)
    _check_alpha(self.alpha, type(self).__name__)
    _check_wrapped(type(self).__name__, self.wrapped, self._wrapped_type)
    if not isinstance(self.dora, bool):
      raise TypeError(f'{type(self).__name__}: dora must be a bool, got'
                      f' {self.dora!r}')
    if self.dora and isinstance(self.wrapped, _interceptor.StandsForLayer):
      raise ValueError(
          f'{type(self).__name__}: dora=True needs a float base layer, got'
          f' {type(self.wrapped).__name__}; for DoRA on a quantized base'
          ' (QDoRA) use the NNX API: peft.nnx.quantize then'
          ' peft.nnx.apply_lora(..., dora=True)')
    super().__post_init__()
    # Share scope to make the wrapper transparent for the params
    # (instead of nesting `{'params': {'wrapped': ...}}`).
    if self.scope is not None and self.wrapped.scope is not None:
      nn.share_scope(self, self.wrapped)


# ---------------------------------------------------------------------------
# Wrappers: wrapped(x) + adapter(x), adapter named 'lora' in the wrapped scope.
# ---------------------------------------------------------------------------


class LoRADense(_LoRAWrapper):
  """Wraps an `nn.Dense` and adds a LoRA adapter: `wrapped(x) + x @ a @ b`.

  The wrapper shares the wrapped layer's scope: a wrapped `Dense_0` holds
  `{'kernel', 'bias', 'lora': {'a': [in, rank], 'b': [rank, features]}}`.
  `b` starts at zero, so a fresh wrapper does not change the output. A
  kernel from `nn.with_partitioning(init, (in_name, out_name))` gives `a`
  boxed `(in_name, None)` and `b` `(None, out_name)`.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> class MyModel(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     layer = peft.LoRADense(rank=3, wrapped=nn.Dense(10))
    ...     return layer(x)
    >>> params = MyModel().init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> sorted(params['Dense_0']), sorted(params['Dense_0']['lora'])
    (['bias', 'kernel', 'lora'], ['a', 'b'])

  Attributes:
    rank: LoRA rank, a positive int.
    wrapped: the `nn.Dense` (or a peft quantization wrapper of one).
    alpha: optional; the LoRA branch is scaled by `alpha / rank`.
    dtype: dtype of `a` and `b`.
    a_init: initializer of `a` (kaiming uniform).
    b_init: initializer of `b` (zeros).
    dora: DoRA (weight-decomposed LoRA): a trainable magnitude
      `lora/magnitude` per output channel (initialised to the column norms of
      the kernel, so a fresh layer changes nothing); the output is
      `m * (W + s a b) x / ||W + s a b||`, the norm constant in the gradient,
      computed by `peft.nnx.dora` as in the NNX wrappers. Needs a float base
      (QDoRA: use `peft.nnx`).
  """

  _wrapped_type = nn.Dense

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    y = self.wrapped(inputs)
    adapter = self._adapter(
        LoRADenseAdapter, features=_base_layer(self.wrapped).features)
    return self._lora_out(adapter, inputs, y)


class LoRAEinsum(_LoRAWrapper):
  """Wraps an `nn.Einsum` and adds a LoRA adapter: `wrapped(x) + einsum(x, a, b)`.

  The wrapped `Einsum_0` holds `{'kernel', 'lora': {'a', 'b'}}` (plus `bias`
  when used); see `LoRAEinsumAdapter` for the factor shapes.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> layer = peft.LoRAEinsum(
    ...     rank=2,
    ...     wrapped=nn.Einsum(shape=(4, 2, 3), einsum_str='bi,imn->bmn'),
    ... )
    >>> params = layer.init(jax.random.key(0), jnp.ones((5, 4)))['params']
    >>> jax.tree.map(jnp.shape, params['lora'])
    {'a': (4, 2), 'b': (2, 2, 3)}

  Attributes:
    rank: LoRA rank, a positive int.
    wrapped: the `nn.Einsum` (or a peft quantization wrapper of one).
    alpha, dtype, a_init, b_init, dora: as in `LoRADense`.
  """

  _wrapped_type = nn.Einsum

  @nn.compact
  def __call__(self, inputs: Array, einsum_str: str | None = None) -> Array:
    base = _base_layer(self.wrapped)
    einsum_str = nn.merge_param('einsum_str', base.einsum_str, einsum_str)
    if base.einsum_str is None:
      y = self.wrapped(inputs, einsum_str)
    else:
      y = self.wrapped(inputs)
    adapter = self._adapter(
        LoRAEinsumAdapter, einsum_str=einsum_str, shape=tuple(base.shape))
    return self._lora_out(adapter, inputs, y)


class LoRADenseGeneral(_LoRAWrapper):
  """Wraps an `nn.DenseGeneral` and adds a LoRA adapter over the same axes.

  The wrapped `DenseGeneral_0` holds `{'kernel', 'bias', 'lora': {'a', 'b'}}`
  with `a: (*batch, *in, rank)` and `b: (*batch, rank, *features)`.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> layer = peft.LoRADenseGeneral(
    ...     rank=2, wrapped=nn.DenseGeneral(features=(2, 3)))
    >>> params = layer.init(jax.random.key(0), jnp.ones((5, 4)))['params']
    >>> jax.tree.map(jnp.shape, params['lora'])
    {'a': (4, 2), 'b': (2, 2, 3)}

  Attributes:
    rank: LoRA rank, a positive int.
    wrapped: the `nn.DenseGeneral`.
    alpha, dtype, a_init, b_init, dora: as in `LoRADense`.
  """

  _wrapped_type = nn.DenseGeneral

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    base = _base_layer(self.wrapped)
    y = self.wrapped(inputs)
    adapter = self._adapter(
        LoRADenseGeneralAdapter, features=base.features, axis=base.axis,
        batch_dims=base.batch_dims)
    return self._lora_out(adapter, inputs, y)

"""The linen LoRA adapters: only the LoRA branch `x @ a @ b` of a layer.

`LoRADenseAdapter`, `LoRAEinsumAdapter` and `LoRADenseGeneralAdapter` run the
NNX adapters of `peft.nnx.lora` through the bridge of `peft.linen._bridge`;
`peft.linen.lora` (and `peft`) re-export them.

Examples:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> ad = LoRADenseAdapter(rank=2, features=3)
  >>> params = ad.init(jax.random.key(0), jnp.ones((1, 4)))['params']
  >>> jax.tree.map(jnp.shape, params)
  {'a': (4, 2), 'b': (2, 3)}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from flax import linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp

from peft.linen._bridge import _A_INIT
from peft.linen._bridge import _B_INIT
from peft.linen._bridge import Array
from peft.linen._bridge import Initializer
from peft.linen._bridge import _adapter_kwargs
from peft.linen._bridge import _check_alpha
from peft.linen._bridge import _check_rank
from peft.linen._bridge import _run_adapter
from peft.nnx import lora as _nnx_lora

__all__ = ['LoRADenseAdapter', 'LoRAEinsumAdapter', 'LoRADenseGeneralAdapter']

# ---------------------------------------------------------------------------
# Adapters: only `x @ A @ B` (times alpha / rank).
# ---------------------------------------------------------------------------


class _LoRAAdapterBase(nn.Module):
  """The fields every linen adapter has (see `LoRADenseAdapter`).

  `__call__(inputs, dora_base=None)`: the wrappers built with `dora=True`
  pass their base layer's output, bias and kernel (`_bridge._DoRABase`);
  the adapter then also holds a DoRA `magnitude` and returns the whole DoRA
  layer output (`peft.nnx.dora.adapter_forward`).
  """

  _: dataclasses.KW_ONLY
  rank: int
  alpha: float | None = None
  dtype: Any = jnp.float32
  a_init: Initializer = _A_INIT
  b_init: Initializer = _B_INIT
  kernel_sharding: Any = None

  def __post_init__(self):
    _check_rank(self.rank, type(self).__name__)
    _check_alpha(self.alpha, type(self).__name__)
    super().__post_init__()


class LoRADenseAdapter(_LoRAAdapterBase):
  """Only the LoRA branch of a dense layer: `(x @ a @ b) * alpha / rank`.

  Params `a: [in, rank]` (kaiming uniform) and `b: [rank, features]` (zeros);
  `in` is read from the input. Add the wrapped layer's output yourself (or
  use `LoRADense`). `features` is required: the document's
  `LoRADenseAdapter(rank=3)` cannot know the output size.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> class MyModel(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     dense = nn.Dense(10)
    ...     lora = peft.LoRADenseAdapter(rank=3, features=10)
    ...     return dense(x) + lora(x)
    >>> params = MyModel().init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> jax.tree.map(jnp.shape, params['LoRADenseAdapter_0'])
    {'a': (4, 3), 'b': (3, 10)}

  Attributes:
    rank: LoRA rank, a positive int.
    features: output size (the wrapped layer's `features`).
    alpha: optional; the output is scaled by `alpha / rank` (None: no scale).
    dtype: dtype of `a` and `b`.
    a_init: initializer of `a` (called with `(in, rank)`).
    b_init: initializer of `b` (called with `(rank, features)`).
    kernel_sharding: optional sharding names of the wrapped kernel (e.g.
      `('data', 'model')`), or its `nn.Partitioned` box (class, mesh and
      rules are kept, the value is ignored). `a` and `b` are then stored in
      `nn.Partitioned` boxes: `a` gets the kernel's input-axis names and
      `None` for the rank, `b` `None` and the output-axis names (batch axes
      keep their names in both). None (default): plain arrays. The
      wrappers pass the wrapped kernel's box.
  """

  _: dataclasses.KW_ONLY
  features: int

  @nn.compact
  def __call__(self, inputs: Array, dora_base=None) -> Array:
    _check_rank(self.rank, type(self).__name__)
    return _run_adapter(
        self,
        _nnx_lora.LoRALinearAdapter,
        (inputs.shape[-1], self.features),
        _adapter_kwargs(self),
        inputs,
        kernel_sharding=self.kernel_sharding,
        dora_base=dora_base,
    )


class LoRAEinsumAdapter(_LoRAAdapterBase):
  """Only the LoRA branch of an einsum layer: `einsum(x, a, b) * alpha / rank`.

  `einsum_str='inputs,weights->outputs'` is rewritten `'inputs,a,b->outputs'`
  (`peft.einsum.lora_einsum`): `a` holds the weight's batch and contracted
  axes plus the rank, `b` the batch axes, the rank and the output axes.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> ad = peft.LoRAEinsumAdapter(rank=2, einsum_str='bi,imn->bmn',
    ...                             shape=(4, 2, 3))
    >>> params = ad.init(jax.random.key(0), jnp.ones((5, 4)))['params']
    >>> jax.tree.map(jnp.shape, params)
    {'a': (4, 2), 'b': (2, 2, 3)}

  Attributes:
    rank: LoRA rank, a positive int.
    einsum_str: the wrapped einsum string `'inputs,weights->outputs'`.
    shape: the wrapped weight's shape.
    alpha, dtype, a_init, b_init, kernel_sharding: as in `LoRADenseAdapter`
      (names of the weight's axes).
  """

  _: dataclasses.KW_ONLY
  einsum_str: str
  shape: Sequence[int]

  @nn.compact
  def __call__(self, inputs: Array, dora_base=None) -> Array:
    _check_rank(self.rank, type(self).__name__)
    if not isinstance(self.einsum_str, str):
      raise TypeError(
          f'{type(self).__name__}: einsum_str must be a str such as'
          f" 'bi,imn->bmn', got {type(self.einsum_str).__name__}"
      )
    return _run_adapter(
        self,
        _nnx_lora.LoRAEinsumAdapter,
        (self.einsum_str, tuple(int(d) for d in self.shape)),
        _adapter_kwargs(self),
        inputs,
        kernel_sharding=self.kernel_sharding,
        dora_base=dora_base,
    )


def _normalize_axes(axes, ndim: int, what: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  out = []
  for ax in axes:
    if not -ndim <= ax < ndim:
      raise ValueError(
          f'{what}={axes} is out of range for an input with {ndim} axes'
      )
    out.append(ax % ndim)
  return tuple(out)


class LoRADenseGeneralAdapter(_LoRAAdapterBase):
  """Only the LoRA branch of an `nn.DenseGeneral`: `x @ a @ b` over `axis`.

  With `batch_dims` of sizes `B`, contracted axes of sizes `I` and `features`
  `O` (the `nn.DenseGeneral` kernel is `(*B, *I, *O)`), `a` is `(*B, *I, rank)`
  and `b` `(*B, rank, *O)`; the output layout is `nn.DenseGeneral`'s.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> ad = peft.LoRADenseGeneralAdapter(rank=2, features=(2, 3), axis=-1)
    >>> y, v = ad.init_with_output(jax.random.key(0), jnp.ones((5, 4)))
    >>> y.shape, jax.tree.map(jnp.shape, v['params'])
    ((5, 2, 3), {'a': (4, 2), 'b': (2, 2, 3)})

  Attributes:
    rank: LoRA rank, a positive int.
    features: int or tuple, the output feature sizes.
    axis: int or tuple, the input axes contracted.
    batch_dims: leading input axes shared with the kernel (consecutive from 0).
    alpha, dtype, a_init, b_init, kernel_sharding: as in `LoRADenseAdapter`
      (names of the `(*batch, *in, *features)` kernel axes).
  """

  _: dataclasses.KW_ONLY
  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  batch_dims: Sequence[int] = ()

  @nn.compact
  def __call__(self, inputs: Array, dora_base=None) -> Array:
    _check_rank(self.rank, type(self).__name__)
    ndim = inputs.ndim
    axis = _normalize_axes(self.axis, ndim, 'axis')
    batch_dims = _normalize_axes(self.batch_dims, ndim, 'batch_dims')
    features = (
        (self.features,) if isinstance(self.features, int)
        else tuple(self.features)
    )
    return _run_adapter(
        self,
        _nnx_lora.LoRALinearGeneralAdapter,
        (tuple(inputs.shape[ax] for ax in axis), features),
        dict(
            axis=axis,
            batch_axis=FrozenDict({b: inputs.shape[b] for b in batch_dims}),
            **_adapter_kwargs(self),
        ),
        inputs,
        kernel_sharding=self.kernel_sharding,
        dora_base=dora_base,
    )

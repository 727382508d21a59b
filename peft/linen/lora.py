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
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, ClassVar

from flax import errors
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict
import jax
import jax.numpy as jnp

from peft.linen import interceptor as _interceptor
from peft.nnx import lora as _nnx_lora

__all__ = [
    'LoRADense',
    'LoRAEinsum',
    'LoRADenseGeneral',
    'LoRADenseAdapter',
    'LoRAEinsumAdapter',
    'LoRADenseGeneralAdapter',
]

Array = jax.Array
Initializer = Callable[..., Array]

_A_INIT = nn.initializers.kaiming_uniform()
_B_INIT = nn.initializers.zeros_init()
_FACTORS = ('a', 'b')


# ---------------------------------------------------------------------------
# The bridge: an NNX module run as linen, its Params in `params`.
# ---------------------------------------------------------------------------


def _unboxed(x):
  """The array inside a linen metadata box (no sharding constraint applied)."""
  if isinstance(x, nn.Partitioned):
    return x.unbox(apply_constraint=False)
  if isinstance(x, nn.meta.AxisMetadata):
    return x.unbox()
  return x


def _factor_box(kernel_sharding) -> nn.Partitioned | None:
  """The `nn.Partitioned` template the factors are boxed in (or None)."""
  if kernel_sharding is None:
    return None
  if isinstance(kernel_sharding, nn.Partitioned):
    return kernel_sharding.replace(value=None)
  if isinstance(kernel_sharding, str) or not isinstance(
      kernel_sharding, Sequence):
    raise TypeError(
        'kernel_sharding must be the wrapped kernel\'s sharding names (a'
        " sequence such as ('data', 'model')), an nn.Partitioned, or None;"
        f' got {kernel_sharding!r}'
    )
  return nn.Partitioned(None, tuple(kernel_sharding))


def _check_factor_shapes(module: nn.Module, nnx_class, args, kwargs) -> None:
  """Raises a ValueError naming the param when a stored factor has another
  shape than the adapter built from the constructor arguments expects (e.g.
  params of another rank), instead of a shape error deep in the matmul."""
  present = [n for n in _FACTORS if module.has_variable('params', n)]
  if not present:
    return
  expected = nnx.eval_shape(
      lambda: nnx_class(*args, **kwargs, rngs=nnx.Rngs(0))
  )
  path = '/'.join(module.scope.path) or '<root>'
  for n in present:
    want = tuple(getattr(expected, n).shape)
    got = tuple(jnp.shape(_unboxed(module.get_variable('params', n))))
    if got != want:
      raise ValueError(
          f'{type(module).__name__} at {path!r}: the LoRA param'
          f' {path}/{n!s} has shape {got}, but this layer with'
          f' rank={kwargs["rank"]} expects {want}. The params were made for'
          ' another rank or layer size: build the wrapper with the rank the'
          ' params were trained with, or re-initialise the LoRA params.'
      )


def _run_adapter(module: nn.Module, nnx_class, args, kwargs, inputs, *,
                 kernel_sharding=None, **call):
  """Runs NNX `nnx_class(*args, **kwargs)` on `inputs` in `module`'s own scope.

  With `kernel_sharding` (names or an `nn.Partitioned` of the wrapped kernel)
  the NNX adapter derives the factors' names (`peft.nnx.lora`), and `a`, `b`
  are stored boxed in `nn.Partitioned` with those names.
  """
  box = _factor_box(kernel_sharding)
  kwargs = dict(kwargs)
  if box is not None:
    kwargs['kernel_sharding'] = tuple(box.names)
    # Names as metadata only: linen places params (jit out_shardings from
    # nn.get_partition_spec, or the box's constraint when unboxed).
    kwargs['sharding_meta'] = FrozenDict({'eager_sharding': False})
  if not module.is_initializing():
    if not module.is_mutable_collection('params'):
      missing = [n for n in _FACTORS if not module.has_variable('params', n)]
      if missing:
        path = '/'.join(module.scope.path) or '<root>'
        raise ValueError(
            f'{type(module).__name__} at {path!r}: the LoRA params'
            f' {[f"{path}/{n}" for n in missing]} are missing from the'
            " 'params' collection passed to apply (they would be silently"
            ' re-initialised). Initialise the model with the LoRA wrappers'
            ' (e.g. inside the same ModuleInterceptor), or add the LoRA tree'
            ' with `peft.merge_params(original, lora)`.'
        )
    _check_factor_shapes(module, nnx_class, args, kwargs)
  return _bridge_call(module, nnx_class, tuple(args), kwargs, box, inputs,
                      **call)


def _to_linen_value(leaf: nnx.Variable, box: nn.Partitioned | None):
  """A param's linen value: boxed like the kernel when it has sharding names."""
  names = leaf.get_metadata().get('out_sharding')
  if box is not None and names is not None:
    return box.replace(value=leaf.get_value(), names=tuple(names))
  return leaf.get_value()


def _bridge_call(module: nn.Module, nnx_class, args, kwargs, box, inputs,
                 **call):
  """Builds NNX `nnx_class(*args, **kwargs)` around `module`'s params, runs it.

  The bridge between linen and the NNX adapter, with public APIs only (in
  the spirit of `nnx.bridge.ToLinen`, which would file `nnx.LoRAParam` under
  a `LoRAParam` collection): every `nnx.Param` (`LoRAParam` included) of the
  NNX module is the linen param of the same path in `module`'s `params`;
  other variables (the `LoRAScale` constant) are rebuilt from the
  constructor arguments on each call and not stored. When the params are
  missing and `params` is mutable (init) the NNX module's own initial values
  are stored, drawn from `module`'s rng streams.
  """
  params = module.variables.get('params', {})

  def stored(path):
    node = params
    for key in path:
      if not isinstance(node, Mapping) or key not in node:
        return None
      node = node[key]
    return node

  if module.is_mutable_collection('params') and not params:
    # init (or apply with mutable params and none stored yet).
    rngs = {name: module.make_rng(name) for name in module.scope.rngs}
    layer = nnx_class(*args, **kwargs,
                      rngs=nnx.Rngs(**(rngs or {'default': 0})))
    tree = nnx.traversals.unflatten_mapping({
        path: _to_linen_value(leaf, box)
        for path, leaf in nnx.to_flat_state(nnx.state(layer, nnx.Param))
    })
    for key, value in tree.items():
      module.put_variable('params', key, value)
  else:
    layer = nnx_class(*args, **kwargs, rngs=nnx.Rngs(0))
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))]
    missing = ['/'.join(map(str, p)) for p in paths if stored(p) is None]
    if missing:
      where = '/'.join(module.scope.path) or '<root>'
      raise ValueError(
          f'{type(module).__name__} at {where!r}: the params {missing} are'
          " missing from the 'params' collection; pass the complete LoRA"
          ' tree (e.g. `peft.merge_params(original, lora)`)'
      )
    nnx.update(layer, nnx.traversals.unflatten_mapping(
        {path: _unboxed(stored(path)) for path in paths}))
  return layer(inputs, **call)


def _adapter_kwargs(module) -> dict[str, Any]:
  return dict(
      rank=module.rank,
      alpha=module.alpha,
      a_init=module.a_init,
      b_init=module.b_init,
      param_dtype=module.dtype,
  )


def _check_alpha(alpha, owner: str) -> None:
  """`alpha` is None or a finite, non-zero real number."""
  if alpha is None:
    return
  try:
    if isinstance(alpha, (bool, str, bytes)):
      raise TypeError
    value = float(alpha)
  except (TypeError, ValueError):
    raise TypeError(
        f'{owner}: alpha must be a real number or None, got'
        f' {type(alpha).__name__} ({alpha!r}); pass e.g. alpha=16.0, or'
        ' alpha=None for no scaling'
    ) from None
  if not math.isfinite(value):
    raise ValueError(
        f'{owner}: alpha must be finite, got alpha={alpha!r}; pass e.g.'
        ' alpha=16.0, or alpha=None for no scaling'
    )
  if value == 0:
    raise ValueError(
        f'{owner}: alpha=0 makes the LoRA scale alpha / rank zero, so the'
        ' adapter adds nothing and every gradient of `a` and `b` is 0'
        ' (training would silently do nothing). Pass a non-zero alpha (e.g.'
        ' alpha=2 * rank), or alpha=None for no scaling.'
    )


def _check_rank(rank, owner: str) -> None:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(
        f'{owner}: rank must be a positive int, got rank={rank!r}; pass e.g.'
        ' rank=8'
    )


def _base_layer(wrapped: Any) -> Any:
  """The float linen layer under peft quantization wrappers (or `wrapped`)."""
  seen = 0
  while isinstance(wrapped, _interceptor.StandsForLayer) and seen < 8:
    wrapped = wrapped.wrapped
    seen += 1
  return wrapped


def _check_wrapped(owner: str, wrapped: Any, layer_type: type) -> None:
  base = _base_layer(wrapped)
  if not isinstance(base, layer_type):
    raise TypeError(
        f'{owner}: `wrapped` must be an nn.{layer_type.__name__} (or a peft'
        f' quantization wrapper of one), got {type(wrapped).__name__}. Use'
        ' LoRADense for nn.Dense, LoRAEinsum for nn.Einsum and'
        ' LoRADenseGeneral for nn.DenseGeneral.'
    )


def _kernel_box(wrapper: nn.Module) -> nn.Partitioned | None:
  """The wrapped kernel's `nn.Partitioned` box (value dropped), or None.

  Read from the scope the wrapper shares with the wrapped layer, after the
  layer ran. Under a peft int4 layer the stored `kernel` is the packed
  storage; its names are mapped back to the float kernel's.
  """
  if not wrapper.has_variable('params', 'kernel'):
    return None
  box = wrapper.get_variable('params', 'kernel')
  if not isinstance(box, nn.Partitioned):
    return None
  names = tuple(box.names)
  # Under nested interceptors the quantization wrapper may run in place of
  # `wrapped` (see `peft.linen.interceptor.stand_in`).
  layer, seen = _interceptor.stand_in(wrapper.wrapped), 0
  while isinstance(layer, _interceptor.StandsForLayer) and seen < 8:
    names = layer.float_kernel_names(names)
    layer, seen = layer.wrapped, seen + 1
  return box.replace(value=None, names=names)


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

  _wrapped_type: ClassVar[type[nn.Module]]

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
    super().__post_init__()
    # Share scope to make the wrapper transparent for the params
    # (instead of nesting `{'params': {'wrapped': ...}}`).
    if self.scope is not None and self.wrapped.scope is not None:
      nn.share_scope(self, self.wrapped)


# ---------------------------------------------------------------------------
# Adapters: only `x @ A @ B` (times alpha / rank).
# ---------------------------------------------------------------------------


class _LoRAAdapterBase(nn.Module):
  """The fields every linen adapter has (see `LoRADenseAdapter`)."""

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
  def __call__(self, inputs: Array) -> Array:
    _check_rank(self.rank, type(self).__name__)
    return _run_adapter(
        self,
        _nnx_lora.LoRALinearAdapter,
        (inputs.shape[-1], self.features),
        _adapter_kwargs(self),
        inputs,
        kernel_sharding=self.kernel_sharding,
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
  def __call__(self, inputs: Array) -> Array:
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
  def __call__(self, inputs: Array) -> Array:
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
    )


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
  """

  _wrapped_type = nn.Dense

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    y = self.wrapped(inputs)
    adapter = self._adapter(
        LoRADenseAdapter, features=_base_layer(self.wrapped).features)
    return y + adapter(inputs).astype(y.dtype)


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
    alpha, dtype, a_init, b_init: as in `LoRADense`.
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
    return y + adapter(inputs).astype(y.dtype)


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
    alpha, dtype, a_init, b_init: as in `LoRADense`.
  """

  _wrapped_type = nn.DenseGeneral

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    base = _base_layer(self.wrapped)
    y = self.wrapped(inputs)
    adapter = self._adapter(
        LoRADenseGeneralAdapter, features=base.features, axis=base.axis,
        batch_dims=base.batch_dims)
    return y + adapter(inputs).astype(y.dtype)

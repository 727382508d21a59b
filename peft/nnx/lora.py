"""LoRA around any registered NNX layer: one wrapper class.

A wrapper keeps the layer it wraps untouched and adds a low-rank update:

    output = wrapped(x) + scale * einsum(x, a, b)

in the wrapped layer's geometry (`peft.geometry.Geometry`), computed by a
`peft.nnx.adapter.LoRAAdapter` held as `wrapper.lora`. `LoRA` works for every
layer type of `peft.nnx.registry`; `LoRALinear`, `LoRAEinsum` and
`LoRALinearGeneral` are `LoRA` with the wrapped type checked. The adapter
classes are re-exported here.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from peft.nnx.lora import LoRALinear
  >>> layer = LoRALinear(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rank=2,
  ...                    rngs=nnx.Rngs(1))
  >>> layer.lora.a.shape, layer.lora.b.shape
  ((3, 2), (2, 4))
  >>> bool(jnp.all(layer(jnp.ones((1, 3))) == layer.wrapped(jnp.ones((1, 3)))))
  True
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx

from peft.geometry import Geometry
from peft.nnx import dora as _dora
from peft.nnx import quantized as _q
from peft.nnx import registry
from peft.nnx.named import AdapterIds
from peft.nnx.named import AdapterWeights
from peft.nnx.named import NamedAdapters
from peft.nnx.named import check_name
from peft.nnx import routing as _routing
from peft.nnx.adapter import _DEFAULT_A_INIT
from peft.nnx.adapter import _DEFAULT_B_INIT
from peft.nnx.adapter import Initializer
from peft.nnx.adapter import LoRAAdapter
from peft.nnx.adapter import LoRAEinsumAdapter
from peft.nnx.adapter import LoRALinearAdapter
from peft.nnx.adapter import LoRALinearGeneralAdapter
from peft.nnx.adapter import LoRAScale

__all__ = [
    'LoRAScale',
    'LoRAAdapter',
    'LoRA',
    'LoRALinearAdapter',
    'LoRAEinsumAdapter',
    'LoRALinearGeneralAdapter',
    'LoRALinear',
    'LoRAEinsum',
    'LoRALinearGeneral',
    'wrapper_class',
    'AdapterWeights',
    'AdapterIds',
    'DEFAULT_NAME',
]

_INITS = ('default', 'pissa')

#: The name of the adapter `apply_lora` creates when no name is given.
DEFAULT_NAME = 'default'


# ---------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------


class _Base(tp.NamedTuple):
  """What the wrapper needs to know about the layer it wraps."""

  geometry: Geometry
  kernel_shape: tuple[int, ...]  # with stacking axes
  dtype: tp.Any
  names: tuple | None  # kernel sharding names
  meta: dict  # mesh / sharding rules for the factors
  kernel: nnx.Variable | None  # the float kernel variable, if any


def _float_kernel(layer) -> nnx.Variable | None:
  entry = registry.layer_type(layer)
  if entry is None:
    return None
  var = getattr(layer, entry.kernel, None)
  return var if isinstance(var, nnx.Variable) else None


def _sharding_meta(var: nnx.Variable) -> tuple[tuple | None, dict]:
  meta = var.get_metadata()
  names = meta.get('out_sharding') or meta.get('kernel_sharding') or None
  extra = {}
  if names is not None:
    mesh = meta.get('mesh')
    sharding = getattr(var.get_value(), 'sharding', None)
    if mesh is None and isinstance(sharding, jax.sharding.NamedSharding):
      mesh = sharding.mesh
    extra = {'mesh': mesh, 'sharding_rules': meta.get('sharding_rules')}
  return (None if names is None else tuple(names)), extra


def _describe_base(wrapped, geometry: Geometry | None) -> _Base:
  """Geometry, kernel shape/dtype and sharding of the layer to wrap."""
  if isinstance(wrapped, LoRA):
    raise TypeError(
        f'{type(wrapped).__name__} already has a LoRA adapter; wrap its base'
        ' layer (`.wrapped`) instead, or merge it first (merge_lora)'
    )
  if isinstance(wrapped, _q.QuantizedLayer):
    g = geometry or wrapped.geometry
    names = wrapped.kernel_sharding
    meta = {}
    if names is not None:
      meta = {'mesh': wrapped.values.get_metadata().get('mesh')}
    return _Base(g, tuple(wrapped.kernel_shape), wrapped.param_dtype, names,
                 meta, None)
  float_layer = wrapped
  if isinstance(wrapped, _q.SimulateQuantized):
    float_layer = wrapped.wrapped
  if registry.layer_type(float_layer) is None:
    raise TypeError(
        f'cannot wrap {type(wrapped).__module__}.{type(wrapped).__qualname__}'
        ' with LoRA: ' + registry.unsupported_message(wrapped)
    )
  g = geometry or registry.geometry_of(float_layer)
  kernel = _float_kernel(float_layer)
  if kernel is None:
    raise TypeError(
        f'{type(float_layer).__qualname__} has no kernel variable'
        f' {registry.layer_type(float_layer).kernel!r}; cannot size the LoRA'
        ' factors'
    )
  value = kernel.get_value()
  names, meta = _sharding_meta(kernel)
  return _Base(g, tuple(value.shape), value.dtype, names, meta, kernel)


class LoRA(registry.ReadsThrough, NamedAdapters, nnx.Module):
  """LoRA around any registered layer (or its quantized version).

  Output: `wrapped(x) + lora(x)`, with `lora` a `LoRAAdapter` in the wrapped
  layer's geometry. A kernel stacked by `nnx.vmap` (leading layer axes) gives
  factors with the same leading axes; call the layer inside `nnx.scan`.
  Kernel sharding names go to the factors (`a` the contracted axes' names,
  `b` the output axes' names).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> base = nnx.Einsum('ebd,edf->ebf', (4, 3, 5), rngs=nnx.Rngs(0))
    >>> layer = LoRA(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    >>> layer.lora.a.shape, layer.lora.b.shape, float(layer.lora.scale[...])
    ((4, 3, 2), (4, 2, 5), 2.0)

  Args:
    wrapped: the layer to adapt (a registered type, or a SimulateQuantized /
      quantized layer); kept unchanged as `self.wrapped` (except with
      `init='pissa'`, which writes the residual into its kernel).
    rank: LoRA rank, a positive int.
    alpha: `scale = alpha / rank` (`alpha / sqrt(rank)` with `use_rslora`);
      `None` means `scale = 1`; 0 is refused.
    use_rslora: rank-stabilised scaling.
    a_init: initializer of `a` (default he/kaiming uniform).
    b_init: initializer of `b` (default zeros: a fresh wrapper changes
      nothing).
    dtype: compute dtype of the adapter (default: the wrapped layer's
      `dtype`, else promotion of input and params).
    param_dtype: storage dtype of `a`, `b` (default: the wrapped kernel's
      dtype, so a bf16 model stays bf16).
    dropout: dropout rate on the adapter input (`model.eval()` switches it
      off; not for kernels stacked by `nnx.vmap`).
    init: `'default'` or `'pissa'`: `a`, `b` from the top-`rank` SVD of the
      kernel, and the kernel replaced IN PLACE by the residual
      `kernel - delta()` (needs a float kernel), so the output is unchanged.
    geometry: the wrapped layer's geometry, when the registry cannot read it
      (e.g. an `nnx.Einsum` whose string is given at call time).
    rngs: `nnx.Rngs` for the initializers.

  Raises:
    TypeError: `wrapped` is not a registered layer type (or already wrapped).
    ValueError: rank <= 0, alpha == 0, unsupported layouts, bad `init`.
  """

  def __init__(
      self,
      wrapped: nnx.Module,
      *,
      rank: int,
      alpha: float | None = None,
      use_rslora: bool = False,
      a_init: Initializer = _DEFAULT_A_INIT,
      b_init: Initializer = _DEFAULT_B_INIT,
      dtype=None,
      param_dtype=None,
      dropout: float = 0.0,
      init: str = 'default',
      geometry: Geometry | None = None,
      name: str = DEFAULT_NAME,
      dora: bool = False,
      rngs: nnx.Rngs,
  ):
    if init not in _INITS:
      raise ValueError(f'init must be one of {_INITS}, got init={init!r}')
    check_name(name)
    base = _describe_base(wrapped, geometry)
    lead = base.geometry.lead_shape(base.kernel_shape)
    if param_dtype is None:
      param_dtype = base.dtype
      if not jnp.issubdtype(jnp.dtype(param_dtype), jnp.floating):
        raise TypeError(
            f'the wrapped kernel has dtype {jnp.dtype(param_dtype)}, not a'
            ' floating dtype; pass param_dtype=jnp.float32 (or bfloat16) for'
            ' the LoRA factors'
        )
    self.wrapped = wrapped
    self.lora = LoRAAdapter(
        base.geometry, rank=rank, alpha=alpha, use_rslora=use_rslora,
        leading_shape=lead, a_init=a_init, b_init=b_init,
        dtype=dtype if dtype is not None else getattr(wrapped, 'dtype', None),
        param_dtype=param_dtype,
        precision=getattr(wrapped, 'precision', None), dropout=dropout,
        kernel_sharding=base.names, sharding_meta=base.meta, rngs=rngs,
    )
    # Several named adapters (see peft.nnx.adapters): `lora` is the first,
    # the others live in `adapters`; the selection lives in variables, so
    # switching adapters under jit does not retrace.
    self.adapter_names = (name,)
    self.adapters = nnx.data(None)  # nnx.Dict of further named adapters
    self.adapter_weights = nnx.data(None)  # AdapterWeights [n], if routed
    self.adapter_ids = nnx.data(None)  # AdapterIds [batch], per example
    self.enabled = True
    self.init = init  # 'pissa' changed the base kernel (exporters check it)
    if init == 'pissa':
      self._pissa_init(base.kernel)
    if not isinstance(dora, bool):
      raise TypeError(f'dora must be a bool, got {dora!r}')
    if dora:
      _dora.init_magnitude(self, base.names, base.meta)

  # -- DoRA ----------------------------------------------------------------

  def base_kernel(self) -> jax.Array:
    """The kernel the wrapped layer computes with, as a float32 array.

    The float kernel; for a simulated layer its fake-quantized kernel; for a
    quantized layer the dequantized storage (whole: `merge_lora` uses it; a
    DoRA step does not, see `peft.nnx.dora`).
    """
    w = self.wrapped
    if isinstance(w, _q.QuantizedLayer):
      return jnp.asarray(w.dequantized_kernel(), jnp.float32)
    if isinstance(w, _q.SimulateQuantized):
      return jnp.asarray(w.quantized_kernel(), jnp.float32)
    return jnp.asarray(_float_kernel(w)[...], jnp.float32)

  def base_bias(self) -> jax.Array | None:
    """The wrapped layer's bias value (or None)."""
    w = self.wrapped
    if isinstance(w, (_q.QuantizedLayer, _q.SimulateQuantized)):
      var = getattr(w, 'bias', None)
    else:
      entry = registry.layer_type(w)
      var = getattr(w, entry.bias, None) if entry.bias else None
    return None if var is None else var[...]

  # -- named adapters ----------------------------------------------------

  check_name = staticmethod(check_name)

  def add_adapter(self, name: str, *, rank: int, alpha: float | None = None,
                  rngs: nnx.Rngs, **kwargs) -> LoRAAdapter:
    """Adds another adapter on the same base layer (inactive: weight 0).

    Args:
      name: a name not used on this layer yet.
      rank: its rank (adapters of one layer may have different ranks).
      alpha: its scale numerator (`alpha / rank`).
      rngs: `nnx.Rngs` for the initializers.
      **kwargs: `use_rslora`, `a_init`, `b_init`, `dtype`, `param_dtype`,
        `dropout`, as for the wrapper.

    Returns:
      The new adapter.

    Raises:
      ValueError: the name is already used on this layer.
    """
    check_name(name)
    if name in self.adapter_names:
      raise ValueError(
          f'this layer already has an adapter named {name!r}; names are'
          ' unique per layer (delete_adapter it first, or pick another name)'
      )
    unknown = set(kwargs) - {'use_rslora', 'a_init', 'b_init', 'dtype',
                             'param_dtype', 'dropout'}
    if unknown:
      raise TypeError(f'add_adapter: unexpected arguments {sorted(unknown)}')
    base = _describe_base(self.wrapped, self.lora.geometry)
    kwargs.setdefault('param_dtype', self.lora.param_dtype)
    kwargs.setdefault('dtype', self.lora.dtype)
    new = LoRAAdapter(
        base.geometry, rank=rank, alpha=alpha,
        leading_shape=self.lora.leading_shape,
        precision=self.lora.precision, kernel_sharding=base.names,
        sharding_meta=base.meta, rngs=rngs, **kwargs,
    )
    if self.adapters is None:
      self.adapters = nnx.Dict()
    self.adapters[name] = new
    weights = self._weights_list()
    self.adapter_names = self.adapter_names + (name,)
    self.adapter_weights = AdapterWeights(
        jnp.asarray(weights + [0.0], jnp.float32))
    return new

  def _pissa_init(self, kernel: nnx.Variable | None):
    """`a`, `b` from the top singular triplets; kernel -= delta (in place)."""
    if kernel is None or isinstance(self.wrapped, (_q.QuantizedLayer,
                                                   _q.SimulateQuantized)):
      raise ValueError(
          "init='pissa' needs a float kernel on the wrapped layer (it writes"
          ' the residual back into it); apply LoRA with PiSSA before'
          ' quantizing, or use the default init'
      )
    kernel[...] = self.lora.init_pissa(kernel[...]).astype(kernel.dtype)

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    """`wrapped(x) + lora(x)`, in the wrapped layer's output dtype.

    With several adapters: the weighted sum of the active ones (an adapter
    of weight 0 is skipped at run time by `lax.cond`), or one adapter per
    example after `set_ids`. Disabled (`enabled=False`): `wrapped(x)` only.
    """
    y = self.wrapped(x, *args, **kwargs)
    if not self.enabled:
      return y
    out_sharding = kwargs.get('out_sharding')
    if self.lora.magnitude is not None or self.adapters is not None and any(
        ad.magnitude is not None for _, ad in self.named_adapters()):
      if len(self.adapter_names) > 1:
        raise ValueError(
            'DoRA adapters are supported on layers with a single adapter;'
            ' this layer has ' + str(list(self.adapter_names)))
      return _dora.forward(self, x, y, out_sharding)
    if self.adapter_ids is not None:
      delta = _routing.per_example(self, x, out_sharding)
    elif self.adapter_weights is None:
      delta = self.lora(x, out_sharding=out_sharding)
    else:
      delta = _routing.weighted(self, x, out_sharding)
    return y + delta.astype(y.dtype)

  def delta(self) -> jax.Array:
    """`sum_i w_i * scale_i * (a_i @ b_i)` shaped like the kernel (float32).

    With one adapter: its `scale * (a @ b)`; with several: the weighted sum
    of the adapters as the layer applies them (not defined while routing
    per example).
    """
    if self.adapter_ids is not None:
      raise ValueError(
          'this layer routes adapters per example (set_adapter_ids); there is'
          ' no single delta. Call set_active_adapters first.'
      )
    if self.lora.magnitude is not None:  # DoRA: W' - W
      return _dora.delta(self)
    if self.adapter_weights is None:
      return self.lora.delta()
    weights = self.adapter_weights[...]
    return sum(weights[i] * ad.delta()
               for i, (_, ad) in enumerate(self.named_adapters()))

  def __treescope_repr__(self, path, subtree_renderer):
    from peft.nnx import visual  # pylint: disable=g-import-not-at-top
    return visual.lora_treescope_repr(self, path, subtree_renderer)


def _check_base(wrapper: str, wrapped, accepts: tuple[type, ...]) -> None:
  base = wrapped.wrapped if isinstance(wrapped, _q.SimulateQuantized) else (
      wrapped)
  if isinstance(base, accepts):
    return
  names = ' or '.join(t.__qualname__ for t in accepts)
  msg = (f'{wrapper}(wrapped=...) accepts an nnx.{names} (or its simulated'
         f' or real quantized version); got {type(wrapped).__module__}.'
         f'{type(wrapped).__qualname__}')
  better = wrapper_class(wrapped)
  if better is not LoRA:
    msg += f'; for this layer use {better.__name__} instead'
  elif registry.layer_type(base) is not None:
    msg += '; for this layer use peft.nnx.LoRA instead'
  raise TypeError(msg)


class LoRALinear(LoRA):
  """`LoRA` around an `nnx.Linear` (or its quantized version).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = LoRALinear(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rank=2,
    ...                    alpha=4.0, rngs=nnx.Rngs(1))
    >>> layer(jnp.ones((5, 3))).shape, float(layer.lora.scale[...])
    ((5, 4), 2.0)

  Arguments: those of `LoRA`.
  """

  def __init__(self, wrapped: nnx.Module, **kwargs):
    _check_base('LoRALinear', wrapped, (nnx.Linear, _q.Int4Linear))
    super().__init__(wrapped, **kwargs)


class LoRALinearGeneral(LoRA):
  """`LoRA` around an `nnx.LinearGeneral` (or its quantized version).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> base = nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1),
    ...                          rngs=nnx.Rngs(0))
    >>> layer = LoRALinearGeneral(base, rank=2, rngs=nnx.Rngs(1))
    >>> layer.lora.a.shape, layer(jnp.ones((7, 2, 3))).shape
    ((2, 3, 2), (7, 4, 5))

  Arguments: those of `LoRA`.
  """

  def __init__(self, wrapped: nnx.Module, **kwargs):
    _check_base('LoRALinearGeneral', wrapped,
                (nnx.LinearGeneral, _q.Int4LinearGeneral))
    super().__init__(wrapped, **kwargs)


class LoRAEinsum(LoRA):
  """`LoRA` around an `nnx.Einsum` (or its quantized version).

  Any einsum string whose kernel axes are each contracted or kept works,
  including batch/expert axes (`'ebd,edf->ebf'`) and ellipsis inputs
  (`'...d,dhk->...hk'`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> base = nnx.Einsum('ebd,edf->ebf', (4, 3, 5), rngs=nnx.Rngs(0))
    >>> layer = LoRAEinsum(base, rank=2, rngs=nnx.Rngs(1))
    >>> layer.lora.a.shape, layer(jnp.ones((4, 6, 3))).shape
    ((4, 3, 2), (4, 6, 5))

  Args:
    wrapped: the Einsum layer.
    einsum_str: the einsum string when the wrapped layer has none (it was
      meant to be given at call time).
    **kwargs: those of `LoRA`.
  """

  def __init__(self, wrapped: nnx.Module, *, einsum_str: str | None = None,
               **kwargs):
    _check_base('LoRAEinsum', wrapped, (nnx.Einsum, _q.Int4Einsum))
    einsum_str = einsum_str or getattr(wrapped, 'einsum_str', None)
    if einsum_str is None:
      raise ValueError(
          'the wrapped Einsum has no einsum_str (it expects one per call);'
          ' pass einsum_str=... to LoRAEinsum'
      )
    geometry = kwargs.pop('geometry', None)
    if geometry is None:
      kernel = _float_kernel(wrapped.wrapped if isinstance(
          wrapped, _q.SimulateQuantized) else wrapped)
      shape = (tuple(kernel.shape) if kernel is not None
               else tuple(wrapped.kernel_shape))
      n = len(''.join(einsum_str.split()).split('->')[0].split(',')[-1])
      geometry = Geometry.from_einsum(einsum_str, shape[len(shape) - n:])
    self.einsum_str = ''.join(einsum_str.split())
    super().__init__(wrapped, geometry=geometry, **kwargs)

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    if args or kwargs.get('einsum_str') is not None:
      es = args[0] if args else kwargs['einsum_str']
      if ''.join(es.split()) != self.einsum_str:
        raise ValueError(
            f'einsum_str={es!r} differs from the one the adapter was built'
            f' for ({self.einsum_str!r})'
        )
    return super().__call__(x, *args, **kwargs)


def wrapper_class(wrapped) -> type[LoRA]:
  """The LoRA class `apply_lora` builds for `wrapped`.

  `LoRALinear` / `LoRAEinsum` / `LoRALinearGeneral` for flax's layers (and
  their quantized versions), `LoRA` for any other registered type.

  Examples:
    >>> from flax import nnx
    >>> wrapper_class(nnx.Linear(2, 3, rngs=nnx.Rngs(0))).__name__
    'LoRALinear'
  """
  base = wrapped.wrapped if isinstance(wrapped, _q.SimulateQuantized) else (
      wrapped)
  for cls, accepts in (
      (LoRALinear, (nnx.Linear, _q.Int4Linear)),
      (LoRAEinsum, (nnx.Einsum, _q.Int4Einsum)),
      (LoRALinearGeneral, (nnx.LinearGeneral, _q.Int4LinearGeneral)),
  ):
    if isinstance(base, accepts):
      return cls
  return LoRA

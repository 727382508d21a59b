"""LoRA for any registered NNX layer: one adapter, one wrapper.

A wrapper keeps the layer it wraps untouched and adds a low-rank update:

    output = wrapped(x) + scale * einsum(x, a, b)

in the wrapped layer's geometry (`peft.geometry.Geometry`): `a` holds the
kernel's batch axes, its contracted axes and the rank axis; `b` the batch
axes, the rank axis and the output axes. `a` and `b` are flax's own
`nnx.LoRAParam`, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains only
them; `scale` is a `LoRAScale` variable (data, not a static attribute), so
changing it does not retrace a jitted function.

`LoRAAdapter` and `LoRA` work for every layer type of `peft.nnx.registry`;
`LoRALinear`, `LoRAEinsum`, `LoRALinearGeneral` (and the `*Adapter` forms)
are the same classes with the geometry fixed by their arguments.

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

import math
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft.geometry import Geometry
from peft.nnx import quantized as _q
from peft.nnx import registry

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
]

Initializer = tp.Callable[..., jax.Array]

_DEFAULT_A_INIT: Initializer = nnx.initializers.he_uniform()
_DEFAULT_B_INIT: Initializer = nnx.initializers.zeros

_INITS = ('default', 'pissa')


class LoRAScale(nnx.Variable):
  """Non-trainable float32 scalar multiplying the LoRA product (alpha / rank).

  It is data, not a static attribute: assigning a new value does not retrace a
  jitted function, and `nnx.LoRAParam` / `nnx.Param` filters never select it.

  Examples:
    >>> import jax.numpy as jnp
    >>> s = LoRAScale(jnp.float32(0.5))
    >>> s[...] = 0.25
    >>> float(s[...])
    0.25
  """


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def _check_rank(rank) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise TypeError(
        f'rank must be a positive int, got rank={rank!r}; pass e.g. rank=8'
    )
  if rank <= 0:
    raise ValueError(
        f'rank must be a positive int, got rank={rank!r}; pass e.g. rank=8'
    )
  return int(rank)


def scale_value(rank: int, alpha, use_rslora: bool = False) -> float:
  """`alpha / rank` (`alpha / sqrt(rank)` with rsLoRA); 1 when alpha is None.

  Raises:
    TypeError: alpha is not a real number.
    ValueError: alpha is 0 (every adapter gradient would be 0) or not finite.

  Examples:
    >>> scale_value(8, 16.0), scale_value(4, 4.0, use_rslora=True)
    (2.0, 2.0)
  """
  if alpha is None:
    return 1.0
  if isinstance(alpha, (bool, str)) or not isinstance(
      alpha, (int, float, np.integer, np.floating)):
    raise TypeError(
        f'alpha must be a real number or None, got {type(alpha).__name__}'
    )
  alpha = float(alpha)
  if not math.isfinite(alpha):
    raise ValueError(f'alpha must be finite, got alpha={alpha!r}')
  if alpha == 0:
    raise ValueError(
        'alpha=0 makes the LoRA scale 0, so the adapter has no effect and'
        ' every adapter gradient is exactly 0; pass alpha=None (scale 1) or'
        ' a non-zero alpha (e.g. alpha=2*rank)'
    )
  return alpha / (math.sqrt(rank) if use_rslora else float(rank))


def _check_leading_shape(leading_shape) -> tuple[int, ...]:
  try:
    shape = tuple(int(d) for d in leading_shape)
  except TypeError:
    raise TypeError(
        'leading_shape must be a tuple of ints (the stacking axes added by'
        f' nnx.vmap), got {leading_shape!r}'
    ) from None
  if any(d <= 0 for d in shape):
    raise ValueError(f'leading_shape={shape} must hold positive sizes')
  return shape


def _check_float_dtype(dtype, what: str):
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'{what}={dtype} is not a floating dtype; LoRA factors must be float'
        ' (pass param_dtype=jnp.float32 for a layer with an integer kernel)'
    )
  return dtype


def _init_factor(init, key, batch: tuple[int, ...], shape2, dtype):
  """Runs a 2-D initializer once per batch slice (fan-in of one slice)."""
  n = math.prod(batch)
  if n == 1:
    value = jnp.asarray(init(key, shape2, dtype))
    return jnp.reshape(value, (*batch, *shape2))
  keys = jax.random.split(key, n)
  value = jax.vmap(lambda k: init(k, shape2, dtype))(keys)
  return jnp.reshape(value, (*batch, *shape2))


def _factor_param(value, names, meta) -> nnx.LoRAParam:
  """A LoRAParam sharded by `names` (on `meta['mesh']` or the ambient mesh)."""
  if names is None:
    return nnx.LoRAParam(value)
  kwargs = {k: v for k, v in dict(meta or {}).items() if v is not None}
  kwargs['out_sharding'] = tuple(names)
  if 'mesh' not in kwargs and jax.sharding.get_abstract_mesh().empty:
    kwargs['eager_sharding'] = False  # nothing to place on: names only
  return nnx.LoRAParam(value, **kwargs)


# ---------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------


class LoRAAdapter(nnx.Module):
  """The LoRA branch of a layer: `scale * einsum(x, a, b)` only.

  `a` has shape `(*leading_shape, *batch, *contracted, rank)` and `b`
  `(*leading_shape, *batch, rank, *output)` (see `Geometry.lora_shapes`);
  `leading_shape` holds stacking axes added by `nnx.vmap` (call the adapter
  per slice, e.g. inside `nnx.scan`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from peft.geometry import Geometry
    >>> g = Geometry.from_einsum('btd,dnh->btnh', (8, 2, 4))
    >>> ad = LoRAAdapter(g, rank=3, rngs=nnx.Rngs(0))
    >>> ad.a.shape, ad.b.shape, ad(jnp.ones((5, 7, 8))).shape
    ((8, 3), (3, 2, 4), (5, 7, 2, 4))

  Args:
    geometry: the wrapped layer's geometry (one layer, no stacking axes).
    rank: LoRA rank, a positive int.
    alpha: `scale = alpha / rank` (`alpha / sqrt(rank)` with
      `use_rslora=True`); `None` means `scale = 1`; 0 is refused.
    use_rslora: rank-stabilised scaling.
    leading_shape: stacking axes prepended to `a` and `b`.
    a_init: initializer of `a`, called per batch slice with the 2-D shape
      `(in_features, rank)` (default kaiming/he uniform over that fan-in).
    b_init: initializer of `b`, `(rank, out_features)` per slice (default
      zeros: a fresh adapter changes nothing).
    dtype: compute dtype (default: promote input and params).
    param_dtype: storage dtype of `a` and `b` (floating).
    precision: matmul precision.
    dropout: dropout rate on the adapter input (0 = none).
    kernel_sharding: sharding names of the kernel `(*leading, *kernel axes)`;
      `a` and `b` take the names of the axes they share with it.
    sharding_meta: extra metadata for the factors (e.g. `mesh`).
    rngs: `nnx.Rngs` for the initializers (and dropout).
  """

  def __init__(
      self,
      geometry: Geometry,
      *,
      rank: int,
      alpha: float | None = None,
      use_rslora: bool = False,
      leading_shape: tp.Sequence[int] = (),
      a_init: Initializer = _DEFAULT_A_INIT,
      b_init: Initializer = _DEFAULT_B_INIT,
      dtype=None,
      param_dtype=jnp.float32,
      precision=None,
      dropout: float = 0.0,
      kernel_sharding: tp.Sequence[str | None] | None = None,
      sharding_meta: tp.Mapping[str, tp.Any] | None = None,
      rngs: nnx.Rngs,
  ):
    if not isinstance(geometry, Geometry):
      raise TypeError(
          f'geometry must be a peft.geometry.Geometry, got'
          f' {type(geometry).__name__}'
      )
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(
          f'rngs must be an nnx.Rngs, got {type(rngs).__name__}; pass'
          ' rngs=nnx.Rngs(0)'
      )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
      raise TypeError(f'dropout must be a float in [0, 1), got {dropout!r}')
    if not 0.0 <= float(dropout) < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got dropout={dropout!r}')
    rank = _check_rank(rank)
    leading_shape = _check_leading_shape(leading_shape)
    if dropout and leading_shape:
      raise ValueError(
          f'dropout={dropout} is not supported on layers stacked by nnx.vmap'
          f' (leading_shape={leading_shape}); its rng state has no stacking'
          ' axis. Wrap inside the vmapped constructor instead, or use'
          ' dropout=0'
      )
    a_str, b_str = geometry.lora_strs()  # also checks the layout
    self.geometry = geometry
    self.rank = rank
    self.alpha = alpha
    self.use_rslora = bool(use_rslora)
    self.leading_shape = leading_shape
    self.dtype = dtype
    self.param_dtype = _check_float_dtype(param_dtype, 'param_dtype')
    self.precision = precision

    lead = leading_shape + geometry.batch_shape
    fan_in, fan_out = geometry.matrix_shape
    a_shape, b_shape = geometry.lora_shapes(rank)
    a = _init_factor(a_init, rngs.params(), lead, (fan_in, rank),
                     self.param_dtype)
    b = _init_factor(b_init, rngs.params(), lead, (rank, fan_out),
                     self.param_dtype)
    a_names = b_names = None
    if kernel_sharding is not None:
      names = tuple(kernel_sharding)
      if len(names) == len(geometry.kernel):
        names = (None,) * len(leading_shape) + names
      elif len(names) != len(geometry.kernel) + len(leading_shape):
        raise ValueError(
            f'kernel_sharding={names} does not name the'
            f' {len(geometry.kernel) + len(leading_shape)} axes of the kernel'
        )
      by_letter = dict(zip(geometry.kernel, names[len(leading_shape):]))
      lead_names = names[:len(leading_shape)]
      a_names = lead_names + tuple(by_letter.get(c) for c in a_str)
      b_names = lead_names + tuple(by_letter.get(c) for c in b_str)
    self.a = _factor_param(jnp.reshape(a, leading_shape + a_shape), a_names,
                           sharding_meta)
    self.b = _factor_param(jnp.reshape(b, leading_shape + b_shape), b_names,
                           sharding_meta)
    # One scale per stacked slice, so nnx.scan / nnx.vmap can slice it.
    self.scale = LoRAScale(jnp.full(
        leading_shape, scale_value(rank, alpha, use_rslora), jnp.float32))
    self.dropout = (nnx.Dropout(float(dropout), rngs=rngs) if dropout
                    else nnx.data(None))

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    """`scale * einsum(x, a, b)` in the wrapped layer's geometry."""
    a, b = self.a[...], self.b[...]
    if a.ndim != len(self.geometry.lora_strs()[0]):
      raise ValueError(
          f'{type(self).__name__}: a has shape {a.shape} with stacking axes'
          f' {self.leading_shape}; call a layer stacked by nnx.vmap inside'
          ' nnx.scan / nnx.vmap over the stacking axis'
      )
    if self.dropout is not None:
      x = self.dropout(x)
    x, a, b = nnx.nn.dtypes.promote_dtype((x, a, b), dtype=self.dtype)
    # Scaling `a` costs |a| multiplies, far below either contraction.
    a = a * self.scale[...].astype(a.dtype)
    return jnp.einsum(self.geometry.lora_einsum_str(ndim=x.ndim), x, a, b,
                      precision=self.precision, out_sharding=out_sharding)

  def delta(self) -> jax.Array:
    """`scale * (a @ b)` shaped like the wrapped kernel, in float32."""
    a = jnp.asarray(self.a[...], jnp.float32)
    b = jnp.asarray(self.b[...], jnp.float32)
    d = jnp.einsum('...' + self.geometry.delta_einsum_str().replace(
        ',', ',...').replace('->', '->...'), a, b,
                   precision=jax.lax.Precision.HIGHEST)
    scale = jnp.asarray(self.scale[...], jnp.float32)
    return d * jnp.reshape(scale, scale.shape + (1,) * len(
        self.geometry.kernel))

  def __treescope_repr__(self, path, subtree_renderer):
    from peft.nnx import visual  # pylint: disable=g-import-not-at-top
    return visual.adapter_treescope_repr(self, path, subtree_renderer)


class LoRALinearAdapter(LoRAAdapter):
  """The LoRA branch of an `nnx.Linear`: `a` `(in, rank)`, `b` `(rank, out)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> ad = LoRALinearAdapter(3, 4, rank=2, rngs=nnx.Rngs(0))
    >>> ad(jnp.ones((5, 3))).shape, ad.delta().shape
    ((5, 4), (3, 4))

  The other arguments are those of `LoRAAdapter`.
  """

  def __init__(self, in_features: int, out_features: int, **kwargs):
    self.in_features = int(in_features)
    self.out_features = int(out_features)
    super().__init__(Geometry.linear(in_features, out_features), **kwargs)


class LoRAEinsumAdapter(LoRAAdapter):
  """The LoRA branch of an `nnx.Einsum` (e.g. `'ebd,edf->ebf'` gives
  `a: (e, d, r)`, `b: (e, r, f)`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> ad = LoRAEinsumAdapter('bi,imn->bmn', (3, 4, 5), rank=2,
    ...                        rngs=nnx.Rngs(0))
    >>> ad.a.shape, ad.b.shape, ad(jnp.ones((6, 3))).shape
    ((3, 2), (2, 4, 5), (6, 4, 5))

  Args:
    einsum_str: the wrapped layer's `'inputs,weights->outputs'` string.
    kernel_shape: the per-layer kernel shape (without stacking axes).
    **kwargs: those of `LoRAAdapter`.
  """

  def __init__(self, einsum_str: str, kernel_shape: tp.Sequence[int],
               **kwargs):
    geometry = Geometry.from_einsum(einsum_str, kernel_shape)
    self.einsum_str = ''.join(einsum_str.split())
    self.kernel_shape = geometry.kernel_shape
    super().__init__(geometry, **kwargs)
    self.lora_str = geometry.lora_einsum_str() if geometry.inputs else None


class LoRALinearGeneralAdapter(LoRAAdapter):
  """The LoRA branch of an `nnx.LinearGeneral`.

  With `batch_axis` sizes `B`, `in_features` `I` and `out_features` `O`, the
  kernel is `(*B, *I, *O)`, `a` is `(*B, *I, rank)` and `b` `(*B, rank, *O)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> ad = LoRALinearGeneralAdapter((2, 3), (4, 5), axis=(-2, -1), rank=2,
    ...                               rngs=nnx.Rngs(0))
    >>> ad.a.shape, ad.b.shape, ad(jnp.ones((7, 2, 3))).shape
    ((2, 3, 2), (2, 4, 5), (7, 4, 5))

  Args:
    in_features: int or tuple, sizes of the contracted input axes.
    out_features: int or tuple, output feature sizes.
    axis: int or tuple, the input axes contracted.
    batch_axis: mapping from leading input axes to sizes shared with the
      kernel (as in `nnx.LinearGeneral`).
    **kwargs: those of `LoRAAdapter`.
  """

  def __init__(self, in_features, out_features, *, axis=-1,
               batch_axis: tp.Mapping[int, int] | None = None, **kwargs):
    geometry = Geometry.linear_general(in_features, out_features, axis=axis,
                                       batch_axis=batch_axis)
    n_b = len(dict(batch_axis or {}))
    n_i = len(geometry.kernel_shape) - n_b - len(geometry.output)
    self.in_features = geometry.kernel_shape[n_b:n_b + n_i]
    self.out_features = geometry.kernel_shape[n_b + n_i:]
    self.axis = tuple(axis) if isinstance(axis, (tuple, list)) else (
        int(axis),)
    self.batch_axis = tuple(sorted(dict(batch_axis or {}).items()))
    super().__init__(geometry, **kwargs)


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


class LoRA(nnx.Module):
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
      rngs: nnx.Rngs,
  ):
    if init not in _INITS:
      raise ValueError(f'init must be one of {_INITS}, got init={init!r}')
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
    if init == 'pissa':
      self._pissa_init(base.kernel)

  def _pissa_init(self, kernel: nnx.Variable | None):
    """`a`, `b` from the top singular triplets; kernel -= delta (in place)."""
    if kernel is None or isinstance(self.wrapped, (_q.QuantizedLayer,
                                                   _q.SimulateQuantized)):
      raise ValueError(
          "init='pissa' needs a float kernel on the wrapped layer (it writes"
          ' the residual back into it); apply LoRA with PiSSA before'
          ' quantizing, or use the default init'
      )
    ad = self.lora
    g = ad.geometry
    if ad.rank > min(g.matrix_shape):
      raise ValueError(
          f"init='pissa' needs rank <= min(in, out) = {min(g.matrix_shape)}"
          f' of the kernel seen as a matrix {g.matrix_shape}, got'
          f' rank={ad.rank}'
      )
    w = jnp.asarray(kernel[...], jnp.float32)
    u, s, vt = jnp.linalg.svd(g.to_matrix(w), full_matrices=False)
    scale = jnp.asarray(ad.scale[...], jnp.float32)
    scale = jnp.reshape(scale, scale.shape + (1,) * (len(g.batch) + 1))
    root = jnp.sqrt(s[..., :ad.rank] / jnp.abs(scale))
    a = u[..., :, :ad.rank] * root[..., None, :]
    b = (jnp.sign(scale) * root)[..., :, None] * vt[..., :ad.rank, :]
    ad.a[...] = jnp.reshape(a, ad.a.shape).astype(ad.a.dtype)
    ad.b[...] = jnp.reshape(b, ad.b.shape).astype(ad.b.dtype)
    kernel[...] = (w - ad.delta()).astype(kernel.dtype)

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    """`wrapped(x) + lora(x)`, in the wrapped layer's output dtype."""
    y = self.wrapped(x, *args, **kwargs)
    out_sharding = kwargs.get('out_sharding')
    return y + self.lora(x, out_sharding=out_sharding).astype(y.dtype)

  def delta(self) -> jax.Array:
    """`scale * (a @ b)` shaped like the wrapped kernel (float32)."""
    return self.lora.delta()

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

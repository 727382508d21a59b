"""LoRA adapters and wrappers for nnx.Linear, nnx.Einsum, nnx.LinearGeneral.

A wrapper keeps the layer it wraps untouched and adds a low-rank update:

    output = wrapped(x) + scale * (x @ a @ b)

where the product is taken in the wrapped layer's geometry (the contracted
axes of the kernel go to `a`, its output axes to `b`, batch/expert axes of the
kernel stay on both). `a` and `b` are flax's own `nnx.LoRAParam`, so
`nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains only them; `scale` is a
`LoRAScale` variable (data, not a static attribute), so changing it does not
retrace a jitted function.

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
import string
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as _flax_dtypes

from peft import einsum as _einsum

__all__ = [
    'LoRAScale',
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
# argument checks and small helpers
# ---------------------------------------------------------------------------


def _check_rank(rank) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise ValueError(
        f'rank must be a positive int, got rank={rank!r}; pass e.g. rank=8'
    )
  if rank <= 0:
    raise ValueError(
        f'rank must be a positive int, got rank={rank!r}; pass e.g. rank=8'
    )
  return int(rank)


def _scale_value(rank: int, alpha, use_rslora: bool) -> float:
  if alpha is None:
    return 1.0
  try:
    if isinstance(alpha, (bool, str)):
      raise TypeError
    alpha = float(alpha)
  except TypeError:
    raise TypeError(
        f'alpha must be a real number or None, got {type(alpha).__name__}'
    ) from None
  if not math.isfinite(alpha):
    raise ValueError(f'alpha must be finite, got alpha={alpha!r}')
  denom = math.sqrt(rank) if use_rslora else float(rank)
  return float(alpha) / denom


def _as_tuple(x) -> tuple[int, ...]:
  if isinstance(x, (int, np.integer)):
    return (int(x),)
  return tuple(int(d) for d in x)


def _check_leading_shape(leading_shape) -> tuple[int, ...]:
  try:
    shape = tuple(int(d) for d in leading_shape)
  except TypeError:
    raise TypeError(
        'leading_shape must be a tuple of ints (the stacking axes added by'
        f' nnx.vmap), got {leading_shape!r}'
    ) from None
  if any(d <= 0 for d in shape):
    raise ValueError(
        f'leading_shape={shape} must hold positive sizes'
    )
  return shape


def _init_factor(init, key, lead, fan, rank_first, rank, dtype):
  """Runs a 2-D initializer once per stacked/batch slice and reshapes.

  The initializer sees `(fan, rank)` (for `a`) or `(rank, fan)` (for `b`), so
  fan-in based schemes such as he_uniform use the size of one slice only.
  """
  shape2 = (rank, fan) if rank_first else (fan, rank)
  n = int(np.prod(lead, dtype=np.int64)) if lead else 1
  if n == 1:
    value = init(key, shape2, dtype)
    value = jnp.reshape(value, (1,) * len(lead) + shape2) if lead else value
    return jnp.asarray(value)
  keys = jax.random.split(key, n)
  value = jax.vmap(lambda k: init(k, shape2, dtype))(keys)
  return jnp.reshape(value, (*lead, *shape2))


_POOL = ''.join(c for c in string.ascii_letters if c != 'r')


class _Geometry(tp.NamedTuple):
  """Per-layer (unstacked) einsum subscripts of kernel, a and b."""

  kernel: str
  a: str
  b: str
  batch: str
  reduced: str
  out: str
  kernel_shape: tuple[int, ...]


def _make_factor_param(value, names, meta):
  if names is None:
    return nnx.LoRAParam(value)
  kwargs = dict(meta)
  kwargs['out_sharding'] = tuple(names)
  if kwargs.get('mesh') is None:
    kwargs.pop('mesh', None)
    if jax.sharding.get_abstract_mesh().empty:
      mesh = _mesh_of(meta.get('_value'))
      if mesh is not None:
        kwargs['mesh'] = mesh
      else:
        # Nothing to place the array on: keep the names as metadata only.
        kwargs['eager_sharding'] = False
  kwargs.pop('_value', None)
  return nnx.LoRAParam(value, **kwargs)


def _mesh_of(value):
  sharding = getattr(value, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return sharding.mesh
  return None


class _AdapterBase(nnx.Module):
  """Shared state and math of the three adapters (private)."""

  def __treescope_repr__(self, path, subtree_renderer):
    from peft.nnx import visual  # pylint: disable=g-import-not-at-top
    return visual.adapter_treescope_repr(self, path, subtree_renderer)

  def _setup(
      self,
      geometry: _Geometry,
      *,
      rank,
      alpha,
      use_rslora,
      leading_shape,
      a_init,
      b_init,
      dtype,
      param_dtype,
      precision,
      dropout,
      kernel_sharding,
      sharding_meta,
      rngs,
  ):
    rank = _check_rank(rank)
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(
          f'rngs must be an nnx.Rngs, got {type(rngs).__name__}; pass'
          ' rngs=nnx.Rngs(0)'
      )
    if not 0.0 <= float(dropout) < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got dropout={dropout!r}')
    leading_shape = _check_leading_shape(leading_shape)
    if dropout and leading_shape:
      raise ValueError(
          f'dropout={dropout} is not supported on layers stacked by nnx.vmap'
          f' (leading_shape={leading_shape}); its rng state has no stacking'
          ' axis. Wrap inside the vmapped constructor instead, or use'
          ' dropout=0'
      )
    self.rank = rank
    self.alpha = alpha
    self.use_rslora = bool(use_rslora)
    self.leading_shape = leading_shape
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self._geometry = geometry
    size = dict(zip(geometry.kernel, geometry.kernel_shape))
    batch_shape = tuple(size[c] for c in geometry.batch)
    fan_in = int(np.prod([size[c] for c in geometry.reduced], dtype=np.int64))
    fan_out = int(np.prod([size[c] for c in geometry.out], dtype=np.int64))
    lead = leading_shape + batch_shape
    a = _init_factor(a_init, rngs.params(), lead, fan_in, False, rank,
                     param_dtype)
    b = _init_factor(b_init, rngs.params(), lead, fan_out, True, rank,
                     param_dtype)
    a = jnp.reshape(a, (*lead, *(size[c] for c in geometry.reduced), rank))
    b = jnp.reshape(b, (*lead, rank, *(size[c] for c in geometry.out)))
    a_names = b_names = None
    if kernel_sharding is not None:
      names = tuple(kernel_sharding)
      nk = len(geometry.kernel)
      if len(names) == nk:
        names = (None,) * len(leading_shape) + names
      elif len(names) != nk + len(leading_shape):
        raise ValueError(
            f'the wrapped kernel sharding names {names} do not match its'
            f' {nk + len(leading_shape)} axes'
        )
      lead_names = names[: len(leading_shape)]
      by_letter = dict(zip(geometry.kernel, names[len(leading_shape):]))
      a_names = lead_names + tuple(by_letter[c] for c in geometry.a[:-1])
      a_names += (None,)
      b_names = lead_names + tuple(by_letter[c] for c in geometry.batch)
      b_names += (None,) + tuple(by_letter[c] for c in geometry.out)
    meta = dict(sharding_meta or {})
    self.a = _make_factor_param(a, a_names, meta)
    self.b = _make_factor_param(b, b_names, meta)
    # One scale per stacked slice, so nnx.scan / nnx.vmap can slice it.
    self.scale = LoRAScale(
        jnp.full(leading_shape, _scale_value(rank, alpha, use_rslora),
                 jnp.float32)
    )
    if dropout:
      self.dropout = nnx.Dropout(float(dropout), rngs=rngs)
    else:
      self.dropout = nnx.data(None)

  # -- math ------------------------------------------------------------------

  def delta(self) -> jax.Array:
    """`scale * (a @ b)` shaped like the wrapped kernel, in float32."""
    g = self._geometry
    a = jnp.asarray(self.a[...], jnp.float32)
    b = jnp.asarray(self.b[...], jnp.float32)
    d = jnp.einsum(
        f'...{g.a},...{g.b}->...{g.kernel}', a, b,
        precision=jax.lax.Precision.HIGHEST,
    )
    scale = jnp.asarray(self.scale[...], jnp.float32)
    return d * jnp.reshape(scale, scale.shape + (1,) * len(g.kernel))

  def _factors(self, x):
    g = self._geometry
    a = self.a[...]
    if a.ndim != len(g.a):
      raise ValueError(
          f'{type(self).__name__}: a has shape {a.shape} with stacking axes'
          f' {a.shape[: a.ndim - len(g.a)]}; call a layer stacked by'
          ' nnx.vmap inside nnx.scan / nnx.vmap over the stacking axis'
      )
    if self.dropout is not None:
      x = self.dropout(x)
    x, a, b = _flax_dtypes.promote_dtype(
        (x, a, self.b[...]), dtype=self.dtype
    )
    return x, a, b, self.scale[...].astype(x.dtype)


def _linear_geometry(in_features: int, out_features: int) -> _Geometry:
  return _Geometry('io', 'ir', 'ro', '', 'i', 'o',
                   (int(in_features), int(out_features)))


class LoRALinearAdapter(_AdapterBase):
  """The LoRA branch of an `nnx.Linear`: `scale * (x @ a @ b)` only.

  `a` has shape `(*leading_shape, in_features, rank)` and `b`
  `(*leading_shape, rank, out_features)`; `leading_shape` holds stacking axes
  added by `nnx.vmap` (call the adapter per slice, e.g. inside `nnx.scan`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> ad = LoRALinearAdapter(3, 4, rank=2, rngs=nnx.Rngs(0))
    >>> ad(jnp.ones((5, 3))).shape, ad.delta().shape
    ((5, 4), (3, 4))

  Args:
    in_features: input size.
    out_features: output size.
    rank: LoRA rank, a positive int.
    alpha: output scale numerator; `scale = alpha / rank` (`alpha / sqrt(rank)`
      with `use_rslora=True`); `None` means `scale = 1`.
    use_rslora: use rank-stabilised scaling `alpha / sqrt(rank)`.
    leading_shape: stacking axes prepended to `a` and `b`.
    a_init: initializer of `a`, called with the 2-D shape `(in, rank)` of one
      slice (default kaiming/he uniform, fan_in = in_features).
    b_init: initializer of `b`, shape `(rank, out)` per slice (default zeros).
    dtype: compute dtype (default: promote input and params).
    param_dtype: storage dtype of `a` and `b`.
    precision: matmul precision.
    dropout: dropout rate on the adapter input (0 = none).
    kernel_sharding: sharding names of the kernel `(*leading, in, out)`; `a`
      gets `(*leading, in, None)` and `b` `(*leading, None, out)`.
    sharding_meta: extra metadata for the LoRA params (e.g. `mesh`).
    rngs: `nnx.Rngs` for the initializers (and dropout).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
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
    self.in_features = int(in_features)
    self.out_features = int(out_features)
    self._setup(
        _linear_geometry(in_features, out_features), rank=rank, alpha=alpha,
        use_rslora=use_rslora, leading_shape=leading_shape, a_init=a_init,
        b_init=b_init, dtype=dtype, param_dtype=param_dtype,
        precision=precision, dropout=dropout,
        kernel_sharding=kernel_sharding, sharding_meta=sharding_meta,
        rngs=rngs,
    )

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    x, a, b, scale = self._factors(x)
    h = jax.lax.dot_general(
        x, a, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision
    )
    h = h * scale
    return jax.lax.dot_general(
        h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=self.precision,
        out_sharding=out_sharding,
    )


class LoRAEinsumAdapter(_AdapterBase):
  """The LoRA branch of an `nnx.Einsum`: `scale * einsum(x, a, b)` only.

  The decomposition comes from `peft.einsum.lora_einsum`: `a` holds the
  kernel's batch axes, its contracted axes and the rank axis; `b` the batch
  axes, the rank axis and the output axes (e.g. `'ebd,edf->ebf'` gives
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

  The other arguments are those of `LoRALinearAdapter`; the initializers see
  the flattened 2-D shapes `(prod(contracted), rank)` and
  `(rank, prod(output axes))` per batch slice.

  Raises:
    ValueError: for einsum strings `peft.einsum.lora_einsum` rejects.
  """

  def __init__(
      self,
      einsum_str: str,
      kernel_shape: tp.Sequence[int],
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
    rank = _check_rank(rank)
    kernel_shape = _as_tuple(kernel_shape)
    dec = _einsum.lora_einsum(einsum_str, kernel_shape, rank)
    parts = _einsum.parse_einsum_str(einsum_str)
    batch = ''.join(c for c in dec.a_str[:-1] if c in dec.b_str)
    reduced = dec.a_str[len(batch):-1]
    out = dec.b_str[len(batch) + 1:]
    self.einsum_str = ''.join(einsum_str.split())
    self.kernel_shape = kernel_shape
    self.lora_str = dec.lora_str
    geometry = _Geometry(parts.weights, dec.a_str, dec.b_str, batch, reduced,
                         out, kernel_shape)
    self._setup(
        geometry, rank=rank, alpha=alpha, use_rslora=use_rslora,
        leading_shape=leading_shape, a_init=a_init, b_init=b_init,
        dtype=dtype, param_dtype=param_dtype, precision=precision,
        dropout=dropout, kernel_sharding=kernel_sharding,
        sharding_meta=sharding_meta, rngs=rngs,
    )

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    x, a, b, scale = self._factors(x)
    # Scaling `a` costs |a| multiplies, far below either contraction.
    return jnp.einsum(
        self.lora_str, x, a * scale, b, precision=self.precision,
        out_sharding=out_sharding,
    )


def _normalize_axes(axes: tp.Sequence[int], ndim: int) -> tuple[int, ...]:
  return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


class LoRALinearGeneralAdapter(_AdapterBase):
  """The LoRA branch of an `nnx.LinearGeneral`: `scale * (x @ a @ b)` only.

  With `batch_axis` of sizes `B`, `in_features` `I` and `out_features` `O`,
  the kernel is `(*B, *I, *O)`, `a` is `(*B, *I, rank)` and `b`
  `(*B, rank, *O)`; the output has the layout of `nnx.LinearGeneral`:
  batch axes, the input's other axes, then `O`.

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
    axis: int or tuple, the input axes contracted (as in `nnx.LinearGeneral`).
    batch_axis: mapping from leading input axes to sizes shared with the
      kernel (as in `nnx.LinearGeneral`).

  The other arguments are those of `LoRALinearAdapter`; the initializers see
  `(prod(I), rank)` and `(rank, prod(O))` per batch slice.
  """

  def __init__(
      self,
      in_features: int | tp.Sequence[int],
      out_features: int | tp.Sequence[int],
      *,
      axis: int | tp.Sequence[int] = -1,
      batch_axis: tp.Mapping[int, int] = {},  # noqa: B006 (read only)
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
    in_features = _as_tuple(in_features)
    out_features = _as_tuple(out_features)
    axis = _as_tuple(axis)
    if len(in_features) != len(axis):
      raise ValueError(
          f'in_features={in_features} and axis={axis} must have the same'
          ' length'
      )
    batch_axis = {int(k): int(v) for k, v in dict(batch_axis).items()}
    if batch_axis and sorted(batch_axis) != list(range(len(batch_axis))):
      raise ValueError(
          f'batch_axis={batch_axis} must name consecutive leading axes'
          ' 0, 1, ... (as in nnx.LinearGeneral)'
      )
    self.in_features = in_features
    self.out_features = out_features
    self.axis = axis
    self.batch_axis = tuple(sorted(batch_axis.items()))
    nb, ni, no = len(batch_axis), len(in_features), len(out_features)
    letters = _POOL[: nb + ni + no]
    bl, il, ol = letters[:nb], letters[nb:nb + ni], letters[nb + ni:]
    kernel_shape = (*(batch_axis[k] for k in sorted(batch_axis)),
                    *in_features, *out_features)
    geometry = _Geometry(bl + il + ol, bl + il + 'r', bl + 'r' + ol, bl, il,
                         ol, kernel_shape)
    self._setup(
        geometry, rank=rank, alpha=alpha, use_rslora=use_rslora,
        leading_shape=leading_shape, a_init=a_init, b_init=b_init,
        dtype=dtype, param_dtype=param_dtype, precision=precision,
        dropout=dropout, kernel_sharding=kernel_sharding,
        sharding_meta=sharding_meta, rngs=rngs,
    )

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    x, a, b, scale = self._factors(x)
    nb, ni = len(self.batch_axis), len(self.in_features)
    axis = _normalize_axes(self.axis, x.ndim)
    batch_axes = _normalize_axes(tuple(k for k, _ in self.batch_axis),
                                 x.ndim)
    batch_ind = tuple(range(nb))
    h = jax.lax.dot_general(
        x, a, ((axis, tuple(range(nb, nb + ni))), (batch_axes, batch_ind)),
        precision=self.precision,
    )
    h = h * scale
    return jax.lax.dot_general(
        h, b, (((h.ndim - 1,), (nb,)), (batch_ind, batch_ind)),
        precision=self.precision, out_sharding=out_sharding,
    )


# ---------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------

_KINDS = {
    'linear': ('nnx.Linear', 'LoRALinear'),
    'einsum': ('nnx.Einsum', 'LoRAEinsum'),
    'linear_general': ('nnx.LinearGeneral', 'LoRALinearGeneral'),
}


def _kind_of(module) -> str | None:
  if isinstance(module, nnx.Linear):
    return 'linear'
  if isinstance(module, nnx.Einsum):
    return 'einsum'
  if isinstance(module, nnx.LinearGeneral):
    return 'linear_general'
  kind = getattr(type(module), '_peft_kind', None)
  return kind if kind in _KINDS else None


def _check_kind(wrapped, kind: str, wrapper: str):
  got = _kind_of(wrapped)
  if got == kind:
    return
  layer, _ = _KINDS[kind]
  msg = (
      f'{wrapper}(wrapped=...) accepts an {layer} or a quantized layer of'
      f" that geometry (a module with _peft_kind == '{kind}', e.g. the"
      f' SimulateQuantized* / Int4* layers of peft.nnx.quantized); got'
      f' {type(wrapped).__module__}.{type(wrapped).__qualname__}'
  )
  if got is not None:
    msg += f'; for this layer use {_KINDS[got][1]} instead'
  raise TypeError(msg)


def _kernel_variable(wrapped):
  """The float kernel Variable of `wrapped` (or of the layer it wraps)."""
  seen = 0
  module = wrapped
  while module is not None and seen < 8:
    kernel = getattr(module, 'kernel', None)
    if isinstance(kernel, nnx.Variable):
      return kernel
    module = getattr(module, 'wrapped', None)
    seen += 1
  return None


def _kernel_info(wrapped):
  """Returns (shape, dtype, sharding names, sharding metadata)."""
  kernel = _kernel_variable(wrapped)
  if kernel is not None:
    value = kernel.get_value()
    meta = kernel.get_metadata()
    names = meta.get('out_sharding') or None
    extra = {}
    if names is not None:
      if meta.get('mesh') is not None:
        extra['mesh'] = meta['mesh']
      if meta.get('sharding_rules'):
        extra['sharding_rules'] = meta['sharding_rules']
      extra['_value'] = value
    return tuple(value.shape), value.dtype, names, extra
  shape = getattr(wrapped, 'kernel_shape', None)
  if shape is None:
    raise TypeError(
        f'{type(wrapped).__qualname__} has neither a `kernel` variable nor a'
        ' `kernel_shape` attribute; cannot size the LoRA factors'
    )
  dtype = getattr(wrapped, 'param_dtype', None) or jnp.float32
  names, extra = None, {}
  weight = getattr(wrapped, 'weight', None)
  if isinstance(weight, nnx.Variable):
    meta = weight.get_metadata()
    wn = meta.get('kernel_sharding') or meta.get('out_sharding')
    if wn is not None and len(wn) == len(shape):
      names = tuple(wn)
      if meta.get('mesh') is not None:
        extra['mesh'] = meta['mesh']
  return tuple(int(d) for d in shape), dtype, names, extra


def _split_leading(kernel_shape, n_axes: int, what: str):
  if len(kernel_shape) < n_axes:
    raise ValueError(
        f'the wrapped kernel has shape {kernel_shape}, fewer axes than the'
        f' {n_axes} its {what} imply'
    )
  k = len(kernel_shape) - n_axes
  return tuple(kernel_shape[:k]), tuple(kernel_shape[k:])


class _LoRAWrapper(nnx.Module):
  """Shared construction and forward of the three wrappers (private)."""

  def __treescope_repr__(self, path, subtree_renderer):
    from peft.nnx import visual  # pylint: disable=g-import-not-at-top
    return visual.lora_treescope_repr(self, path, subtree_renderer)

  def _wrap(self, wrapped, adapter_cls, adapter_args, leading, names, extra,
            kernel_dtype, *, rank, alpha, use_rslora, a_init, b_init, dtype,
            param_dtype, dropout, init, rngs):
    rank = _check_rank(rank)
    if init not in _INITS:
      raise ValueError(f"init must be one of {_INITS}, got init={init!r}")
    if param_dtype is None:
      param_dtype = kernel_dtype
    if dtype is None:
      dtype = getattr(wrapped, 'dtype', None)
    self.wrapped = wrapped
    self.lora = adapter_cls(
        *adapter_args, rank=rank, alpha=alpha, use_rslora=use_rslora,
        leading_shape=leading, a_init=a_init, b_init=b_init, dtype=dtype,
        param_dtype=param_dtype,
        precision=getattr(wrapped, 'precision', None), dropout=dropout,
        kernel_sharding=names, sharding_meta=extra, rngs=rngs,
    )
    if init == 'pissa':
      self._pissa_init()

  def _pissa_init(self):
    kernel = getattr(self.wrapped, 'kernel', None)
    if not isinstance(kernel, nnx.Variable):
      raise ValueError(
          "init='pissa' needs a float kernel on the wrapped layer (it writes"
          ' the residual back into it); apply LoRA with PiSSA before'
          ' quantizing, or use the default init'
      )
    ad = self.lora
    g = ad._geometry
    w = jnp.asarray(kernel[...], jnp.float32)
    size = dict(zip(g.kernel, g.kernel_shape))
    red = tuple(size[c] for c in g.reduced)
    out = tuple(size[c] for c in g.out)
    if ad.rank > min(int(np.prod(red)), int(np.prod(out))):
      raise ValueError(
          f"init='pissa' needs rank <= min(prod(contracted)={np.prod(red)},"
          f' prod(outputs)={np.prod(out)}), got rank={ad.rank}'
      )
    lead = w.shape[: w.ndim - len(g.kernel)]
    wt = jnp.einsum(f'...{g.kernel}->...{g.batch}{g.reduced}{g.out}', w)
    bshape = lead + tuple(size[c] for c in g.batch)
    mat = jnp.reshape(wt, (*bshape, int(np.prod(red)), int(np.prod(out))))
    u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
    if _scale_value(ad.rank, ad.alpha, ad.use_rslora) == 0:
      raise ValueError("init='pissa' needs a non-zero scale (alpha != 0)")
    scale = jnp.asarray(ad.scale[...], jnp.float32)
    scale = jnp.reshape(scale, scale.shape + (1,) * (len(g.batch) + 1))
    root = jnp.sqrt(s[..., : ad.rank] / jnp.abs(scale))
    a = u[..., :, : ad.rank] * root[..., None, :]
    b = (jnp.sign(scale) * root)[..., :, None] * vt[..., : ad.rank, :]
    ad.a[...] = jnp.reshape(a, ad.a.shape).astype(ad.a.dtype)
    ad.b[...] = jnp.reshape(b, ad.b.shape).astype(ad.b.dtype)
    kernel[...] = (w - ad.delta()).astype(kernel.dtype)

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    y = self.wrapped(x, *args, **kwargs)
    out_sharding = kwargs.get('out_sharding')
    return y + self.lora(x, out_sharding=out_sharding).astype(y.dtype)

  def delta(self) -> jax.Array:
    """`scale * (a @ b)` shaped like the wrapped kernel (float32)."""
    return self.lora.delta()


_WRAPPER_ARGS_DOC = """
  Args:
    wrapped: the layer to adapt; kept unchanged as `self.wrapped` (except with
      `init='pissa'`, which writes the residual into its kernel).
    rank: LoRA rank, a positive int.
    alpha: `scale = alpha / rank` (`alpha / sqrt(rank)` with
      `use_rslora=True`); `None` means `scale = 1`.
    use_rslora: rank-stabilised scaling.
    a_init: initializer of `a` (default he/kaiming uniform over the fan-in of
      one layer slice).
    b_init: initializer of `b` (default zeros: a fresh wrapper changes
      nothing).
    dtype: compute dtype of the adapter (default: the wrapped layer's
      `dtype`, else promotion of input and params).
    param_dtype: storage dtype of `a`, `b` (default: the wrapped kernel's
      dtype, so a bf16 model stays bf16).
    dropout: dropout rate on the adapter input (uses the `dropout` rng stream
      of `rngs`; `model.eval()` switches it off; not for kernels stacked by
      `nnx.vmap`).
    init: `'default'` or `'pissa'`: `a`, `b` from the top-`rank` SVD of the
      kernel and the wrapped kernel replaced IN PLACE by the residual
      `kernel - delta()` (needs a float kernel), so the output is unchanged.
    rngs: `nnx.Rngs` for the initializers.

  Raises:
    TypeError: `wrapped` is not a layer of this geometry.
    ValueError: rank <= 0, unsupported einsum strings, bad `init`.
"""


class LoRALinear(_LoRAWrapper):
  """LoRA around an `nnx.Linear` (or its quantized version).

  Output: `wrapped(x) + lora(x)`.

  A kernel stacked by `nnx.vmap` (shape `(L, in, out)`) gives `a: (L, in, r)`
  and `b: (L, r, out)`; call the layer inside `nnx.scan` over the stack.
  Kernel sharding names `(in_name, out_name)` give `a` `(in_name, None)` and
  `b` `(None, out_name)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = LoRALinear(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rank=2,
    ...                    alpha=4.0, rngs=nnx.Rngs(1))
    >>> layer(jnp.ones((5, 3))).shape, float(layer.lora.scale[...])
    ((5, 4), 2.0)
  """ + _WRAPPER_ARGS_DOC

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
      rngs: nnx.Rngs,
  ):
    _check_kind(wrapped, 'linear', 'LoRALinear')
    shape, kdtype, names, extra = _kernel_info(wrapped)
    leading, per_layer = _split_leading(shape, 2, 'in/out features')
    in_f, out_f = int(wrapped.in_features), int(wrapped.out_features)
    if per_layer != (in_f, out_f):
      raise ValueError(
          f'the wrapped kernel shape {shape} does not end with'
          f' (in_features, out_features) = {(in_f, out_f)}'
      )
    self._wrap(wrapped, LoRALinearAdapter, (in_f, out_f), leading, names,
               extra, kdtype, rank=rank, alpha=alpha, use_rslora=use_rslora,
               a_init=a_init, b_init=b_init, dtype=dtype,
               param_dtype=param_dtype, dropout=dropout, init=init,
               rngs=rngs)


class LoRAEinsum(_LoRAWrapper):
  """LoRA around an `nnx.Einsum` (or its quantized version).

  Output: `wrapped(x) + lora(x)`.

  Any einsum string accepted by `peft.einsum.lora_einsum` works, including
  kernels with batch/expert axes (`'ebd,edf->ebf'`) and ellipsis inputs
  (`'...d,dhk->...hk'`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> base = nnx.Einsum('ebd,edf->ebf', (4, 3, 5), rngs=nnx.Rngs(0))
    >>> layer = LoRAEinsum(base, rank=2, rngs=nnx.Rngs(1))
    >>> layer.lora.a.shape, layer.lora.b.shape
    ((4, 3, 2), (4, 2, 5))
    >>> layer(jnp.ones((4, 6, 3))).shape
    (4, 6, 5)
  """ + _WRAPPER_ARGS_DOC + """
    einsum_str: the einsum string when the wrapped layer has none (it was
      meant to be given at call time).
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
      einsum_str: str | None = None,
      rngs: nnx.Rngs,
  ):
    _check_kind(wrapped, 'einsum', 'LoRAEinsum')
    einsum_str = einsum_str or getattr(wrapped, 'einsum_str', None)
    if einsum_str is None:
      raise ValueError(
          'the wrapped Einsum has no einsum_str (it expects one per call);'
          ' pass einsum_str=... to LoRAEinsum'
      )
    parts = _einsum.parse_einsum_str(einsum_str)
    shape, kdtype, names, extra = _kernel_info(wrapped)
    leading, per_layer = _split_leading(shape, len(parts.weights),
                                        f'einsum weights {parts.weights!r}')
    self.einsum_str = ''.join(einsum_str.split())
    self._wrap(wrapped, LoRAEinsumAdapter, (einsum_str, per_layer), leading,
               names, extra, kdtype, rank=rank, alpha=alpha,
               use_rslora=use_rslora, a_init=a_init, b_init=b_init,
               dtype=dtype, param_dtype=param_dtype, dropout=dropout,
               init=init, rngs=rngs)

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    if args or kwargs.get('einsum_str') is not None:
      es = args[0] if args else kwargs['einsum_str']
      if ''.join(es.split()) != self.einsum_str:
        raise ValueError(
            f'einsum_str={es!r} differs from the one the adapter was built'
            f' for ({self.einsum_str!r})'
        )
    return super().__call__(x, *args, **kwargs)


class LoRALinearGeneral(_LoRAWrapper):
  """LoRA around an `nnx.LinearGeneral` (or its quantized version).

  Output `wrapped(x) + lora(x)`, with `axis` tuples and `batch_axis` handled
  as in `nnx.LinearGeneral`: `a` is `(*batch, *in_features, r)` and `b`
  `(*batch, r, *out_features)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> base = nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1),
    ...                          rngs=nnx.Rngs(0))
    >>> layer = LoRALinearGeneral(base, rank=2, rngs=nnx.Rngs(1))
    >>> layer.lora.a.shape, layer(jnp.ones((7, 2, 3))).shape
    ((2, 3, 2), (7, 4, 5))
  """ + _WRAPPER_ARGS_DOC

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
      rngs: nnx.Rngs,
  ):
    _check_kind(wrapped, 'linear_general', 'LoRALinearGeneral')
    in_f = _as_tuple(wrapped.in_features)
    out_f = _as_tuple(wrapped.out_features)
    axis = _as_tuple(wrapped.axis)
    batch_axis = dict(getattr(wrapped, 'batch_axis', None) or {})
    shape, kdtype, names, extra = _kernel_info(wrapped)
    n_axes = len(batch_axis) + len(in_f) + len(out_f)
    leading, per_layer = _split_leading(shape, n_axes,
                                        'batch_axis/in/out features')
    expected = (*(batch_axis[k] for k in sorted(batch_axis)), *in_f, *out_f)
    if per_layer != expected:
      raise ValueError(
          f'the wrapped kernel shape {shape} does not end with'
          f' (*batch_axis sizes, *in_features, *out_features) = {expected}'
      )

    def adapter(*args, **kw):
      return LoRALinearGeneralAdapter(*args, axis=axis, batch_axis=batch_axis,
                                      **kw)

    self._wrap(wrapped, adapter, (in_f, out_f), leading, names,
               extra, kdtype, rank=rank, alpha=alpha, use_rslora=use_rslora,
               a_init=a_init, b_init=b_init, dtype=dtype,
               param_dtype=param_dtype, dropout=dropout, init=init,
               rngs=rngs)

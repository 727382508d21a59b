"""The LoRA branch of a layer: `scale * einsum(x, a, b)`, in its geometry.

`a` holds the kernel's batch axes, its contracted axes and the rank axis; `b`
the batch axes, the rank axis and the output axes (`peft.geometry`). `a` and
`b` are flax's own `nnx.LoRAParam`; `scale` is a `LoRAScale` variable (data,
not a static attribute), so changing it does not retrace a jitted function.
`LoRALinearAdapter`, `LoRAEinsumAdapter` and `LoRALinearGeneralAdapter` are
`LoRAAdapter` with the geometry built from their arguments.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from peft.nnx.adapter import LoRALinearAdapter
  >>> ad = LoRALinearAdapter(3, 4, rank=2, rngs=nnx.Rngs(0))
  >>> ad.a.shape, ad.b.shape, float(jnp.abs(ad(jnp.ones((1, 3)))).max())
  ((3, 2), (2, 4), 0.0)
"""

from __future__ import annotations

import math
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft.geometry import Geometry

__all__ = [
    'LoRAScale',
    'LoRAAdapter',
    'LoRALinearAdapter',
    'LoRAEinsumAdapter',
    'LoRALinearGeneralAdapter',
    'scale_value',
]

Initializer = tp.Callable[..., jax.Array]

_DEFAULT_A_INIT: Initializer = nnx.initializers.he_uniform()
_DEFAULT_B_INIT: Initializer = nnx.initializers.zeros

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


def _two_step(g: Geometry, ndim: int) -> tuple[str, str, str]:
  """`(h, 'x,a->h', 'h,b->out')` subscripts of the adapter's two matmuls."""
  lora = g.lora_einsum_str(ndim=ndim)
  ins_ab, outs = lora.split('->')
  ins, a_str, b_str = ins_ab.split(',')
  r = a_str[-1]
  h = ''.join(c for c in ins if c not in g.contracted) + r
  return h, f'{ins},{a_str}->{h}', f'{h},{b_str}->{outs}'


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
    # DoRA magnitude per output channel (an nnx.LoRAParam), set by the
    # wrapper, which knows the base kernel (peft.nnx.dora).
    self.magnitude = nnx.data(None)

  def factors(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(x, scale * a, b)`: dropout applied, dtypes promoted.

    The adapter's output is `einsum(lora_einsum_str(x.ndim), *factors(x))`.
    """
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
    return x, a * self.scale[...].astype(a.dtype), b

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    """`scale * einsum(x, a, b)` in the wrapped layer's geometry.

    Two contractions, `x @ a` first (the rank-sized intermediate), as flax's
    `nnx.LoRA` does.
    """
    x, a, b = self.factors(x)
    h_str, x_a, h_b = _two_step(self.geometry, x.ndim)
    h = jnp.einsum(x_a, x, a, precision=self.precision)
    return jnp.einsum(h_b, h, b, precision=self.precision,
                      out_sharding=out_sharding)

  def init_pissa(self, kernel: jax.Array) -> jax.Array:
    """PiSSA: `a`, `b` from the top-`rank` SVD of `kernel`; returns the residual.

    Sets the factors so that `scale * a @ b` is the best rank-`rank`
    approximation of `kernel` (seen as a matrix), and returns
    `kernel - delta()` in float32, which the wrapper writes back into the base
    so that the layer's output is unchanged.

    Raises:
      ValueError: `rank` exceeds the smaller side of the kernel matrix.
    """
    ad = self
    g = ad.geometry
    if ad.rank > min(g.matrix_shape):
      raise ValueError(
          f"init='pissa' needs rank <= min(in, out) = {min(g.matrix_shape)}"
          f' of the kernel seen as a matrix {g.matrix_shape}, got'
          f' rank={ad.rank}'
      )
    w = jnp.asarray(kernel, jnp.float32)
    u, s, vt = jnp.linalg.svd(g.to_matrix(w), full_matrices=False)
    scale = jnp.asarray(ad.scale[...], jnp.float32)
    scale = jnp.reshape(scale, scale.shape + (1,) * (len(g.batch) + 1))
    root = jnp.sqrt(s[..., :ad.rank] / jnp.abs(scale))
    a = u[..., :, :ad.rank] * root[..., None, :]
    b = (jnp.sign(scale) * root)[..., :, None] * vt[..., :ad.rank, :]
    ad.a[...] = jnp.reshape(a, ad.a.shape).astype(ad.a.dtype)
    ad.b[...] = jnp.reshape(b, ad.b.shape).astype(ad.b.dtype)
    return w - ad.delta()


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

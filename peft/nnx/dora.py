"""DoRA: weight-decomposed LoRA, in any layer geometry, without `[in, out]`
temporaries.

DoRA (Liu et al., 2024) writes the adapted kernel as a magnitude times a
direction: per output channel `j` (every batch/output index of the kernel),

    W'_j = m_j * (W_j + s * ΔW_j) / ||W_j + s * ΔW_j||,   ΔW = a @ b,

with the norm over the contracted axes, `m` trainable (initialised to the
norms, so a fresh adapter changes nothing) and the norm treated as a constant
in the gradient (as Hugging Face PEFT does). The layer's output is then
`bias + (m / n) * (x @ W + s * x @ a @ b)`.

The norm is never formed from a full `[in, out]` update: with `W` the base
kernel, `||W_j + sΔW_j||² = ||W_j||² + 2s (Wᵀa)_j · b_j + s² b_jᵀ (aᵀa) b_j`,
whose pieces are `[out, r]` and `[r, r]`. The frozen base's `||W_j||²` is
computed once, when the adapter is made, and stored beside the magnitude in a
non-trainable `DoRABaseNorm` variable; a step computes only the cross term
`Wᵀa` (through the layer's own quantized matmul on a quantized base: QDoRA
never dequantizes the whole kernel) and the `[r, r]` term. After changing the
base kernel yourself, call `refresh_base_norms(model)`.

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from peft.geometry import Geometry
  >>> g = Geometry.linear(6, 4)
  >>> w, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in
  ...            enumerate([(6, 4), (6, 2), (2, 4)]))
  >>> n = column_norm(g, w, a, b, 0.5)
  >>> bool(np.allclose(n, jnp.linalg.norm(w + 0.5 * a @ b, axis=0), atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import math
import string

from flax import nnx
import jax
import jax.numpy as jnp

from peft import kernels
from peft.geometry import Geometry
from peft.nnx import quantized_base as _q
from peft.nnx import registry
from peft.nnx.adapter import _factor_param
from peft.quantization import QArray
from peft.quantization import dequantize
from peft.quantization import storage_names

__all__ = ['DoRABaseNorm', 'column_norm', 'to_output', 'norm_letters',
           'init_magnitude', 'forward', 'delta', 'base_norm_sq',
           'refresh_base_norms']

_HI = jax.lax.Precision.HIGHEST
# Float32 elements of one dequantized block when squaring a quantized kernel
# (1 MiB: the sum of squares runs once, when the adapter is made).
_BLOCK_ELEMENTS = 1 << 18


class DoRABaseNorm(nnx.Variable):
  """`||W_j||²` of the frozen base kernel per output channel (not trained).

  Stored on a DoRA adapter (`layer.lora.base_norm_sq`), sharded like its
  magnitude, so a train step does not recompute it. It is not an
  `nnx.LoRAParam`: `lora_state` and `nnx.Optimizer(..., wrt=nnx.LoRAParam)`
  leave it out. Refresh it with `refresh_base_norms` after changing the base
  kernel.
  """


def norm_letters(g: Geometry) -> str:
  """Subscripts of a per-channel vector: the batch then the output letters."""
  return g.batch + g.output


def column_norm(g: Geometry, w: jax.Array, a: jax.Array, b: jax.Array,
                scale) -> jax.Array:
  """`||W_j + scale * (a @ b)_j||` per output channel, in float32.

  Args:
    g: the layer geometry.
    w: the base kernel (one layer: `g.kernel_shape`).
    a, b: the LoRA factors (one layer).
    scale: the LoRA scale (a scalar).

  Returns:
    An array of shape `(*batch, *output)` (subscripts `norm_letters(g)`).
  """
  w = jnp.asarray(w, jnp.float32)
  wa = jnp.einsum(f'{g.kernel},{g.lora_strs()[0]}->{_wa_letters(g)}', w,
                  jnp.asarray(a, jnp.float32), precision=_HI)
  return _norm(g, _sq_norm(g, w), wa, a, b, scale)


def _wa_letters(g: Geometry) -> str:
  """Subscripts of `Wᵀa`: batch, rank, output."""
  return g.batch + g.rank_letter() + g.output


def _sq_norm(g: Geometry, w: jax.Array) -> jax.Array:
  """`||W_j||²` per channel of one float kernel (subscripts `norm_letters`)."""
  # A fused square-and-reduce: no [in, out] temporary (an einsum of w with
  # itself would transpose a copy of w).
  kept = ''.join(c for c in g.kernel if c not in g.contracted)
  w = jnp.asarray(w, jnp.float32)
  return jnp.einsum(f'{kept}->{norm_letters(g)}',
                    jnp.sum(jnp.square(w), axis=g.contracted_axes))


def _norm(g: Geometry, w_sq, wa, a, b, scale) -> jax.Array:
  """`sqrt(||W_j||² + 2s (Wᵀa)_j·b_j + s² b_jᵀ(aᵀa)b_j)` from its pieces."""
  a_str, b_str = g.lora_strs()
  r = a_str[-1]
  used = set(g.kernel) | set(a_str) | set(b_str)
  r2 = next(c for c in string.ascii_letters if c not in used)
  out = norm_letters(g)
  a, b = (jnp.asarray(t, jnp.float32) for t in (a, b))
  s = jnp.asarray(scale, jnp.float32)
  cross = jnp.einsum(f'{_wa_letters(g)},{b_str}->{out}', wa, b, precision=_HI)
  a2 = a_str.replace(r, r2)
  b2 = b_str.replace(r, r2)
  ata = jnp.einsum(f'{a_str},{a2}->{g.batch}{r}{r2}', a, a, precision=_HI)
  quad = jnp.einsum(f'{b_str},{g.batch}{r}{r2},{b2}->{out}', b, ata, b,
                    precision=_HI)
  return jnp.sqrt(jnp.maximum(w_sq + 2 * s * cross + s * s * quad, 0.0))


def to_output(g: Geometry, v: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a per-channel vector to broadcast against the layer output.

  Examples:
    >>> import jax.numpy as jnp
    >>> to_output(Geometry.linear(3, 4), jnp.arange(4.), 3).shape
    (1, 1, 4)
  """
  _, outs = g.subscripts(ndim)
  letters = ''.join(c for c in outs if c in norm_letters(g))
  moved = jnp.einsum(f'{norm_letters(g)}->{letters}', v)
  size = dict(zip(g.kernel, g.kernel_shape))
  return jnp.reshape(moved, [size[c] if c in letters else 1 for c in outs])


# ---------------------------------------------------------------------------
# DoRA on a `peft.nnx.LoRA` wrapper (its single adapter `layer.lora`)
# ---------------------------------------------------------------------------


def _norms(layer, w: jax.Array) -> jax.Array:
  """`||W + s * a @ b||` per channel of every stacked slice (float32)."""
  ad = layer.lora
  return _per_slice(
      lambda w, a, b, s: column_norm(ad.geometry, w, a, b, s),
      len(ad.leading_shape))(w, ad.a[...], ad.b[...], ad.scale[...])


def _sharded(cls, value, names, meta):
  """A `cls` variable sharded by `names` (as the adapter's factors are)."""
  if names is None:
    return cls(value)
  kwargs = {k: v for k, v in dict(meta or {}).items() if v is not None}
  kwargs['out_sharding'] = tuple(names)
  if 'mesh' not in kwargs and jax.sharding.get_abstract_mesh().empty:
    kwargs['eager_sharding'] = False  # nothing to place on: names only
  return cls(value, **kwargs)


def _quantized_sq_norm(q: QArray, g: Geometry, n_lead: int) -> jax.Array:
  """`||W_j||²` of a quantized kernel, one block of the contracted axis at a
  time (`(*lead, *kept kernel axes)`, float32).

  Generic over the storage: `storage_names` tells which axis of `values` and
  of `scale` runs along the blocked kernel axis; each loop step slices both
  there, dequantizes that block (`peft.quantization.dequantize`) and adds its
  squares. Falls back to one whole dequantization when the storage cannot be
  sliced that way (a layout `storage_names` does not describe).
  """
  shape = kernels.kernel_shape(q)
  contracted = tuple(n_lead + ax for ax in g.contracted_axes)

  def whole():
    return jnp.sum(jnp.square(dequantize(
        dataclasses.replace(q, shape=shape), jnp.float32)), axis=contracted)

  tokens = tuple(f'axis{i}' for i in range(len(shape)))
  ax = max(contracted, key=lambda i: shape[i])
  try:
    v_names, s_names = storage_names(
        q.method, tokens, contracted, group_size=getattr(q, 'group_size', None),
        shape=shape)
  except (TypeError, ValueError):
    return whole()
  tok = tokens[ax]
  if tok not in v_names:
    return whole()
  vi = v_names.index(tok)
  si = s_names.index(tok) if tok in s_names else None
  if si is not None and q.scale.shape[si] == 1:
    si = None  # one scale along the axis: every block uses it
  sizes = [shape[ax], q.values.shape[vi]]
  if si is not None:
    sizes.append(q.scale.shape[si])
  common = math.gcd(*sizes)
  total = math.prod(shape)
  n_blocks = next((d for d in range(1, common + 1) if common % d == 0
                   and total // d <= _BLOCK_ELEMENTS), common)
  block_shape = tuple(d // n_blocks if i == ax else d
                      for i, d in enumerate(shape))
  kept = tuple(d for i, d in enumerate(shape) if i not in contracted)
  vn = q.values.shape[vi] // n_blocks
  sn = None if si is None else q.scale.shape[si] // n_blocks

  def body(i, acc):
    values = jax.lax.dynamic_slice_in_dim(q.values, i * vn, vn, vi)
    scale = q.scale if si is None else jax.lax.dynamic_slice_in_dim(
        q.scale, i * sn, sn, si)
    block = dequantize(dataclasses.replace(
        q, values=values, scale=scale, shape=block_shape), jnp.float32)
    return acc + jnp.sum(jnp.square(block), axis=contracted)

  try:
    return jax.lax.fori_loop(0, n_blocks, body,
                             jnp.zeros(kept, jnp.float32))
  except (TypeError, ValueError):  # storage with more than values / scale
    return whole()


def _to_norm_layout(g: Geometry, kept_sq: jax.Array) -> jax.Array:
  """`(*lead, *kept kernel axes)` -> `(*lead, *batch, *output)`."""
  kept = ''.join(c for c in g.kernel if c not in g.contracted)
  return jnp.einsum(f'...{kept}->...{norm_letters(g)}', kept_sq)


def base_norm_sq(layer) -> jax.Array:
  """`||W_j||²` of the kernel `layer.wrapped` computes with (float32).

  Shaped like the DoRA magnitude (`(*lead, *batch, *output)`). For a float
  base its kernel, for a `SimulateQuantized` base its fake-quantized kernel,
  for a `QuantizedLayer` the quantized storage squared block by block
  (never the whole float kernel at once).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft.nnx as pnnx
    >>> base = nnx.Linear(64, 8, rngs=nnx.Rngs(0))
    >>> layer = pnnx.LoRA(pnnx.QuantizedLayer.from_float(base), rank=2,
    ...                   rngs=nnx.Rngs(1))
    >>> w = layer.wrapped.dequantized_kernel()
    >>> bool(jnp.allclose(base_norm_sq(layer), jnp.sum(w * w, axis=0)))
    True
  """
  g = layer.lora.geometry
  base = _base_operand(layer)
  if isinstance(base, QArray):
    n_lead = len(kernels.kernel_shape(base)) - len(g.kernel)
    fn = jax.jit(_quantized_sq_norm, static_argnums=(1, 2))
    kept_sq = fn(base, g, n_lead)
  else:
    n_lead = base.ndim - len(g.kernel)
    kept_sq = jnp.sum(jnp.square(jnp.asarray(base, jnp.float32)),
                      axis=tuple(n_lead + a for a in g.contracted_axes))
  return _to_norm_layout(g, kept_sq)


def _base_operand(layer):
  """What the cross term multiplies: a `QArray` for a quantized base, else
  the (fake-quantized) float kernel, with any stacking axes."""
  w = layer.wrapped
  if isinstance(w, _q.QuantizedLayer):
    return w.qarray
  if isinstance(w, _q.SimulateQuantized):
    return w.quantized_kernel()
  return getattr(w, registry.layer_type(w).kernel)[...]


def _cross(g: Geometry, base, a: jax.Array, strategy: str = 'auto'):
  """`Wᵀa` of one layer (subscripts `batch, rank, output`), float32.

  `base` is the float kernel or a `QArray`; a `QArray` goes through the
  quantized matmul with `a` as the input (`peft.kernels.quantized_einsum`),
  so the kernel is dequantized one chunk at a time, as in the forward pass.
  """
  a_str = g.lora_strs()[0]
  a = jnp.asarray(a, jnp.float32)
  if isinstance(base, QArray):
    ag = Geometry.from_einsum(f'{a_str},{g.kernel}->{_wa_letters(g)}',
                              g.kernel_shape)
    base = dataclasses.replace(base, shape=kernels.kernel_shape(base))
    return kernels.quantized_einsum(
        a, base, ag, precision=_HI, compute_dtype=jnp.float32,
        preferred_element_type=jnp.float32, strategy=strategy)
  return jnp.einsum(f'{g.kernel},{a_str}->{_wa_letters(g)}',
                    jnp.asarray(base, jnp.float32), a, precision=_HI)


def _layer_cross(layer, a: jax.Array) -> jax.Array:
  """`Wᵀa` with every stacking axis of the layer (`lax.map` over them)."""
  g = layer.lora.geometry
  lead = layer.lora.leading_shape
  strategy = getattr(layer.wrapped, 'strategy', 'auto')
  base = _base_operand(layer)
  if not lead:
    return _cross(g, base, a, strategy)
  n = len(lead)
  flat = lambda t: jnp.reshape(t, (-1,) + t.shape[n:])
  wa = jax.lax.map(lambda args: _cross(g, *args, strategy),
                   (jax.tree.map(flat, base), flat(a)))
  return jnp.reshape(wa, lead + wa.shape[1:])


def _stored_sq_norm(layer) -> jax.Array:
  """The stored `||W_j||²` (or, on an adapter without one, computed)."""
  var = getattr(layer.lora, 'base_norm_sq', None)
  if var is None:
    return base_norm_sq(layer)
  return jnp.asarray(var[...], jnp.float32)


def init_magnitude(layer, kernel_names: tuple | None, meta: dict) -> None:
  """Gives `layer.lora` a magnitude: the column norms of `W + s * a @ b`.

  Also stores `||W_j||²` of the base (`layer.lora.base_norm_sq`, a
  `DoRABaseNorm` sharded like the magnitude). The output of the layer is
  unchanged by it. `kernel_names` are the kernel's sharding names (the
  magnitude keeps those of the batch and output axes); `meta` the mesh /
  sharding rules for the new variables.
  """
  ad = layer.lora
  g = ad.geometry
  w_sq = base_norm_sq(layer)
  lead = len(ad.leading_shape)
  wa = _layer_cross(layer, ad.a[...])
  norm = _per_slice(lambda *t: _norm(g, *t), lead)(
      w_sq, wa, ad.a[...], ad.b[...], ad.scale[...])
  names = None
  if kernel_names is not None:
    by_letter = dict(zip(g.kernel, kernel_names[lead:]))
    names = tuple(kernel_names[:lead]) + tuple(
        by_letter.get(c) for c in norm_letters(g))
  ad.magnitude = _factor_param(norm.astype(ad.param_dtype), names, meta)
  ad.base_norm_sq = _sharded(DoRABaseNorm, w_sq, names, meta)


def refresh_base_norms(model) -> int:
  """Recomputes the stored `||W_j||²` of every DoRA adapter in `model`.

  A DoRA adapter stores its frozen base kernel's squared column norms when
  it is made (`DoRABaseNorm`), so a train step does not recompute them.
  Call this after changing a base kernel yourself (loading other base
  weights into a wrapped model, editing `layer.wrapped.kernel`); the
  library's own surgery (`quantize` / `simulate_quantization` on a wrapped
  model, `init='pissa'`) keeps them current. The magnitudes are left as
  they are (they are trained parameters).

  Args:
    model: an NNX module (or a single `peft.nnx.LoRA` layer).

  Returns:
    The number of adapters refreshed.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft.nnx as pnnx
    >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> pnnx.apply_lora(model, rank=2, dora=True, rngs=nnx.Rngs(1))
    ...                                                 # doctest: +ELLIPSIS
    Sequential(...)
    >>> layer = model.layers[0]
    >>> layer.wrapped.kernel[...] = 2 * layer.wrapped.kernel[...]
    >>> pnnx.refresh_base_norms(model)
    1
    >>> w = layer.wrapped.kernel[...]
    >>> bool(jnp.allclose(layer.lora.base_norm_sq[...],
    ...                   jnp.sum(w * w, axis=0)))
    True
  """
  from peft.nnx import lora as _lora  # pylint: disable=g-import-not-at-top
  count = 0
  for _, node in nnx.iter_graph(model):
    if not isinstance(node, _lora.LoRA) or node.lora.magnitude is None:
      continue
    value = base_norm_sq(node)
    var = getattr(node.lora, 'base_norm_sq', None)
    if isinstance(var, DoRABaseNorm) and var.shape == value.shape:
      var[...] = value
    else:
      node.lora.base_norm_sq = DoRABaseNorm(value)
    count += 1
  return count


def _one_sq_norm(g: Geometry, base) -> jax.Array:
  """`||W_j||²` of one layer's kernel or `QArray` (subscripts
  `norm_letters(g)`)."""
  if isinstance(base, QArray):
    base = dataclasses.replace(base, shape=kernels.kernel_shape(base))
    return _to_norm_layout(g, _quantized_sq_norm(base, g, 0))
  return _sq_norm(g, base)


def adapter_magnitude(ad, base) -> jax.Array:
  """The initial magnitude of adapter `ad` on one layer's `base` (kernel or
  `QArray`): the column norms of `W + s * a @ b`, float32."""
  a, b = ad.a[...], ad.b[...]
  return _norm(ad.geometry, _one_sq_norm(ad.geometry, base),
               _cross(ad.geometry, base, a), a, b, ad.scale[...])


def adapter_forward(ad, x: jax.Array, y: jax.Array, bias, base, *,
                    w_sq: jax.Array | None = None, strategy: str = 'auto',
                    out_sharding=None) -> jax.Array:
  """DoRA output of one adapter: `bias + (m / n) * (y - bias + s x a b)`.

  The core both APIs run (`peft.nnx.LoRA` and the linen wrappers).

  Args:
    ad: a `LoRAAdapter` (one layer's slice) with a `magnitude`.
    x: the layer input; `y` the base layer's output `wrapped(x)`.
    bias: the base layer's bias value, or None.
    base: the base kernel (float) or its `QArray` (quantized base).
    w_sq: the stored `||W_j||²` (None: computed from `base`).
    strategy: the quantized matmul strategy (see `peft.kernels`).
    out_sharding: passed to the adapter's einsum.

  `n` is the DoRA norm, constant in the gradient, from `||W_j||²`, the cross
  term `Wᵀa` and the `[r, r]` term.
  """
  g = ad.geometry
  a_c, b_c = (jax.lax.stop_gradient(t) for t in (ad.a[...], ad.b[...]))
  if w_sq is None:
    w_sq = _one_sq_norm(g, jax.lax.stop_gradient(base))
  norm = jax.lax.stop_gradient(_norm(
      g, w_sq, _cross(g, base, a_c, strategy), a_c, b_c, ad.scale[...]))
  mag = jnp.asarray(ad.magnitude[...], jnp.float32)
  ratio = jnp.where(norm > 0, mag / jnp.where(norm > 0, norm, 1.0), 1.0)
  xi, a, b = ad.factors(x)
  lora = jnp.einsum(g.lora_einsum_str(ndim=xi.ndim), xi, a, b,
                    precision=ad.precision, out_sharding=out_sharding)
  ratio = to_output(g, ratio, xi.ndim).astype(y.dtype)
  if bias is None:
    return ratio * (y + lora.astype(y.dtype))
  bias = jnp.reshape(bias, g.bias_broadcast_shape(xi.ndim)).astype(y.dtype)
  return bias + ratio * (y - bias + lora.astype(y.dtype))


def forward(layer, x: jax.Array, y: jax.Array, out_sharding=None) -> jax.Array:
  """`bias + (m / n) * (y - bias + s * x @ a @ b)`, `y = wrapped(x)`.

  `adapter_forward` with the stored `||W_j||²` of `layer.lora`.
  """
  return adapter_forward(
      layer.lora, x, y, layer.base_bias(), _base_operand(layer),
      w_sq=_stored_sq_norm(layer),
      strategy=getattr(layer.wrapped, 'strategy', 'auto'),
      out_sharding=out_sharding)


def delta(layer) -> jax.Array:
  """`W' - W` shaped like the kernel (float32): what `merge_lora` adds."""
  ad = layer.lora
  w = layer.base_kernel()
  ratio = jnp.asarray(ad.magnitude[...], jnp.float32) / _norms(layer, w)
  return _expand_to_kernel(ad.geometry, ratio) * (w + ad.delta()) - w


def _per_slice(fn, n_lead: int):
  """`fn` mapped over `n_lead` leading stacking axes of every argument."""
  for _ in range(n_lead):
    fn = jax.vmap(fn)
  return fn


def _expand_to_kernel(g: Geometry, v: jax.Array) -> jax.Array:
  """A per-channel vector `(*lead, *batch, *output)` broadcast to the kernel."""
  size = dict(zip(g.kernel, g.kernel_shape))
  letters = norm_letters(g)
  ordered = ''.join(c for c in g.kernel if c in letters)
  moved = jnp.einsum(f'...{letters}->...{ordered}', v)
  lead = v.shape[:v.ndim - len(letters)]
  return jnp.reshape(moved, lead + tuple(
      size[c] if c in letters else 1 for c in g.kernel))


def fold(v: jax.Array, magnitude: jax.Array,
         contracted_axes: tuple[int, ...]) -> jax.Array:
  """The merged DoRA kernel `m * v / ||v||`, `v = W + s * ΔW`.

  The norm runs over `contracted_axes` of `v`; `magnitude` has the shape of
  `v` without them. A channel of norm 0 keeps `v` (as the layer does).

  Examples:
    >>> import jax.numpy as jnp
    >>> fold(jnp.array([[3.0, 0.0], [4.0, 0.0]]), jnp.array([10.0, 1.0]),
    ...      (0,)).tolist()
    [[6.0, 0.0], [8.0, 0.0]]
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=contracted_axes, keepdims=True))
  m = jnp.expand_dims(magnitude, contracted_axes)
  safe = jnp.where(norm > 0, norm, 1.0)
  return jnp.where(norm > 0, m / safe, 1.0) * v

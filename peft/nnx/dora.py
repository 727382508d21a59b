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
whose pieces are `[out, r]` and `[r, r]` (plus one pass over `W`).

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

import string

import jax
import jax.numpy as jnp

from peft.geometry import Geometry
from peft.nnx.adapter import _factor_param

__all__ = ['column_norm', 'to_output', 'norm_letters', 'init_magnitude',
           'forward', 'delta']


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
  hi = jax.lax.Precision.HIGHEST
  a_str, b_str = g.lora_strs()
  r = a_str[-1]
  used = set(g.kernel) | set(a_str) | set(b_str)
  r2 = next(c for c in string.ascii_letters if c not in used)
  out = norm_letters(g)
  w, a, b = (jnp.asarray(t, jnp.float32) for t in (w, a, b))
  s = jnp.asarray(scale, jnp.float32)
  # A fused square-and-reduce: no [in, out] temporary (an einsum of w with
  # itself would transpose a copy of w).
  kept = ''.join(c for c in g.kernel if c not in g.contracted)
  w_sq = jnp.einsum(f'{kept}->{out}',
                    jnp.sum(jnp.square(w), axis=g.contracted_axes))
  wa = jnp.einsum(f'{g.kernel},{a_str}->{g.batch}{r}{g.output}', w, a,
                  precision=hi)
  cross = jnp.einsum(f'{g.batch}{r}{g.output},{b_str}->{out}', wa, b,
                     precision=hi)
  a2 = a_str.replace(r, r2)
  b2 = b_str.replace(r, r2)
  ata = jnp.einsum(f'{a_str},{a2}->{g.batch}{r}{r2}', a, a, precision=hi)
  quad = jnp.einsum(f'{b_str},{g.batch}{r}{r2},{b2}->{out}', b, ata, b,
                    precision=hi)
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


def init_magnitude(layer, kernel_names: tuple | None, meta: dict) -> None:
  """Gives `layer.lora` a magnitude: the column norms of `W + s * a @ b`.

  The output of the layer is unchanged by it. `kernel_names` are the
  kernel's sharding names (the magnitude keeps those of the batch and output
  axes); `meta` the mesh / sharding rules for the new parameter.
  """
  ad = layer.lora
  norm = _norms(layer, layer.base_kernel())
  names = None
  if kernel_names is not None:
    lead = len(ad.leading_shape)
    by_letter = dict(zip(ad.geometry.kernel, kernel_names[lead:]))
    names = tuple(kernel_names[:lead]) + tuple(
        by_letter.get(c) for c in norm_letters(ad.geometry))
  ad.magnitude = _factor_param(norm.astype(ad.param_dtype), names, meta)


def forward(layer, x: jax.Array, y: jax.Array, out_sharding=None) -> jax.Array:
  """`bias + (m / n) * (y - bias + s * x @ a @ b)`, `y = wrapped(x)`.

  `n` is the DoRA norm, constant in the gradient.
  """
  ad = layer.lora
  g = ad.geometry
  norm = jax.lax.stop_gradient(column_norm(
      g, layer.base_kernel(), ad.a[...], ad.b[...], ad.scale[...]))
  mag = jnp.asarray(ad.magnitude[...], jnp.float32)
  ratio = jnp.where(norm > 0, mag / jnp.where(norm > 0, norm, 1.0), 1.0)
  xi, a, b = ad.factors(x)
  lora = jnp.einsum(g.lora_einsum_str(ndim=xi.ndim), xi, a, b,
                    precision=ad.precision, out_sharding=out_sharding)
  ratio = to_output(g, ratio, xi.ndim).astype(y.dtype)
  bias = layer.base_bias()
  if bias is None:
    return ratio * (y + lora.astype(y.dtype))
  bias = jnp.reshape(bias, g.bias_broadcast_shape(xi.ndim)).astype(y.dtype)
  return bias + ratio * (y - bias + lora.astype(y.dtype))


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

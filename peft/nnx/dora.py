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

__all__ = ['column_norm', 'to_output', 'norm_letters']


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

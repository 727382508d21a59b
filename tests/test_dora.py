"""DoRA: output, gradients and merge against a dense reference written here.

Reference (Liu et al. 2024, as Hugging Face PEFT computes it): per output
channel j, W'_j = m_j (W_j + sΔW_j) / ||W_j + sΔW_j|| with the norm a constant
in the gradient; output = x @ W' + bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft.nnx as pnnx
from peft.nnx import dora

_HI = jax.lax.Precision.HIGHEST


def _layers():
  return {
      'linear': (lambda: nnx.Linear(
          16, 8, rngs=nnx.Rngs(0), precision=_HI,
          bias_init=nnx.initializers.normal(1.0)), (2, 5, 16)),
      'einsum': (lambda: nnx.Einsum(
          'btd,dnh->btnh', (16, 2, 4), (2, 4), rngs=nnx.Rngs(0),
          precision=_HI, bias_init=nnx.initializers.normal(1.0)), (2, 5, 16)),
      'experts': (lambda: nnx.Einsum(
          'ebd,edf->ebf', (3, 16, 8), rngs=nnx.Rngs(0), precision=_HI),
          (3, 5, 16)),
  }


def _reference(g, w, a, b, s, m, x, bias):
  """Dense W' and the layer output, in numpy float64."""
  w, a, b, m = (np.asarray(t, np.float64) for t in (w, a, b, m))
  d = np.einsum(g.delta_einsum_str(), a, b)
  mat = g.to_matrix(w + s * d)                       # (*batch, in, out)
  n = np.linalg.norm(mat, axis=-2)                   # (*batch, out)
  mag = m.reshape(n.shape)
  w_new = g.from_matrix(mat * (mag / n)[..., None, :])
  y = np.einsum(g.call_einsum_str(x.ndim), np.asarray(x, np.float64), w_new)
  if bias is not None:
    y = y + np.asarray(bias).reshape(g.bias_broadcast_shape(x.ndim))
  return w_new, y


@pytest.mark.parametrize('kind', list(_layers()))
def test_dora_output_and_merge_match_dense_reference(kind):
  make, x_shape = _layers()[kind]
  base = make()
  w0 = np.asarray(base.kernel[...])
  bias = None if base.bias is None else np.asarray(base.bias[...])
  layer = pnnx.LoRA(base, rank=3, alpha=6.0, dora=True,
                    b_init=nnx.initializers.normal(0.3), rngs=nnx.Rngs(1))
  ad = layer.lora
  x = jax.random.normal(jax.random.key(2), x_shape)
  # a fresh DoRA adapter does not change the output (m = the norms)
  _, y0 = _reference(ad.geometry, w0, ad.a[...], ad.b[...], 2.0,
                     ad.magnitude[...], x, bias)
  np.testing.assert_allclose(layer(x), y0, rtol=1e-5, atol=1e-5)
  ad.magnitude[...] = ad.magnitude[...] * jnp.linspace(
      0.5, 1.5, ad.magnitude.size).reshape(ad.magnitude.shape)
  w_new, y = _reference(ad.geometry, w0, ad.a[...], ad.b[...], 2.0,
                        ad.magnitude[...], x, bias)
  np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.delta(), w_new - w0, rtol=1e-5, atol=1e-5)
  model = nnx.Sequential(layer)
  pnnx.merge_lora(model)
  np.testing.assert_allclose(model.layers[0].kernel[...], w_new, rtol=1e-5,
                             atol=1e-5)


def test_norm_expansion_needs_no_dense_update():
  g = _layers()['experts'][0]()
  layer = pnnx.LoRA(g, rank=2, b_init=nnx.initializers.normal(1.0),
                    rngs=nnx.Rngs(0))
  ad = layer.lora
  w = g.kernel[...]
  dense = jnp.linalg.norm(ad.geometry.to_matrix(w + 0.7 * ad.delta() /
                                                ad.scale[...]), axis=-2)
  got = dora.column_norm(ad.geometry, w, ad.a[...], ad.b[...], 0.7)
  np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-6)


def test_dora_gradients_treat_the_norm_as_constant():
  base = nnx.Linear(6, 4, rngs=nnx.Rngs(0), precision=_HI, use_bias=False)
  layer = pnnx.LoRA(base, rank=2, dora=True,
                    b_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(3), (5, 6))
  w = base.kernel[...]
  ad = layer.lora

  def ref(a, b, m):  # the norm computed from stopped a, b
    n = jnp.linalg.norm(jax.lax.stop_gradient(w + a @ b), axis=0)
    return jnp.sum(jnp.sin(x @ ((w + a @ b) * (m / n))))

  gdef, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)
  got = jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(gdef, p, rest)(x))))(
      lora)
  want = jax.grad(ref, argnums=(0, 1, 2))(ad.a[...], ad.b[...],
                                          ad.magnitude[...])
  for name, exp in zip(('a', 'b', 'magnitude'), want):
    np.testing.assert_allclose(got['lora'][name][...], exp, rtol=1e-5,
                               atol=1e-6)


def test_apply_lora_dora_trains_only_lora_params():
  model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), jax.nn.relu,
                         nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
  pnnx.apply_lora(model, rank=2, dora=True, rngs=nnx.Rngs(2))
  state = pnnx.lora_state(model)
  names = sorted({p[-1] for p, _ in nnx.to_flat_state(state)})
  assert names == ['a', 'b', 'magnitude']
  # a, b of both layers plus one magnitude per output channel
  assert pnnx.summary(model).trainable == (8 * 2 + 2 * 8) + (8 * 2 + 2 * 4) + (
      8 + 4)
  from peft.nnx import visual
  assert 'dora' in visual.describe(model.layers[0])

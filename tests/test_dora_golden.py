"""DoRA against Hugging Face PEFT: outputs and gradients within 1e-5.

The golden file was made by real PEFT (`tests/fixtures/make_dora.py`, the
versions are stored in it) for two `nn.Linear` layers with
`use_dora=True, init_lora_weights=False` and perturbed magnitudes.
A PyTorch `[out, in]` weight is a JAX `[in, out]` kernel: `a = lora_Aᵀ`,
`b = lora_Bᵀ`, the magnitude vector is per output feature in both.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft.nnx as pnnx

_GOLDEN = pathlib.Path(__file__).with_name('fixtures') / 'dora_golden.npz'


@pytest.mark.parametrize('name', ['fc1', 'fc2'])
def test_dora_matches_peft(name):
  g = np.load(_GOLDEN)
  w = g[f'{name}/weight']
  bias = g.get(f'{name}/bias') if f'{name}/bias' in g.files else None
  out_f, in_f = w.shape
  base = nnx.Linear(in_f, out_f, use_bias=bias is not None, rngs=nnx.Rngs(0),
                    precision=jax.lax.Precision.HIGHEST)
  base.kernel[...] = jnp.asarray(w.T)
  if bias is not None:
    base.bias[...] = jnp.asarray(bias)
  r = g[f'{name}/lora_A'].shape[0]
  scaling = float(g[f'{name}/scaling'])
  layer = pnnx.LoRALinear(base, rank=r, alpha=scaling * r, dora=True,
                          rngs=nnx.Rngs(1))
  layer.lora.a[...] = jnp.asarray(g[f'{name}/lora_A'].T)
  layer.lora.b[...] = jnp.asarray(g[f'{name}/lora_B'].T)
  layer.lora.magnitude[...] = jnp.asarray(g[f'{name}/magnitude'])
  x = jnp.asarray(g[f'{name}/x'])
  np.testing.assert_allclose(layer(x), g[f'{name}/y'], rtol=1e-5, atol=1e-5)

  gdef, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)
  grads = jax.grad(
      lambda p: jnp.sum(jnp.sin(nnx.merge(gdef, p, rest)(x))))(lora)
  np.testing.assert_allclose(grads['lora']['a'][...], g[f'{name}/grad_A'].T,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads['lora']['b'][...], g[f'{name}/grad_B'].T,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads['lora']['magnitude'][...],
                             g[f'{name}/grad_magnitude'], rtol=1e-5,
                             atol=1e-5)

"""linen DoRA (`LoRADense/LoRAEinsum/LoRADenseGeneral(..., dora=True)`).

Checked against the NNX DoRA wrapper with the same params (the linen modules
run the same core, `peft.nnx.dora`) and against the golden file made by
Hugging Face PEFT (`tests/fixtures/make_dora.py`).
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft
import peft.nnx as pnnx

_HI = jax.lax.Precision.HIGHEST
_GOLDEN = pathlib.Path(__file__).with_name('fixtures') / 'dora_golden.npz'


def _cases():
  return {
      'dense': (lambda: nn.Dense(8, precision=_HI,
                                 bias_init=nn.initializers.normal(1.0)),
                peft.LoRADense,
                lambda p: nnx.Linear(16, 8, rngs=nnx.Rngs(0), precision=_HI),
                (5, 16)),
      'einsum': (lambda: nn.Einsum((16, 2, 4), 'btd,dnh->btnh', precision=_HI,
                                   bias_init=nn.initializers.normal(1.0)),
                 peft.LoRAEinsum,
                 lambda p: nnx.Einsum('btd,dnh->btnh', (16, 2, 4), (2, 4),
                                      rngs=nnx.Rngs(0), precision=_HI),
                 (2, 5, 16)),
      'dense_general': (lambda: nn.DenseGeneral((2, 4), axis=(-2, -1),
                                                precision=_HI),
                        peft.LoRADenseGeneral,
                        lambda p: nnx.LinearGeneral(
                            (4, 4), (2, 4), axis=(-2, -1), rngs=nnx.Rngs(0),
                            precision=_HI),
                        (3, 4, 4)),
  }


@pytest.mark.parametrize('kind', list(_cases()))
def test_linen_dora_equals_the_nnx_dora_layer(kind):
  make_linen, wrapper, make_nnx, x_shape = _cases()[kind]
  x = jax.random.normal(jax.random.key(0), x_shape)
  layer = wrapper(rank=3, alpha=6.0, wrapped=make_linen(), dora=True,
                  b_init=nn.initializers.normal(0.3))
  params = layer.init(jax.random.key(1), x)['params']
  lora = params['lora']
  assert sorted(lora) == ['a', 'b', 'magnitude']
  # a fresh DoRA layer (m = the column norms) computes what LoRA computes
  plain = wrapper(rank=3, alpha=6.0, wrapped=make_linen())
  lora_params = {**params, 'lora': {'a': lora['a'], 'b': lora['b']}}
  np.testing.assert_allclose(layer.apply({'params': params}, x),
                             plain.apply({'params': lora_params}, x),
                             rtol=1e-5, atol=1e-5)
  params['lora']['magnitude'] = lora['magnitude'] * jnp.linspace(
      0.5, 1.5, lora['magnitude'].size).reshape(lora['magnitude'].shape)

  base = make_nnx(params)
  base.kernel[...] = params['kernel']
  if 'bias' in params:
    base.bias[...] = params['bias']
  ref = pnnx.LoRA(base, rank=3, alpha=6.0, dora=True, rngs=nnx.Rngs(0))
  for name in ('a', 'b', 'magnitude'):
    getattr(ref.lora, name)[...] = params['lora'][name]

  np.testing.assert_allclose(layer.apply({'params': params}, x), ref(x),
                             rtol=1e-5, atol=1e-5)
  loss = lambda p: jnp.sum(jnp.sin(layer.apply({'params': p}, x)))
  got = jax.grad(loss)(params)['lora']
  gdef, state, rest = nnx.split(ref, nnx.LoRAParam, ...)
  want = jax.grad(
      lambda s: jnp.sum(jnp.sin(nnx.merge(gdef, s, rest)(x))))(state)
  for name in ('a', 'b', 'magnitude'):
    np.testing.assert_allclose(got[name], want['lora'][name][...],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['fc1', 'fc2'])
def test_linen_dora_matches_peft(name):
  g = np.load(_GOLDEN)
  w = g[f'{name}/weight']
  has_bias = f'{name}/bias' in g.files
  r = g[f'{name}/lora_A'].shape[0]
  scaling = float(g[f'{name}/scaling'])
  layer = peft.LoRADense(
      rank=r, alpha=scaling * r, dora=True,
      wrapped=nn.Dense(w.shape[0], use_bias=has_bias, precision=_HI))
  params = {'kernel': jnp.asarray(w.T),
            'lora': {'a': jnp.asarray(g[f'{name}/lora_A'].T),
                     'b': jnp.asarray(g[f'{name}/lora_B'].T),
                     'magnitude': jnp.asarray(g[f'{name}/magnitude'])}}
  if has_bias:
    params['bias'] = jnp.asarray(g[f'{name}/bias'])
  x = jnp.asarray(g[f'{name}/x'])
  np.testing.assert_allclose(layer.apply({'params': params}, x),
                             g[f'{name}/y'], rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(
      layer.apply({'params': p}, x))))(params)['lora']
  np.testing.assert_allclose(grads['a'], g[f'{name}/grad_A'].T, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(grads['b'], g[f'{name}/grad_B'].T, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(grads['magnitude'], g[f'{name}/grad_magnitude'],
                             rtol=1e-5, atol=1e-5)


def test_module_interceptor_makes_dora_wrappers_and_split_keeps_magnitude():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jax.nn.relu(nn.Dense(8)(x))
      return nn.Dense(4)(h)

  def to_dora(module):
    if isinstance(module, nn.Dense):
      return peft.LoRADense(rank=2, wrapped=module, dora=True)
    return module

  x = jnp.ones((2, 6))
  with peft.ModuleInterceptor(to_dora):
    params = MLP().init(jax.random.key(0), x)['params']
  original, lora = peft.split_params(params)
  assert jax.tree.map(jnp.shape, lora) == {
      'Dense_0': {'lora': {'a': (6, 2), 'b': (2, 8), 'magnitude': (8,)}},
      'Dense_1': {'lora': {'a': (8, 2), 'b': (2, 4), 'magnitude': (4,)}}}
  merged = peft.merge_params(original, lora)
  with peft.ModuleInterceptor(to_dora):
    y = MLP().apply({'params': merged}, x)
  np.testing.assert_allclose(y, MLP().apply({'params': original}, x),
                             rtol=1e-5, atol=1e-5)  # fresh: no change
  del lora['Dense_0']['lora']['magnitude']
  with pytest.raises(ValueError, match='magnitude'):
    with peft.ModuleInterceptor(to_dora):
      MLP().apply({'params': peft.merge_params(original, lora)}, x)


def test_linen_dora_bad_input():
  with pytest.raises(TypeError, match='dora'):
    peft.LoRADense(rank=2, wrapped=nn.Dense(3), dora='yes').init(
        jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match='QDoRA'):
    peft.LoRADense(rank=2, wrapped=peft.Int4Dense(wrapped=nn.Dense(32)),
                   dora=True).init(jax.random.key(0), jnp.ones((1, 32)))


@pytest.mark.parametrize('kind', list(_cases()))
def test_fuse_params_folds_linen_dora(kind):
  """`fuse_params` on DoRA params: the plain layer with the fused kernel
  computes what the DoRA layer computes (after the magnitude has trained)."""
  make_linen, wrapper, _, x_shape = _cases()[kind]
  x = jax.random.normal(jax.random.key(0), x_shape)
  layer = wrapper(rank=3, alpha=6.0, wrapped=make_linen(), dora=True,
                  b_init=nn.initializers.normal(0.3))
  params = layer.init(jax.random.key(1), x)['params']
  m = params['lora']['magnitude']
  params = {**params, 'lora': {**params['lora'], 'magnitude': m * jnp.linspace(
      0.5, 1.5, m.size).reshape(m.shape)}}
  fused = peft.fuse_params(params, scale=2.0)  # alpha / rank
  assert 'lora' not in fused
  np.testing.assert_allclose(make_linen().apply({'params': fused}, x),
                             layer.apply({'params': params}, x),
                             rtol=2e-5, atol=2e-5)


def test_dora_branches_are_refused_by_unfuse_params():
  layer = peft.LoRADense(rank=2, wrapped=nn.Dense(4), dora=True)
  params = layer.init(jax.random.key(1), jnp.ones((1, 3)))['params']
  fused = peft.fuse_params(params)
  _, lora = peft.split_params(params)
  with pytest.raises(ValueError, match='DoRA branch cannot be unfused'):
    peft.unfuse_params(fused, lora)

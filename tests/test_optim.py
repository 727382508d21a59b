"""LoRA+ (peft.optim.lora_plus): the first step's update ratio b / a."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft
import peft.nnx as pnnx
from peft.optim import lora_plus


def _model():
  model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), jax.nn.tanh,
                         nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
  return pnnx.apply_lora(model, rank=2, b_init=nnx.initializers.normal(0.1),
                         rngs=nnx.Rngs(2))


def _loss(m):
  x = jnp.linspace(-1, 1, 40).reshape(5, 8)
  return jnp.sum(m(x) ** 2)


@pytest.mark.parametrize('factory,ratio', [(optax.sgd, 16.0),
                                           (optax.adam, 4.0)])
def test_nnx_first_step_update_ratio(factory, ratio):
  model = _model()
  before = jax.tree.map(lambda v: np.array(v), nnx.state(model, nnx.LoRAParam))
  opt = nnx.Optimizer(model, lora_plus(factory, 1e-2, ratio=ratio),
                      wrt=nnx.LoRAParam)
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  grads = jax.grad(lambda p: _loss(nnx.merge(gdef, p, rest)))(lora)
  opt.update(model, grads)
  after = nnx.state(model, nnx.LoRAParam)
  for path, var in nnx.to_flat_state(after):
    old = dict(nnx.to_flat_state(before))[path].get_value()
    step = np.asarray(var.get_value()) - old
    g = np.asarray(dict(nnx.to_flat_state(grads))[path].get_value())
    lr = 1e-2 * (ratio if path[-1] == 'b' else 1.0)
    if factory is optax.sgd:
      np.testing.assert_allclose(step, -lr * g, rtol=1e-4, atol=1e-7)
    else:  # Adam's first step is -lr * sign(g) (up to eps)
      np.testing.assert_allclose(step, -lr * np.sign(g), rtol=1e-3,
                                 atol=1e-6)


def test_linen_tree_and_schedule():
  params = {'Dense_0': {'kernel': jnp.ones((2, 2)),
                        'lora': {'a': jnp.ones((2, 1)), 'b': jnp.ones((1, 2))}}}
  _, lora = peft.split_params(params)
  tx = lora_plus(optax.sgd, optax.constant_schedule(0.5), ratio=3.0)
  updates, _ = tx.update(lora, tx.init(lora), lora)
  assert float(updates['Dense_0']['lora']['a'][0, 0]) == -0.5
  assert float(updates['Dense_0']['lora']['b'][0, 0]) == -1.5


def test_bad_arguments():
  with pytest.raises(ValueError, match='ratio'):
    lora_plus(optax.sgd, 0.1, ratio=0.0)
  with pytest.raises(TypeError, match='ratio'):
    lora_plus(optax.sgd, 0.1, ratio='16')
  with pytest.raises(TypeError, match='optimizer_factory'):
    lora_plus('adam', 0.1)

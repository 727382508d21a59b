"""peft.nnx.registry: custom layer types through every surgery operation.

References are computed here: the custom layer's own forward with the
kernel replaced by `kernel + a @ b` (dense), `simulate_quantize` of the
kernel, and the merged kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft
import peft.nnx as pnnx
from peft.geometry import Geometry
from peft.nnx import registry

_HI = jax.lax.Precision.HIGHEST


class Proj(nnx.Module):
  """A user's layer: `einsum('btd,dnh->btnh', x, w) + c`, attribute names
  unlike flax's (kernel `w`, bias `c`)."""

  def __init__(self, d, n, h, *, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (d, n, h)) / d**0.5)
    self.c = nnx.Param(jax.random.normal(rngs.params(), (n, h)))

  def __call__(self, x):
    return jnp.einsum('btd,dnh->btnh', x, self.w[...], precision=_HI) + self.c[...]


class Unregistered(nnx.Module):

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 8)))

  def __call__(self, x):
    return x @ self.w[...]


class Model(nnx.Module):

  def __init__(self, rngs):
    self.q_proj = Proj(32, 2, 16, rngs=rngs)
    self.other = Unregistered(rngs)
    self.out = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    y = self.q_proj(x)
    return self.out(y.reshape(*y.shape[:-2], -1))


@pytest.fixture(autouse=True, scope='module')
def _register():
  registry.register_layer(
      Proj, geometry=lambda m: Geometry.from_einsum(
          'btd,dnh->btnh', m.w.shape[-3:], bias_shape=m.c.shape),
      kernel='w', bias='c')
  yield
  registry._REGISTRY.pop(Proj, None)  # pylint: disable=protected-access


def _x():
  return jax.random.normal(jax.random.key(9), (2, 3, 32))


def test_apply_lora_on_custom_layer_matches_dense_reference():
  model = Model(nnx.Rngs(0))
  w0 = np.asarray(model.q_proj.w[...])
  pnnx.apply_lora(model, rank=3, alpha=6.0, where='q_proj',
                  rngs=nnx.Rngs(1))
  layer = model.q_proj
  assert type(layer) is pnnx.LoRA
  assert layer.lora.a.shape == (32, 3) and layer.lora.b.shape == (3, 2, 16)
  layer.lora.b[...] = jax.random.normal(jax.random.key(2), (3, 2, 16))
  delta = np.einsum('dr,rnh->dnh', layer.lora.a[...], layer.lora.b[...]) * 2.0
  ref = np.einsum('btd,dnh->btnh', _x(), w0 + delta) + np.asarray(
      layer.wrapped.c[...])
  np.testing.assert_allclose(layer(_x()), ref, rtol=2e-5, atol=2e-5)
  # merge folds it back into `w`
  pnnx.merge_lora(model, where='q_proj')
  assert type(model.q_proj) is Proj
  np.testing.assert_allclose(model.q_proj.w[...], w0 + delta, rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize('method', ['int4', 'q4_0'])
def test_simulate_and_quantize_custom_layer(method):
  model = Model(nnx.Rngs(0))
  w = model.q_proj.w[...]
  c = np.asarray(model.q_proj.c[...])
  fake = peft.simulate_quantize(w, method, axis_to_reduce=(0,)) if (
      method == 'int4') else peft.simulate_quantize(w, method)
  ref = np.einsum('btd,dnh->btnh', _x(), fake) + c
  sim = pnnx.simulate_quantization(Model(nnx.Rngs(0)), method=method,
                                   where='q_proj')
  np.testing.assert_allclose(sim.q_proj(_x()), ref, rtol=2e-5, atol=2e-5)
  real = pnnx.quantize(Model(nnx.Rngs(0)), method=method, where='q_proj')
  np.testing.assert_allclose(real.q_proj(_x()), ref, rtol=2e-5, atol=2e-5)


def test_where_matching_an_unregistered_layer_is_an_error():
  model = Model(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'other: .*Unregistered[\s\S]*'
                     'register_layer'):
    pnnx.apply_lora(model, rank=2, where='.*', rngs=nnx.Rngs(1))
  # default (every supported layer) does not complain
  pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
  assert isinstance(model.q_proj, pnnx.LoRA)
  assert isinstance(model.out, pnnx.LoRALinear)
  assert type(model.other) is Unregistered


def test_lookup_covers_subclasses_and_bad_registrations():
  class Sub(Proj):
    pass
  assert registry.layer_type(Sub) is registry.layer_type(Proj)
  assert registry.layer_type(Unregistered) is None
  with pytest.raises(TypeError, match='layer_type must be a class'):
    registry.register_layer('Proj', geometry=lambda m: None)
  with pytest.raises(TypeError, match='geometry must be a callable'):
    registry.register_layer(Proj, geometry=3)
  with pytest.raises(TypeError, match='register_layer'):
    registry.geometry_of(Unregistered(nnx.Rngs(0)))


def test_flax_layers_forward_with_kernel_equals_flax():
  x = jax.random.normal(jax.random.key(0), (3, 8))
  for layer in (nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
                nnx.Einsum('bd,dnh->bnh', (8, 2, 3), (2, 3), rngs=nnx.Rngs(0)),
                nnx.LinearGeneral(8, (2, 3), rngs=nnx.Rngs(0))):
    entry = registry.layer_type(layer)
    np.testing.assert_array_equal(
        entry.forward(layer, x, layer.kernel[...]), layer(x))

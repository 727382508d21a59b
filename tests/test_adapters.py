"""Several named adapters: switching, disabling, deleting, combining, routing.

References: the same model with one adapter active, a dense numpy
`x @ (W + s a b)`, the base model itself (bit equality), and numpy SVDs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft.nnx as pnnx

_HI = jax.lax.Precision.HIGHEST


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs, precision=_HI)
    self.down = nnx.Einsum('btf,fd->btd', (32, 16), rngs=rngs, precision=_HI)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def _model(ranks=(('a', 2), ('b', 4), ('c', 3))):
  model = MLP(nnx.Rngs(0))
  for i, (name, r) in enumerate(ranks):
    pnnx.apply_lora(model, rank=r, alpha=2.0 * r, name=name,
                    b_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(i + 1))
  return model


def _x(b=6):
  return jax.random.normal(jax.random.key(7), (b, 3, 16))


def _only(model, name):
  m = nnx.clone(model)
  pnnx.set_active_adapters(m, name)
  return m


def test_names_and_clash():
  model = _model()
  assert pnnx.list_adapters(model) == ['a', 'b', 'c']
  assert model.up.adapter_names == ('a', 'b', 'c')
  with pytest.raises(ValueError, match="named 'a'"):
    pnnx.apply_lora(model, rank=2, name='a', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='not adapters of this model'):
    pnnx.set_active_adapters(model, ['zz'])
  with pytest.raises(TypeError, match='name must be'):
    pnnx.apply_lora(model, rank=2, name=3, rngs=nnx.Rngs(0))


def test_single_adapter_equals_dense_reference():
  model = _model()
  pnnx.set_active_adapters(model, 'b')
  up = model.up
  ad = up.adapter('b')
  w = up.wrapped.kernel[...] + 2.0 * ad.a[...] @ ad.b[...]
  h = jnp.einsum('btd,df->btf', _x(), w, precision=_HI) + up.wrapped.bias[...]
  np.testing.assert_allclose(up(_x()), h, rtol=1e-5, atol=1e-5)


def test_weighted_sum_of_adapters():
  model = _model()
  pnnx.set_active_adapters(model, {'a': 0.25, 'c': 2.0})
  up = model.up
  base = up.wrapped(_x())
  ya = _only(model, 'a').up(_x()) - base
  yc = _only(model, 'c').up(_x()) - base
  np.testing.assert_allclose(up(_x()), base + 0.25 * ya + 2.0 * yc,
                             rtol=1e-5, atol=1e-5)


def test_disable_is_bit_equal_to_base():
  model = _model()
  pnnx.set_active_adapters(model, ['a', 'b'])
  ref = MLP(nnx.Rngs(0))  # the same base weights
  with pnnx.disable_adapters(model):
    np.testing.assert_array_equal(model(_x()), ref(_x()))
  assert not np.array_equal(model(_x()), ref(_x()))


def test_switching_does_not_retrace():
  model = _model()
  traces = []

  @nnx.jit
  def run(m, x):
    traces.append(1)
    return m(x)

  pnnx.set_active_adapters(model, 'a')
  y_a = run(model, _x())
  pnnx.set_active_adapters(model, {'b': 0.5, 'c': 1.0})
  y_bc = run(model, _x())
  pnnx.set_active_adapters(model, [])
  run(model, _x())
  assert len(traces) == 1
  np.testing.assert_allclose(y_a, _only(model, 'a')(_x()), rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(y_a, y_bc)
  pnnx.set_adapter_ids(model, jnp.array([0, 1, 2, -1, 0, 1]))
  run(model, _x())
  pnnx.set_adapter_ids(model, jnp.array([2, 2, 1, 0, -1, -1]))
  run(model, _x())
  assert len(traces) == 2  # one more for the per-example layout


def test_per_example_routing_matches_single_adapter_models():
  model = _model()
  ids = np.array([0, 2, -1, 1, 1, 0])
  pnnx.set_adapter_ids(model, ids)
  y = model(_x())
  names = pnnx.list_adapters(model)
  for i, k in enumerate(ids):
    if k < 0:
      ref_model = nnx.clone(model)
      pnnx.set_active_adapters(ref_model, [])
    else:
      ref_model = _only(model, names[k])
    ref = ref_model(_x())[i]
    np.testing.assert_allclose(y[i], ref, rtol=1e-6, atol=1e-6)


def test_per_example_ids_traced_inside_jit():
  model = _model()

  @nnx.jit
  def run(m, x, ids):
    pnnx.set_adapter_ids(m, ids)
    return m(x)

  ids = jnp.array([1, 0, 2, -1, 2, 1])
  y = run(model, _x(), ids)
  pnnx.set_adapter_ids(model, ids)
  np.testing.assert_allclose(y, model(_x()), rtol=1e-6, atol=1e-6)


def test_gradients_reach_only_the_routed_adapters():
  model = _model()
  pnnx.set_adapter_ids(model, jnp.array([0, 0, -1, 2, 0, -1]))  # 'b' unused
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(lora):
    return jnp.sum(nnx.merge(gdef, lora, rest)(_x()) ** 2)

  g = nnx.state(nnx.merge(gdef, jax.grad(loss)(lora), rest), nnx.LoRAParam)
  flat = {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(g)}
  assert len(flat) == 12
  for path, v in flat.items():
    norm = float(jnp.abs(v.get_value()).sum())
    if '/adapters/b/' in f'/{path}/':  # adapter 'b' routed to no example
      assert norm == 0.0, path
    else:
      assert norm > 0, path


def test_delete_adapter_and_unwrap():
  model = _model()
  pnnx.delete_adapter(model, 'a')
  assert model.up.adapter_names == ('b', 'c')
  assert model.up.lora is model.up.adapter('b')
  pnnx.delete_adapter(model, 'b')
  pnnx.delete_adapter(model, 'c')
  assert type(model.up) is nnx.Linear and type(model.down) is nnx.Einsum
  np.testing.assert_array_equal(model(_x()), MLP(nnx.Rngs(0))(_x()))


@pytest.mark.parametrize('how', ['cat', 'linear', 'svd'])
def test_combine_adapters(how):
  ranks = (('a', 2), ('b', 2), ('c', 3))
  model = _model(ranks)
  weights = {'a': 0.5, 'b': 1.5}
  errors = pnnx.combine_adapters(model, weights, 'ab', how=how,
                                 rank=4 if how == 'svd' else None)
  up = model.up
  exact = 0.5 * up.adapter('a').delta() + 1.5 * up.adapter('b').delta()
  got = up.adapter('ab').delta()
  rel = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
  np.testing.assert_allclose(errors['up'], rel, rtol=1e-4, atol=1e-6)
  if how == 'cat':
    assert rel < 1e-6 and up.adapter('ab').rank == 4
  if how == 'svd':  # rank 4 >= rank of the sum (2 + 2): exact up to rounding
    assert rel < 1e-5
    s = np.linalg.svd(np.asarray(exact), compute_uv=False)
    errors3 = pnnx.combine_adapters(model, weights, 'ab3', how='svd', rank=3)
    np.testing.assert_allclose(errors3['up'], s[3] / np.linalg.norm(s),
                               rtol=1e-3)
  if how == 'linear':
    with pytest.raises(ValueError, match='equal ranks'):
      pnnx.combine_adapters(model, {'a': 1.0, 'c': 1.0}, 'ac', how='linear')
  pnnx.set_active_adapters(model, 'ab')
  y = model.up(_x())
  w = up.wrapped.kernel[...] + got
  np.testing.assert_allclose(
      y, jnp.einsum('btd,df->btf', _x(), w, precision=_HI)
      + up.wrapped.bias[...], rtol=1e-5, atol=1e-5)


def test_lora_state_by_name():
  model = _model()
  state = pnnx.lora_state(model, 'b')
  leaves = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
  assert leaves == {'up/adapters/b/a', 'up/adapters/b/b',
                    'down/adapters/b/a', 'down/adapters/b/b'}
  first = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(
      pnnx.lora_state(model, 'a'))}
  assert first == {'up/lora/a', 'up/lora/b', 'down/lora/a', 'down/lora/b'}


@pytest.mark.parametrize('path', ['dense', 'gather'])
def test_per_example_paths_match_single_adapter_models(path, monkeypatch):
  """Both formulations (dense masked, rank-padded gather) are exact."""
  from peft.nnx import routing  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(routing, '_FLOPS_PER_FLOAT_MOVED',
                      float('inf') if path == 'dense' else 0)
  test_per_example_routing_matches_single_adapter_models()

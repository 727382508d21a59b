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


def _force(monkeypatch, path):
  """Makes `per_example` take `path` and records the paths it took."""
  from peft.nnx import routing  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(routing, '_FLOPS_PER_FLOAT_MOVED',
                      float('inf') if path == 'dense' else 0)
  taken = []
  for name in ('dense', 'gather'):
    fn = getattr(routing, f'_{name}')
    monkeypatch.setattr(routing, f'_{name}', lambda *a, fn=fn, name=name: (
        taken.append(name), fn(*a))[1])
  return taken


@pytest.mark.parametrize('path', ['dense', 'gather'])
def test_per_example_paths_match_single_adapter_models(path, monkeypatch):
  """Both formulations (dense masked, rank-padded gather) are exact."""
  taken = _force(monkeypatch, path)
  test_per_example_routing_matches_single_adapter_models()
  assert taken and set(taken) == {path}


def test_dense_path_chosen_for_few_adapters():
  from peft.nnx import routing  # pylint: disable=g-import-not-at-top
  # 4 adapters of rank <= 16, 32 examples of one token: dense.
  assert routing._use_dense([8, 16, 8, 4], examples=32, tokens=32)
  # 64 adapters of rank 16, long sequences: the gather moves less.
  assert not routing._use_dense([16] * 64, examples=32, tokens=32 * 512)
  # one adapter: both cost the same FLOPs, dense needs no gather.
  assert routing._use_dense([16], examples=8, tokens=8 * 4096)


def _routed_rows_match(model, x, ids, *, tol=1e-6, train=False):
  """Per-example output rows equal single-adapter runs (same rng state)."""
  ref_base = nnx.clone(model)  # before any call: the same dropout streams
  pnnx.set_adapter_ids(model, jnp.asarray(ids))
  y = model(x)
  names = pnnx.list_adapters(ref_base)
  for k in sorted(set(int(i) for i in ids)):
    ref_model = nnx.clone(ref_base)
    pnnx.set_active_adapters(ref_model, [] if k < 0 else names[k])
    if train:
      ref_model.train()
    ref = ref_model(x)
    rows = np.flatnonzero(np.asarray(ids) == k)
    np.testing.assert_allclose(y[rows], ref[rows], rtol=tol, atol=tol)
  return y


class _Geoms(nnx.Module):
  """LinearGeneral (two contracted axes), Einsum with a kernel batch axis."""

  def __init__(self, rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, precision=_HI, param_dtype=dtype, dtype=dtype)
    self.lg = nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), **kw)
    self.ex = nnx.Einsum('bted,edf->btef', (2, 5, 6), **kw)
    self.lg1 = nnx.LinearGeneral(6, 7, axis=1, **kw)

  def __call__(self, x):  # x: [b, t, 3, 4]
    h = self.lg(x)  # [b, t, 2, 5]
    h = self.ex(jnp.tanh(h))  # [b, t, 2, 6]
    return self.lg1(jnp.swapaxes(h, 1, 3))  # axis 1 (6) -> [b, 2, t, 7]


def _geoms(dtype=jnp.float32, dropout=0.0):
  model = _Geoms(nnx.Rngs(0), dtype)
  for i, r in enumerate((3, 1, 5)):
    pnnx.apply_lora(model, rank=r, alpha=1.5 * r, name=f'g{i}',
                    b_init=nnx.initializers.normal(0.5), dropout=dropout,
                    rngs=nnx.Rngs(i + 1))
  return model


@pytest.mark.parametrize('path', ['dense', 'gather'])
def test_per_example_geometries(path, monkeypatch):
  """LinearGeneral (several / non-negative axes) and an Einsum with a kernel
  batch axis: routed rows equal single-adapter runs on both paths."""
  taken = _force(monkeypatch, path)
  x = jax.random.normal(jax.random.key(3), (5, 2, 3, 4))
  ids = np.array([2, -1, 0, 1, 2])
  y = _routed_rows_match(_geoms(), x, ids)
  assert y.shape == (5, 2, 2, 7) and set(taken) == {path}
  assert len(taken) == 3  # every layer routed


@pytest.mark.parametrize('path', ['dense', 'gather'])
def test_per_example_dropout_uses_each_adapters_stream(path, monkeypatch):
  """With dropout on, example e sees the dropout of its own adapter: rows
  equal a single-adapter model with the same rng state."""
  _force(monkeypatch, path)
  model = _geoms(dropout=0.5)
  model.train()
  x = jax.random.normal(jax.random.key(4), (6, 2, 3, 4))
  ids = np.array([0, 1, 2, 2, 1, 0])
  y = _routed_rows_match(model, x, ids, train=True)
  model.eval()
  assert not np.allclose(y, model(x))  # dropout did change the outputs


def test_per_example_bfloat16_paths_agree(monkeypatch):
  """bfloat16 params: both paths agree and stay near the float32 model
  holding the same (rounded) values."""
  x = jax.random.normal(jax.random.key(5), (4, 2, 3, 4))
  ids = jnp.array([1, 0, -1, 2])
  ref = _geoms(jnp.float32)
  params = jax.tree.map(lambda v: v.astype(jnp.bfloat16),
                        nnx.state(ref, nnx.Param))
  nnx.update(ref, jax.tree.map(lambda v: v.astype(jnp.float32), params))
  pnnx.set_adapter_ids(ref, ids)
  out = {}
  for path in ('dense', 'gather'):
    with monkeypatch.context() as mp:
      _force(mp, path)
      model = _geoms(jnp.bfloat16)
      nnx.update(model, params)
      pnnx.set_adapter_ids(model, ids)
      out[path] = model(x)
  assert out['dense'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out['dense'], np.float32),
                             np.asarray(out['gather'], np.float32),
                             rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(out['dense'], np.float32), ref(x),
                             rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize('path', ['dense', 'gather'])
def test_per_example_gradients_on_both_paths(path, monkeypatch):
  _force(monkeypatch, path)
  test_gradients_reach_only_the_routed_adapters()


def test_per_example_inside_scan_over_stacked_layers():
  """Layers stacked by nnx.vmap, applied by nnx.scan: each example's rows
  equal a run with only its adapter active."""

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(8, 8, rngs=nnx.Rngs(key), precision=_HI)

  def build():
    stack = make(jax.random.split(jax.random.key(0), 3))
    holder = nnx.Dict(layers=stack)
    for i, r in enumerate((2, 3)):
      pnnx.apply_lora(holder, rank=r, name=f's{i}',
                      b_init=nnx.initializers.normal(0.5),
                      rngs=nnx.Rngs(i + 1))
    return holder

  def run(holder, x):
    from peft.nnx.lora import AdapterIds, AdapterWeights  # pylint: disable=g-import-not-at-top
    axes = nnx.StateAxes({(AdapterIds, AdapterWeights): None,
                          ...: 0})

    @nnx.scan(in_axes=(axes, nnx.Carry), out_axes=nnx.Carry)
    def step(layer, h):
      return jnp.tanh(layer(h))
    return step(holder['layers'], x)

  x = jax.random.normal(jax.random.key(6), (4, 8))
  ids = np.array([1, -1, 0, 1])
  model = build()
  pnnx.set_adapter_ids(model, jnp.asarray(ids))
  y = run(model, x)
  for k in (-1, 0, 1):
    ref = build()
    pnnx.set_active_adapters(ref, [] if k < 0 else f's{k}')
    rows = ids == k
    np.testing.assert_allclose(y[rows], run(ref, x)[rows], rtol=1e-6,
                               atol=1e-6)


def test_weighted_single_adapter_bit_equal_to_plain_layer():
  """One active adapter of weight 1 among several gives the floats of the
  layer that only has that adapter (the same two contractions)."""
  model = _model()
  pnnx.set_active_adapters(model, 'b')
  y = model(_x())
  plain = nnx.clone(model)
  pnnx.delete_adapter(plain, 'a')
  pnnx.delete_adapter(plain, 'c')
  assert plain.up.adapter_weights is None  # the plain one-adapter layout
  np.testing.assert_array_equal(y, plain(_x()))


def test_second_adapter_can_be_added_under_eval_shape():
  """`add_adapter` keeps the weights as arrays (no float() of a tracer)."""

  def build():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
    pnnx.apply_lora(model, rank=3, name='b', rngs=nnx.Rngs(2))
    pnnx.apply_lora(model, rank=1, name='c', rngs=nnx.Rngs(3))
    return model

  abstract = nnx.eval_shape(build)
  concrete = build()
  assert abstract.layers[0].adapter_names == ('default', 'b', 'c')
  assert abstract.layers[0].adapter('c').b.shape == (1, 4)
  np.testing.assert_array_equal(concrete.layers[0].adapter_weights[...],
                                [1.0, 0.0, 0.0])

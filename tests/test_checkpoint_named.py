"""Tests for peft/checkpoint: several named adapters saved and loaded together.

`save_adapter(directory, model)` without `name` saves every named adapter
(names, ranks, alphas, rsLoRA, scales, DoRA magnitudes, the active weights);
`load_adapter` re-creates them on a fresh base or restores them into a model
that has them. Files written by the first release still load
(tests/fixtures/adapter_v1, made by tests/fixtures/make_adapter_v1.py).
"""

import json
import os
import pathlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft.nnx as pnnx
from peft import checkpoint
from test_checkpoint import _assert_trees_bit_equal
from test_checkpoint import _Net
from test_checkpoint import _x

_FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'adapter_v1'


def _fill(model, seed):
  """Random non-zero values in every LoRA parameter of `model`."""
  lora = nnx.state(model, nnx.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(seed), 256))
  nnx.update(model, jax.tree.map(
      lambda v: 0.1 * jax.random.normal(next(keys), v.shape, v.dtype), lora))


def _three(model, seed=1):
  """Adapters a (every layer), b (rsLoRA; layers/0, proj), c (proj)."""
  pnnx.apply_lora(model, rank=2, alpha=4.0, name='a', rngs=nnx.Rngs(seed))
  pnnx.apply_lora(model, rank=3, alpha=6.0, use_rslora=True, name='b',
                  where=r'layers/0|proj', rngs=nnx.Rngs(seed + 1))
  pnnx.apply_lora(model, rank=1, name='c', where='proj',
                  rngs=nnx.Rngs(seed + 2))
  return model


def _trained_three():
  model = _Net(nnx.Rngs(0))
  base = nnx.clone(model)
  _three(model)
  _fill(model, 7)
  model.proj.adapter('b').scale[...] = jnp.float32(-0.75)  # a custom scale
  pnnx.set_active_adapters(model, {'a': 0.5, 'b': 1.0, 'c': -0.25})
  return model, base


def _per_adapter_outputs(model, names):
  out = {}
  for n in names:
    pnnx.set_active_adapters(model, n)
    out[n] = np.asarray(model(_x()))
  return out


def _layers(model):
  """{path: [(name, rank, alpha, use_rslora, weight), ...]} of the wrappers."""
  out = {}
  for path, w in checkpoint._wrappers(model):
    n = len(w.adapter_names)
    weights = ([1.0] + [0.0] * (n - 1) if w.adapter_weights is None
               else np.asarray(w.adapter_weights[...]).tolist())
    out[path] = [(n, w.adapter(n).rank, w.adapter(n).alpha,
                  w.adapter(n).use_rslora, weights[i])
                 for i, n in enumerate(w.adapter_names)]
  return out


def _factors(model, name):
  """{layer path: adapter `name`'s LoRA parameters}, whatever its position."""
  return {'/'.join(map(str, p)): nnx.to_pure_dict(
      nnx.state(w.adapter(name), nnx.LoRAParam))
          for p, w in checkpoint._wrappers(model) if name in w.adapter_names}


def test_save_all_then_load_into_fresh_base_restores_every_adapter(tmp_path):
  model, base = _trained_three()
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  assert config['format_version'] == 2
  assert config['adapters'] == ['a', 'b', 'c']
  assert len(config['layers']) == 3 + 2 + 1
  assert config['targets'] == [['layers', 0], ['layers', 1], ['proj']]
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base),
                                   strict=True)
  assert pnnx.list_adapters(loaded) == ['a', 'b', 'c']
  assert _layers(loaded) == _layers(model)
  # Factors, scales and weights bit for bit, in the model's own layout.
  _assert_trees_bit_equal(nnx.state(model, nnx.LoRAParam),
                          nnx.state(loaded, nnx.LoRAParam))
  assert float(loaded.proj.adapter('b').scale[...]) == -0.75
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))
  want = _per_adapter_outputs(model, ['a', 'b', 'c'])
  got = _per_adapter_outputs(loaded, ['a', 'b', 'c'])
  for n in want:
    np.testing.assert_array_equal(got[n], want[n], err_msg=n)
  # Independent check: the rsLoRA scale is alpha / sqrt(rank).
  np.testing.assert_allclose(
      float(loaded.layers[0].adapter('b').scale[...]), 6.0 / np.sqrt(3.0))


def test_load_all_into_a_model_that_has_them_overwrites_their_values(
    tmp_path):
  model, base = _trained_three()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  other = _three(nnx.clone(base), seed=11)  # same adapters, other values
  loaded = checkpoint.load_adapter(tmp_path / 'ad', other, strict=True)
  assert loaded is other
  _assert_trees_bit_equal(nnx.state(model, nnx.LoRAParam),
                          nnx.state(loaded, nnx.LoRAParam))
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))


def test_load_adds_saved_adapters_next_to_the_models_own(tmp_path):
  model, base = _trained_three()
  checkpoint.save_adapter(tmp_path / 'ad', model, name='c')
  mine = pnnx.apply_lora(nnx.clone(base), rank=2, name='mine',
                         rngs=nnx.Rngs(5))
  loaded = checkpoint.load_adapter(tmp_path / 'ad', mine)
  assert pnnx.list_adapters(loaded) == ['mine', 'c']
  assert loaded.proj.adapter_names == ('mine', 'c')
  # 'mine' keeps its weight, 'c' gets its saved one.
  np.testing.assert_array_equal(np.asarray(loaded.proj.adapter_weights[...]),
                                [1.0, -0.25])
  _assert_trees_bit_equal(nnx.state(model.proj.adapter('c'), nnx.LoRAParam),
                          nnx.state(loaded.proj.adapter('c'), nnx.LoRAParam))
  pnnx.set_active_adapters(model, 'c')
  pnnx.set_active_adapters(loaded, 'c')
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))


def test_name_saves_and_loads_one_adapter(tmp_path):
  model, base = _trained_three()
  config = checkpoint.save_adapter(tmp_path / 'b', model, name='b')
  assert config['format_version'] == 1  # one adapter per layer
  assert config['adapters'] == ['b']
  assert [t['path'] for t in config['layers']] == [['layers', 0], ['proj']]
  only_b = checkpoint.load_adapter(tmp_path / 'b', nnx.clone(base))
  assert pnnx.list_adapters(only_b) == ['b']
  # One adapter out of a file holding all of them.
  checkpoint.save_adapter(tmp_path / 'all', model)
  only_c = checkpoint.load_adapter(tmp_path / 'all', nnx.clone(base),
                                   name='c')
  assert pnnx.list_adapters(only_c) == ['c']
  assert float(only_c.proj.adapter_weights[...][0]) == -0.25  # as saved
  for loaded, n in ((only_b, 'b'), (only_c, 'c')):
    pnnx.set_active_adapters(model, n)
    pnnx.set_active_adapters(loaded, n)
    # Not bit-exact: `model` sums its active adapter through the
    # several-adapter path (weights), `loaded` holds one adapter per layer.
    np.testing.assert_allclose(np.asarray(loaded(_x())),
                               np.asarray(model(_x())), rtol=1e-6,
                               atol=1e-6, err_msg=n)
    _assert_trees_bit_equal(_factors(model, n), _factors(loaded, n))


def test_dora_magnitude_round_trips(tmp_path):
  model = _Net(nnx.Rngs(0))
  base = nnx.clone(model)
  pnnx.apply_lora(model, rank=2, alpha=4.0, where='layers/.*', dora=True,
                  rngs=nnx.Rngs(1))
  _fill(model, 3)  # magnitudes too: no longer the base's column norms
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  assert [t['dora'] for t in config['layers']] == [True, True]
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base),
                                   strict=True)
  _assert_trees_bit_equal(nnx.state(model, nnx.LoRAParam),
                          nnx.state(loaded, nnx.LoRAParam))
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))


def _unchanged(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def test_name_clash_is_an_error_naming_the_adapter(tmp_path):
  model, base = _trained_three()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  # The model has an adapter 'a' on other layers than the saved 'a'.
  clash = pnnx.apply_lora(nnx.clone(base), rank=2, alpha=4.0, name='a',
                          where='proj', rngs=nnx.Rngs(1))
  before = _unchanged(clash)
  with pytest.raises(ValueError, match=r"name clash.*'a' on \['proj'\]"):
    checkpoint.load_adapter(tmp_path / 'ad', clash)
  _assert_trees_bit_equal(before, _unchanged(clash))
  assert pnnx.list_adapters(clash) == ['a']


def test_missing_adapter_is_an_error_naming_it(tmp_path):
  model, base = _trained_three()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  fresh = nnx.clone(base)
  with pytest.raises(ValueError,
                     match=r"no adapter named 'zzz'; it has \['a', 'b', 'c'\]"):
    checkpoint.load_adapter(tmp_path / 'ad', fresh, name='zzz')
  with pytest.raises(ValueError, match="no adapter named 'zzz'"):
    checkpoint.save_adapter(tmp_path / 'z', model, name='zzz')
  with pytest.raises(TypeError, match='name'):
    checkpoint.load_adapter(tmp_path / 'ad', fresh, name=3)
  assert not any(hasattr(m, 'lora') for _, m in nnx.iter_modules(fresh))


def test_shape_mismatch_names_the_adapters_keys(tmp_path):
  model, base = _trained_three()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  # Same names and layers, but 'b' has rank 5 in this model.
  other = nnx.clone(base)
  pnnx.apply_lora(other, rank=2, alpha=4.0, name='a', rngs=nnx.Rngs(1))
  pnnx.apply_lora(other, rank=5, alpha=6.0, use_rslora=True, name='b',
                  where=r'layers/0|proj', rngs=nnx.Rngs(2))
  pnnx.apply_lora(other, rank=1, name='c', where='proj', rngs=nnx.Rngs(3))
  before = _unchanged(other)
  with pytest.raises(ValueError) as e:
    checkpoint.load_adapter(tmp_path / 'ad', other)
  msg = str(e.value)
  assert 'shape/dtype mismatches' in msg
  assert 'layers/0/adapters/b/a: checkpoint float32[64, 3], model' in msg
  assert 'proj/adapters/b/b' in msg
  _assert_trees_bit_equal(before, _unchanged(other))


def test_malformed_config_repeating_an_adapter_is_named(tmp_path):
  model, base = _trained_three()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  path = tmp_path / 'ad' / 'adapter_config.json'
  config = json.loads(path.read_text())
  config['layers'].append(dict(config['layers'][0]))
  config['layers'][-1]['weight'] = 'heavy'
  path.write_text(json.dumps(config))
  with pytest.raises(ValueError) as e:
    checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base))
  assert "repeats adapter 'a' of layer layers/0" in str(e.value)
  assert 'weight must be a number' in str(e.value)


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(
    plan=st.lists(
        st.tuples(st.sets(st.sampled_from(['layers/0', 'layers/1', 'proj']),
                          min_size=1),
                  st.integers(1, 4), st.booleans()),
        min_size=1, max_size=3),
    seed=st.integers(0, 1000))
def test_any_set_of_adapters_round_trips(tmp_path_factory, plan, seed):
  base = _Net(nnx.Rngs(0))
  model = nnx.clone(base)
  names = [f'n{i}' for i in range(len(plan))]
  for n, (where, rank, rslora) in zip(names, plan):
    pnnx.apply_lora(model, rank=rank, alpha=2.0 * rank, use_rslora=rslora,
                    name=n, where='|'.join(sorted(where)),
                    rngs=nnx.Rngs(seed))
  _fill(model, seed)
  d = tmp_path_factory.mktemp('ad') / 'ad'
  checkpoint.save_adapter(d, model)
  loaded = checkpoint.load_adapter(d, nnx.clone(base), strict=True)
  assert _layers(loaded) == _layers(model)
  _assert_trees_bit_equal(nnx.state(model, nnx.LoRAParam),
                          nnx.state(loaded, nnx.LoRAParam))
  for n in names:
    pnnx.set_active_adapters(model, n)
    pnnx.set_active_adapters(loaded, n)
    np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                  np.asarray(model(_x())), err_msg=n)


# --------------------------------------------------------------------------
# Files written by the first release (format_version 1)
# --------------------------------------------------------------------------


def _v1_base():  # as `base()` in tests/fixtures/make_adapter_v1.py
  return nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
                        nnx.Linear(3, 2, rngs=nnx.Rngs(1)))


@pytest.mark.parametrize('kind,name', [('default', 'default'),
                                       ('named', 'task')])
def test_first_release_adapters_still_load(kind, name):
  expected = np.load(_FIXTURES / 'expected.npz')
  config = checkpoint.read_adapter_config(_FIXTURES / kind)
  assert config['format_version'] == 1 and 'adapters' not in config
  loaded = checkpoint.load_adapter(_FIXTURES / kind, _v1_base(), strict=True)
  assert pnnx.list_adapters(loaded) == [name]
  for i in range(2):
    for f in ('a', 'b'):
      got = np.asarray(getattr(loaded.layers[i].lora, f)[...])
      np.testing.assert_array_equal(got, expected[f'{kind}/{i}/{f}'])
  np.testing.assert_allclose(np.asarray(loaded(jnp.asarray(expected['x']))),
                             expected[f'{kind}/out'], rtol=1e-6, atol=1e-6)
  assert os.path.isdir(_FIXTURES / kind / 'lora')  # read, never rewritten
  # Next to another adapter, a first-release adapter is active (weight 1),
  # as it was in the model that saved it.
  other = pnnx.apply_lora(_v1_base(), rank=1, name='other', rngs=nnx.Rngs(0))
  loaded = checkpoint.load_adapter(_FIXTURES / kind, other)
  assert loaded.layers[0].adapter_names == ('other', name)
  np.testing.assert_array_equal(
      np.asarray(loaded.layers[0].adapter_weights[...]), [1.0, 1.0])

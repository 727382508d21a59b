"""Tests for peft/checkpoint/: adapter save/load (strict), orbax round trips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft import checkpoint
from peft.nnx import surgery


class _Net(nnx.Module):

  def __init__(self, rngs, hidden=32):
    self.layers = nnx.List([
        nnx.Linear(64, hidden, rngs=rngs),
        nnx.Linear(hidden, 64, rngs=rngs),
    ])
    self.proj = nnx.Einsum('bd,dhk->bhk', (64, 2, 32), rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.proj(x)


def _bits(x):
  """Exact bit pattern of an array (int4 compared by value, others by bytes)."""
  x = np.asarray(x)
  if x.dtype.itemsize == 1 or str(x.dtype) in ('int4', 'uint4'):
    return x.astype(np.int16), str(x.dtype)
  return x.view(f'u{x.dtype.itemsize}'), str(x.dtype)


def _assert_trees_bit_equal(a, b):
  la = jax.tree_util.tree_leaves_with_path(a)
  lb = jax.tree_util.tree_leaves_with_path(b)
  assert [jax.tree_util.keystr(p) for p, _ in la] == [
      jax.tree_util.keystr(p) for p, _ in lb
  ]
  for (p, x), (_, y) in zip(la, lb):
    bx, by = _bits(x), _bits(y)
    assert bx[1] == by[1], jax.tree_util.keystr(p)
    np.testing.assert_array_equal(bx[0], by[0], err_msg=jax.tree_util.keystr(p))


def _trained(where=None, rank=4, alpha=8.0):
  """A LoRA-wrapped net whose adapters hold non-trivial values."""
  model = _Net(nnx.Rngs(0))
  base = nnx.clone(model)
  surgery.apply_lora(model, rank=rank, alpha=alpha, where=where,
                     rngs=nnx.Rngs(1))
  lora = nnx.state(model, nnx.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(7), 64))
  nnx.update(model, jax.tree.map(
      lambda v: 0.1 * jax.random.normal(next(keys), v.shape, v.dtype), lora))
  return model, base


def _x():
  return jax.random.normal(jax.random.key(3), (5, 64))


# --------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------


def test_adapter_round_trip_is_bit_exact(tmp_path):
  model, base = _trained()
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base),
                                   rngs=nnx.Rngs(99))
  _assert_trees_bit_equal(nnx.state(model, nnx.LoRAParam),
                          nnx.state(loaded, nnx.LoRAParam))
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))
  # the loaded model is the base plus wrappers at the same places
  assert type(loaded.layers[0]).__name__ == 'LoRALinear'
  assert type(loaded.proj).__name__ == 'LoRAEinsum'
  assert float(loaded.proj.lora.scale[...]) == 8.0 / 4
  assert config['rank'] == 4 and config['alpha'] == 8.0


def test_adapter_saves_only_lora_params_and_config(tmp_path):
  model, _ = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  assert sorted(os.listdir(tmp_path / 'ad')) == ['adapter_config.json', 'lora']
  with open(tmp_path / 'ad' / 'adapter_config.json') as f:
    config = json.load(f)
  assert config['targets'] == [['layers', 0], ['layers', 1], ['proj']]
  assert config['method'] == 'none'
  assert config['rank'] == 4 and config['alpha'] == 8.0
  assert isinstance(config['version'], str) and config['version']
  restored = checkpoint.restore_pytree(tmp_path / 'ad' / 'lora')
  leaves = jax.tree_util.tree_leaves_with_path(restored)
  names = sorted(jax.tree_util.keystr(p) for p, _ in leaves)
  # only a/b of each adapter: no base kernels, no biases, no scales
  assert len(names) == 6
  assert all(n.endswith("['a']") or n.endswith("['b']") for n in names)
  n_saved = sum(int(np.prod(x.shape)) for _, x in leaves)
  n_lora = sum(int(np.prod(v.shape))
               for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  assert n_saved == n_lora


def test_adapter_with_selected_targets(tmp_path):
  model, base = _trained(where='proj')
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  assert config['targets'] == [['proj']]
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base))
  assert type(loaded.layers[0]).__name__ == 'Linear'
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))


def test_adapter_on_quantized_base(tmp_path):
  model = _Net(nnx.Rngs(0))
  surgery.quantize(model, method='q4_0')
  base = nnx.clone(model)
  surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
  nnx.update(model, jax.tree.map(lambda v: v + 0.05,
                                 nnx.state(model, nnx.LoRAParam)))
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  assert config['method'] == 'q4_0'
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base))
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))
  # a float base does not silently take an adapter trained on q4_0
  with pytest.raises(ValueError, match="method 'q4_0'"):
    checkpoint.load_adapter(tmp_path / 'ad', _Net(nnx.Rngs(0)))


def _edit_config(path, fn):
  cfg_path = os.path.join(path, 'adapter_config.json')
  with open(cfg_path) as f:
    config = json.load(f)
  fn(config)
  with open(cfg_path, 'w') as f:
    json.dump(config, f)


def _no_wrappers(model):
  return not any(hasattr(m, 'lora') for _, m in nnx.iter_modules(model))


def test_load_missing_keys_raises_and_lists_them(tmp_path):
  model, base = _trained(where='proj')
  full, _ = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  # the config claims two more targets than the checkpoint holds
  full_layers = checkpoint.save_adapter(tmp_path / 'full', full)['layers']
  _edit_config(tmp_path / 'ad', lambda c: c.update(layers=full_layers))
  fresh = nnx.clone(base)
  with pytest.raises(ValueError, match='missing keys') as e:
    checkpoint.load_adapter(tmp_path / 'ad', fresh)
  assert 'layers/0/lora/a' in str(e.value)
  assert 'layers/1/lora/b' in str(e.value)
  assert _no_wrappers(fresh)  # nothing applied on failure


def test_load_unexpected_keys_raises_and_lists_them(tmp_path):
  model, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  _edit_config(tmp_path / 'ad',
               lambda c: c.update(layers=[l for l in c['layers']
                                          if l['path'] == ['proj']]))
  fresh = nnx.clone(base)
  with pytest.raises(ValueError, match='unexpected keys') as e:
    checkpoint.load_adapter(tmp_path / 'ad', fresh)
  assert 'layers/0/lora/a' in str(e.value)
  assert 'proj' not in str(e.value).split('unexpected keys')[1].split('\n')[0]
  assert _no_wrappers(fresh)


def test_load_shape_mismatch_raises_and_lists_them(tmp_path):
  model, _ = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  other = _Net(nnx.Rngs(0), hidden=48)  # layers 0/1 have other shapes
  with pytest.raises(ValueError, match='shape/dtype mismatches') as e:
    checkpoint.load_adapter(tmp_path / 'ad', other)
  msg = str(e.value)
  assert 'layers/0/lora/b' in msg and '[4, 32]' in msg and '[4, 48]' in msg
  assert 'layers/1/lora/a' in msg
  assert _no_wrappers(other)


def test_load_missing_target_layer_raises(tmp_path):
  model, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  _edit_config(tmp_path / 'ad',
               lambda c: c['layers'][0].update(path=['nowhere', 3]))
  with pytest.raises(ValueError, match='nowhere/3: no such layer'):
    checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base))


def test_load_onto_wrapped_model_restores_its_adapter(tmp_path):
  model, _ = _trained()
  saved = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
  checkpoint.save_adapter(tmp_path / 'ad', model)
  nnx.update(model, jax.tree.map(jnp.zeros_like,
                                 nnx.state(model, nnx.LoRAParam)))
  loaded = checkpoint.load_adapter(tmp_path / 'ad', model, strict=True)
  assert loaded is model
  _assert_trees_bit_equal(saved, nnx.state(model, nnx.LoRAParam))


def test_save_errors(tmp_path):
  model, _ = _trained()
  with pytest.raises(ValueError, match='no LoRA wrappers'):
    checkpoint.save_adapter(tmp_path / 'x', _Net(nnx.Rngs(0)))
  checkpoint.save_adapter(tmp_path / 'ad', model)
  with pytest.raises(ValueError, match='overwrite=True'):
    checkpoint.save_adapter(tmp_path / 'ad', model)
  (tmp_path / 'ad' / 'notes.txt').write_text('mine')
  checkpoint.save_adapter(tmp_path / 'ad', model, overwrite=True)
  assert (tmp_path / 'ad' / 'notes.txt').read_text() == 'mine'
  with pytest.raises(ValueError, match='adapter_config.json'):
    checkpoint.load_adapter(tmp_path / 'nothing', _Net(nnx.Rngs(0)))
  with pytest.raises(TypeError, match='model'):
    checkpoint.save_adapter(tmp_path / 'y', {'not': 'a model'})



# --------------------------------------------------------------------------
# Damaged files: a ValueError naming the file, the model untouched
# --------------------------------------------------------------------------


def _snapshot(model):
  """Types of every node and every variable's value, to compare later."""
  types = [(p, type(m).__name__) for p, m in nnx.iter_graph(model)]
  state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  return types, state


def _assert_untouched(model, snap):
  types, state = _snapshot(model)
  assert types == snap[0]
  _assert_trees_bit_equal(state, snap[1])


def _truncate(path, keep=0.5):
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize('name', [
    'lora/array_metadatas/process_0', 'lora/_METADATA',
    'lora/_CHECKPOINT_METADATA', 'adapter_config.json',
])
def test_damaged_file_is_a_value_error_naming_it_and_model_untouched(
    tmp_path, name):
  model, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  _truncate(tmp_path / 'ad' / name)
  fresh = nnx.clone(base)
  snap = _snapshot(fresh)
  with pytest.raises(ValueError, match='damaged or truncated') as e:
    checkpoint.load_adapter(tmp_path / 'ad', fresh)
  assert str(tmp_path / 'ad' / name) in str(e.value)
  _assert_untouched(fresh, snap)


def _data_files(root):
  return sorted((p for p in root.rglob('*') if p.is_file()
                 and p.parent.name == 'd'), key=lambda p: p.stat().st_size)


def test_damaged_array_data_is_caught_before_the_model_is_touched(tmp_path):
  model, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  for f in _data_files(tmp_path / 'ad' / 'lora'):
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data)):
      data[i] ^= 0x5A
    f.write_bytes(bytes(data))
  fresh = nnx.clone(base)
  snap = _snapshot(fresh)
  with pytest.raises(ValueError, match='damaged'):
    checkpoint.load_adapter(tmp_path / 'ad', fresh)
  _assert_untouched(fresh, snap)


def test_arrays_are_checked_against_the_recorded_checksums(tmp_path):
  model, base = _trained()
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  assert sorted(config['checksums']) == [
      'layers/0/lora/a', 'layers/0/lora/b', 'layers/1/lora/a',
      'layers/1/lora/b', 'proj/lora/a', 'proj/lora/b']
  # Another adapter's arrays under this config: orbax reads them fine, the
  # checksums do not match.
  other, _ = _trained(alpha=2.0)
  nnx.update(other, jax.tree.map(lambda v: v * 2,
                                 nnx.state(other, nnx.LoRAParam)))
  checkpoint.save_adapter(tmp_path / 'other', other)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / 'ad' / 'lora')
  shutil.copytree(tmp_path / 'other' / 'lora', tmp_path / 'ad' / 'lora')
  fresh = nnx.clone(base)
  snap = _snapshot(fresh)
  with pytest.raises(ValueError, match='checksums') as e:
    checkpoint.load_adapter(tmp_path / 'ad', fresh)
  assert 'layers/0/lora/a' in str(e.value)
  _assert_untouched(fresh, snap)


@pytest.mark.parametrize('edit,match', [
    (lambda c: c.update(layers='x'), 'layers'),
    (lambda c: c['layers'][0].update(rank='4'), r'layers\[0\].rank'),
    (lambda c: c['layers'][0].update(path=None), r'layers\[0\].path'),
    (lambda c: c['layers'][0].update(scale='big'), 'scale'),
    (lambda c: c['layers'][0].update(scale=[1.0, 2.0, 3.0]), 'scale'),
    (lambda c: c.update(format_version='two'), 'format_version'),
])
def test_malformed_config_is_a_value_error_naming_the_file(tmp_path, edit,
                                                           match):
  model, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  _edit_config(tmp_path / 'ad', edit)
  fresh = nnx.clone(base)
  snap = _snapshot(fresh)
  with pytest.raises(ValueError, match=match) as e:
    checkpoint.load_adapter(tmp_path / 'ad', fresh)
  assert 'adapter_config.json' in str(e.value)
  _assert_untouched(fresh, snap)


# --------------------------------------------------------------------------
# LoRAScale: what was saved is what is loaded
# --------------------------------------------------------------------------


def test_changed_scale_is_saved_and_restored_per_layer(tmp_path):
  model, base = _trained()
  model.layers[0].lora.scale[...] = 7.0
  model.proj.lora.scale[...] = -0.375
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  assert [t['scale'] for t in config['layers']] == [7.0, 2.0, -0.375]
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base))
  assert float(loaded.layers[0].lora.scale[...]) == 7.0
  assert float(loaded.layers[1].lora.scale[...]) == 2.0  # alpha / rank
  assert float(loaded.proj.lora.scale[...]) == -0.375
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))


def test_old_config_without_new_fields_still_loads(tmp_path):
  model, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)

  def old(c):
    for key in ('checksums', 'base_fingerprint'):
      del c[key]
    for t in c['layers']:
      del t['scale']
  _edit_config(tmp_path / 'ad', old)
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base),
                                     strict=True)
  assert not [w for w in caught
              if issubclass(w.category, checkpoint.BaseMismatchWarning)]
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))


# --------------------------------------------------------------------------
# Base fingerprint
# --------------------------------------------------------------------------


def test_fingerprint_records_the_wrapped_layers(tmp_path):
  model, _ = _trained(where='proj|layers/0')
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  fp = config['base_fingerprint']
  assert [e['path'] for e in fp] == [['layers', 0, 'bias'],
                                     ['layers', 0, 'kernel'],
                                     ['proj', 'kernel']]  # Einsum: no bias
  fp = fp[1:]
  kernel = np.asarray(model.proj.wrapped.kernel[...], np.float64).ravel()
  stride = max(1, kernel.size // 1024)
  sample = kernel[::stride]
  want = float(np.sum(sample * (1 + np.arange(sample.size) % 7)))
  assert fp[1]['shape'] == [64, 2, 32] and fp[1]['dtype'] == 'float32'
  np.testing.assert_allclose(fp[1]['checksum'], want, rtol=1e-12)


def test_load_onto_another_base_warns_or_raises_with_strict(tmp_path):
  model, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  other = _Net(nnx.Rngs(5))  # same architecture, other weights
  snap = _snapshot(other)
  with pytest.raises(ValueError, match='differs from the base') as e:
    checkpoint.load_adapter(tmp_path / 'ad', other, strict=True)
  assert 'layers/0/kernel: values differ' in str(e.value)
  _assert_untouched(other, snap)
  with pytest.warns(checkpoint.BaseMismatchWarning,
                    match='layers/1/kernel: values differ'):
    checkpoint.load_adapter(tmp_path / 'ad', other)
  assert type(other.layers[0]).__name__ == 'LoRALinear'  # loaded anyway
  # a single changed value in a sampled position is seen too
  fresh = nnx.clone(base)
  fresh.proj.kernel[...] = fresh.proj.kernel[...].at[0, 0, 0].add(1.0)
  with pytest.raises(ValueError, match='proj/kernel: values differ'):
    checkpoint.load_adapter(tmp_path / 'ad', fresh, strict=True)


def test_load_onto_the_same_base_does_not_warn(tmp_path):
  import warnings  # pylint: disable=g-import-not-at-top
  model, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base), strict=True)
  assert not [w for w in caught
              if issubclass(w.category, checkpoint.BaseMismatchWarning)]


def test_fingerprint_of_a_quantized_base(tmp_path):
  model = _Net(nnx.Rngs(0))
  surgery.quantize(model, method='int4')
  base = nnx.clone(model)
  surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
  checkpoint.save_adapter(tmp_path / 'ad', model)
  checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base), strict=True)
  other = surgery.quantize(_Net(nnx.Rngs(3)), method='int4')
  with pytest.raises(ValueError, match='values differ'):
    checkpoint.load_adapter(tmp_path / 'ad', other, strict=True)



class _Stack(nnx.Module):
  """Three Linear layers stacked by nnx.vmap, run by nnx.scan."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(8, 8, rngs=rngs)
    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x)
    return body(x, self.layers)


def test_stacked_layers_keep_one_saved_scale_per_slice(tmp_path):
  model = _Stack(nnx.Rngs(0))
  base = nnx.clone(model)
  surgery.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  model.layers.lora.scale[...] = jnp.array([1.0, 5.0, -2.0])
  model.layers.lora.b[...] = jnp.ones_like(model.layers.lora.b[...])
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  assert config['layers'][0]['scale'] == [1.0, 5.0, -2.0]
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base),
                                   strict=True)
  np.testing.assert_array_equal(np.asarray(loaded.layers.lora.scale[...]),
                                [1.0, 5.0, -2.0])
  x = jnp.ones((2, 8))
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_named_adapter_keeps_its_name_and_several_are_saved(tmp_path):
  import peft.nnx as pnnx  # pylint: disable=g-import-not-at-top
  model = _Net(nnx.Rngs(0))
  base = nnx.clone(model)
  pnnx.apply_lora(model, rank=2, where='proj', name='task', rngs=nnx.Rngs(1))
  model.proj.lora.b[...] = jnp.ones_like(model.proj.lora.b[...])
  config = checkpoint.save_adapter(tmp_path / 'ad', model)
  assert config['layers'][0]['name'] == 'task'
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base))
  assert pnnx.list_adapters(loaded) == ['task']
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(model(_x())))
  pnnx.apply_lora(model, rank=2, where='proj', name='other', rngs=nnx.Rngs(2))
  config = checkpoint.save_adapter(tmp_path / 'two', model)
  assert [t['name'] for t in config['layers']] == ['task', 'other']
  assert pnnx.list_adapters(checkpoint.load_adapter(
      tmp_path / 'two', nnx.clone(base))) == ['task', 'other']

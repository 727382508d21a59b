"""peft.hf against golden files made by transformers + PyTorch PEFT.

The fixtures (tests/fixtures/hf/, written by tests/fixtures/make_hf_adapters.py)
hold tiny random Llama / Gemma base models, LoRA adapters saved by PEFT's
`save_pretrained` and the logits PEFT computed with them. `_tiny_llama` is an
independent pure-JAX forward pass of those models.

Run as a script, `python tests/test_hf.py DIR` writes adapters trained here
(plus our logits) into DIR for `make_hf_adapters.py --check DIR`.
"""

import json
import os
import pathlib
import re
import shutil
import sys
import tempfile

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import _tiny_llama as tiny  # noqa: E402

import peft  # noqa: E402
import peft.nnx as pnnx  # noqa: E402
from peft import hf  # noqa: E402

TOL = 1e-4
ADAPTERS = {
    'llama_lora': 'llama',
    'llama_rslora': 'llama',
    'llama_pattern': 'llama',
    'llama_bf16': 'llama',
    'gemma_lora': 'gemma',
    'llama_dora': 'llama',
    'gemma_dora': 'gemma',
}
PREFIX = 'base_model.model.'


def _dir(name):
  return tiny.FIXTURES / name


def _max_diff(x, y):
  return float(np.max(np.abs(np.asarray(x, np.float32)
                             - np.asarray(y, np.float32))))


def _copy_adapter(name, tmp_path):
  out = tmp_path / name
  shutil.copytree(_dir(name), out)
  return out


def _edit_config(directory, **changes):
  path = pathlib.Path(directory) / hf.ADAPTER_CONFIG
  cfg = json.loads(path.read_text())
  cfg.update(changes)
  path.write_text(json.dumps(cfg))


def _tensors(directory):
  return safetensors.numpy.load_file(
      pathlib.Path(directory) / hf.ADAPTER_WEIGHTS)


def _state(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _module_settings(directory):
  """{module: (rank, scale)} as PEFT derives them from file and config."""
  cfg = hf.read_adapter_config(directory)
  out = {}
  for key, value in _tensors(directory).items():
    if key.endswith('lora_A.weight'):
      name = key[len(PREFIX):-len('.lora_A.weight')]
      rank = value.shape[0]
      alpha = cfg['lora_alpha']
      for pat, a in (cfg.get('alpha_pattern') or {}).items():
        if re.match(rf'(.*\.)?({pat})$', name):
          alpha = a
          break
      denom = np.sqrt(rank) if cfg.get('use_rslora') else rank
      out[name] = (rank, np.float32(alpha / denom))
  return out


# ---------------------------------------------------------------------------
# HF -> here: logits equal PEFT's
# ---------------------------------------------------------------------------


def test_reference_forward_matches_transformers():
  for base in ('llama', 'gemma'):
    exp = tiny.expected(base)
    got = tiny.logits(tiny.load_base(base), exp['input_ids'])
    assert _max_diff(got, exp['logits']) < TOL


@pytest.mark.parametrize('name', sorted(ADAPTERS))
def test_nnx_logits_match_peft(name):
  model = tiny.load_base(ADAPTERS[name])
  exp = tiny.expected(name)
  base_logits = tiny.logits(model, exp['input_ids'])
  out = hf.load_adapter(_dir(name), model)
  assert out is model
  got = tiny.logits(model, exp['input_ids'])
  assert _max_diff(got, exp['logits']) < TOL
  # The adapter matters: without it the logits are far off.
  assert _max_diff(base_logits, exp['logits']) > 0.1
  wrapped = [p for p, m in pnnx.select(model) if hasattr(m, 'lora')]
  assert len(wrapped) == 14  # 7 projections x 2 layers; lm_head untouched
  assert 'lm_head' not in wrapped


def test_nnx_ranks_and_scales_follow_the_patterns():
  model = hf.load_adapter(_dir('llama_pattern'), tiny.load_base('llama'))
  layers = dict(pnnx.select(model))
  want = _module_settings(_dir('llama_pattern'))
  assert len(want) == 14
  for name, (rank, scale) in want.items():
    lora = layers[name.replace('.', '/')].lora
    assert lora.a.shape[-1] == rank
    assert np.float32(lora.scale[...]) == scale
  # the rank_pattern / alpha_pattern of the fixture, spelled out
  assert layers['model/layers/0/self_attn/q_proj'].lora.a.shape[-1] == 2
  assert layers['model/layers/1/mlp/down_proj'].lora.a.shape[-1] == 8
  assert layers['model/layers/0/mlp/down_proj'].lora.a.shape[-1] == 4
  assert float(layers['model/layers/0/self_attn/v_proj'].lora.scale[...]) == 0.75
  assert float(layers['model/layers/1/mlp/up_proj'].lora.scale[...]) == 1.25


def test_rslora_scale_is_alpha_over_sqrt_r():
  model = hf.load_adapter(_dir('llama_rslora'), tiny.load_base('llama'))
  scales = {float(m.lora.scale[...]) for _, m in pnnx.select(model)
            if hasattr(m, 'lora')}
  assert scales == {6 / np.sqrt(4)}


def _linen_params(base):
  """The base weights as a FlaxLlama-style `{'params': ...}` tree."""
  tree = {}
  for key, value in tiny.base_weights(base).items():
    keys = key.split('.')
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    if keys[-1] == 'weight' and value.ndim == 2 and 'embed' not in key:
      node['kernel'] = jnp.asarray(value.T)
    else:
      node[keys[-1]] = jnp.asarray(value)
  return {'params': tree}


def _nnx_from_tree(base, params):
  """The reference model with its kernels set from a (fused) params tree."""
  model = tiny.load_base(base)
  for path, layer in pnnx.select(model):
    node = params['params']
    for k in path.split('/'):
      node = node[k]
    layer.kernel.set_value(jnp.asarray(node['kernel']))
  return model


@pytest.mark.parametrize('name', ['llama_pattern', 'gemma_lora', 'llama_bf16'])
def test_linen_tree_fused_logits_match_peft(name):
  base = ADAPTERS[name]
  params = _linen_params(base)
  before = jax.tree.map(np.asarray, params)
  out = hf.load_adapter(_dir(name), params)
  jax.tree.map(np.testing.assert_array_equal, params, before)  # not mutated
  lora = out['params']['model']['layers']['0']['self_attn']['q_proj']['lora']
  assert lora['a'].shape[0] == 64 and lora['b'].shape[1] == 64
  fused = peft.fuse_params(out)
  exp = tiny.expected(name)
  got = tiny.logits(_nnx_from_tree(base, fused), exp['input_ids'])
  assert _max_diff(got, exp['logits']) < TOL


def test_linen_tree_integer_and_plain_keys():
  # No 'params' root and int keys for the layer list.
  tree = _linen_params('llama')['params']
  tree['model']['layers'] = {int(k): v
                             for k, v in tree['model']['layers'].items()}
  out = hf.load_adapter(_dir('llama_lora'), tree)
  assert 'lora' in out['model']['layers'][1]['mlp']['down_proj']
  assert 'lora' not in out['lm_head']


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------


def _assert_same_files(src, dst):
  a, b = _tensors(src), _tensors(dst)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    assert a[k].tobytes() == b[k].tobytes(), k
  assert _module_settings(src) == _module_settings(dst)


@pytest.mark.parametrize('name', sorted(ADAPTERS))
def test_roundtrip_hf_nnx_hf_is_bit_exact(name, tmp_path):
  model = hf.load_adapter(_dir(name), tiny.load_base(ADAPTERS[name]))
  hf.save_adapter(tmp_path / 'out', model, base_model_name_or_path='x/y',
                  task_type='CAUSAL_LM')
  _assert_same_files(_dir(name), tmp_path / 'out')
  src = hf.read_adapter_config(_dir(name))
  dst = hf.read_adapter_config(tmp_path / 'out')
  assert dst['use_rslora'] == src['use_rslora']
  assert dst['base_model_name_or_path'] == 'x/y'
  assert dst['task_type'] == 'CAUSAL_LM'
  assert sorted(dst['target_modules']) == sorted(
      ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
       'down_proj'])
  meta = _header(tmp_path / 'out' / hf.ADAPTER_WEIGHTS)['__metadata__']
  assert meta == {'format': 'pt'}


def _header(path):
  with open(path, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    return json.loads(f.read(n))


@pytest.mark.parametrize('name', ['llama_lora', 'llama_rslora', 'llama_bf16'])
def test_roundtrip_hf_linen_hf_is_bit_exact(name, tmp_path):
  cfg = hf.read_adapter_config(_dir(name))
  tree = hf.load_adapter(_dir(name), _linen_params('llama'), fold_scale=False)
  lora_only = peft.split_params(tree)[1]
  hf.save_adapter(tmp_path / 'out', lora_only, alpha=cfg['lora_alpha'],
                  use_rslora=cfg['use_rslora'])
  _assert_same_files(_dir(name), tmp_path / 'out')


def test_linen_fold_scale_default_keeps_the_function(tmp_path):
  tree = hf.load_adapter(_dir('llama_pattern'), _linen_params('llama'))
  hf.save_adapter(tmp_path / 'out', tree)  # scale 1: lora_alpha = r
  settings = _module_settings(tmp_path / 'out')
  assert {s for _, s in settings.values()} == {1.0}
  model = hf.load_adapter(tmp_path / 'out', tiny.load_base('llama'))
  exp = tiny.expected('llama_pattern')
  assert _max_diff(tiny.logits(model, exp['input_ids']), exp['logits']) < TOL


class _Two(nnx.Module):

  def __init__(self, d_in, d_hidden, dtype, rngs):
    self.fc1 = nnx.Linear(d_in, d_hidden, param_dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(d_hidden, d_in, param_dtype=dtype,
                                       rngs=rngs)])


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    # Few shapes: every new shape costs eager compilations on a slow CPU.
    d_in=st.sampled_from([1, 4]), d_hidden=st.just(6),
    r1=st.integers(1, 3), r2=st.integers(1, 3),
    alpha=st.sampled_from([None, 1, 3, 7.5, 16]),
    use_rslora=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    seed=st.integers(0, 2**16))
def test_roundtrip_here_hf_here_is_exact(d_in, d_hidden, r1, r2, alpha,
                                         use_rslora, dtype, seed):
  model = _Two(d_in, d_hidden, dtype, nnx.Rngs(0))
  pnnx.apply_lora(model, rank=r1, alpha=alpha, use_rslora=use_rslora,
                  where='fc1', rngs=nnx.Rngs(seed))
  pnnx.apply_lora(model, rank=r2, alpha=alpha, use_rslora=use_rslora,
                  where='blocks/0', rngs=nnx.Rngs(seed + 1))
  key = jax.random.key(seed)
  for layer in (model.fc1, model.blocks[0]):
    key, sub = jax.random.split(key)
    layer.lora.b.set_value(jax.random.normal(sub, layer.lora.b.shape, dtype))
  with tempfile.TemporaryDirectory() as d:
    hf.save_adapter(d, model)
    fresh = hf.load_adapter(d, _Two(d_in, d_hidden, dtype, nnx.Rngs(0)))
  for old, new in ((model.fc1, fresh.fc1), (model.blocks[0],
                                            fresh.blocks[0])):
    for f in ('a', 'b'):
      x, y = getattr(old.lora, f)[...], getattr(new.lora, f)[...]
      assert x.dtype == y.dtype and x.shape == y.shape
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert np.float32(old.lora.scale[...]) == np.float32(new.lora.scale[...])
  x = jnp.ones((2, d_in), dtype)
  np.testing.assert_array_equal(np.asarray(model.blocks[0](model.fc1(x))),
                                np.asarray(fresh.blocks[0](fresh.fc1(x))))


def test_rslora_as_alpha(tmp_path):
  model = hf.load_adapter(_dir('llama_rslora'), tiny.load_base('llama'))
  hf.save_adapter(tmp_path / 'plain', model, rslora_as_alpha=True)
  cfg = hf.read_adapter_config(tmp_path / 'plain')
  assert cfg['use_rslora'] is False and cfg['lora_alpha'] == 6 * 2
  assert _module_settings(tmp_path / 'plain') == _module_settings(
      _dir('llama_rslora'))
  again = hf.load_adapter(tmp_path / 'plain', tiny.load_base('llama'))
  exp = tiny.expected('llama_rslora')
  assert _max_diff(tiny.logits(again, exp['input_ids']), exp['logits']) < TOL


def test_changed_scale_is_saved_as_alpha(tmp_path):
  model = hf.load_adapter(_dir('llama_lora'), tiny.load_base('llama'))
  layer = model.model.layers[0].self_attn.q_proj
  layer.lora.scale[...] = 0.5
  hf.save_adapter(tmp_path / 'out', model)
  settings = _module_settings(tmp_path / 'out')
  assert settings['model.layers.0.self_attn.q_proj'] == (4, np.float32(0.5))
  assert settings['model.layers.1.self_attn.q_proj'] == (4, np.float32(2.0))


# ---------------------------------------------------------------------------
# files: shards
# ---------------------------------------------------------------------------


def _shard(src, dst, with_index):
  shutil.copytree(src, dst)
  os.remove(dst / hf.ADAPTER_WEIGHTS)
  tensors = _tensors(src)
  keys = sorted(tensors)
  parts = [keys[: len(keys) // 3], keys[len(keys) // 3:]]
  weight_map = {}
  for i, part in enumerate(parts):
    fname = f'adapter_model-{i + 1:05d}-of-{len(parts):05d}.safetensors'
    safetensors.numpy.save_file({k: tensors[k] for k in part}, dst / fname)
    weight_map.update({k: fname for k in part})
  if with_index:
    (dst / hf.ADAPTER_INDEX).write_text(json.dumps({'weight_map': weight_map}))
  return dst


@pytest.mark.parametrize('with_index', [True, False])
def test_sharded_adapter_is_read_whole(tmp_path, with_index):
  d = _shard(_dir('llama_pattern'), tmp_path / 'sharded', with_index)
  model = hf.load_adapter(d, tiny.load_base('llama'))
  exp = tiny.expected('llama_pattern')
  assert _max_diff(tiny.logits(model, exp['input_ids']), exp['logits']) < TOL


def test_missing_shard_is_an_error(tmp_path):
  d = _shard(_dir('llama_lora'), tmp_path / 'sharded', True)
  os.remove(d / 'adapter_model-00002-of-00002.safetensors')
  with pytest.raises(ValueError, match='shards that are not in'):
    hf.load_adapter(d, tiny.load_base('llama'))
  d2 = _shard(_dir('llama_lora'), tmp_path / 'noindex', False)
  os.remove(d2 / 'adapter_model-00001-of-00002.safetensors')
  with pytest.raises(ValueError, match='expected 2 shards'):
    hf.load_adapter(d2, tiny.load_base('llama'))


def test_pickle_adapter_is_refused(tmp_path):
  d = _copy_adapter('llama_lora', tmp_path)
  os.rename(d / hf.ADAPTER_WEIGHTS, d / 'adapter_model.bin')
  with pytest.raises(ValueError, match='adapter_model.bin'):
    hf.load_adapter(d, tiny.load_base('llama'))


# ---------------------------------------------------------------------------
# strictness
# ---------------------------------------------------------------------------


def test_all_problems_in_one_error_and_nothing_loaded(tmp_path):
  d = _copy_adapter('llama_lora', tmp_path)
  tensors = _tensors(d)
  tensors[PREFIX + 'model.layers.7.self_attn.q_proj.lora_A.weight'] = (
      np.zeros((4, 64), np.float32))
  tensors[PREFIX + 'model.layers.7.self_attn.q_proj.lora_B.weight'] = (
      np.zeros((64, 4), np.float32))
  key = PREFIX + 'model.layers.1.mlp.up_proj.lora_A.weight'
  tensors[key] = np.zeros((4, 63), np.float32)  # wrong in-features
  safetensors.numpy.save_file(tensors, d / hf.ADAPTER_WEIGHTS)
  _edit_config(d, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj',
                                  'gate_proj', 'up_proj', 'down_proj',
                                  'fc_missing'])
  model = tiny.load_base('llama')
  before = _state(model)
  with pytest.raises(ValueError) as e:
    hf.load_adapter(d, model)
  msg = str(e.value)
  assert 'model.layers.7.self_attn.q_proj' in msg  # maps to no layer
  assert 'fc_missing' in msg  # target without key
  assert 'model.layers.1.mlp.up_proj' in msg and '63' in msg  # shape
  assert 'nothing was loaded' in msg
  assert not any(hasattr(m, 'lora') for _, m in pnnx.select(model))
  jax.tree.map(np.testing.assert_array_equal, _state(model), before)
  # Params trees: the same problems, the same single error.
  with pytest.raises(ValueError, match='fc_missing'):
    hf.load_adapter(d, _linen_params('llama'))


def test_shape_error_found_after_wrapping_is_undone(tmp_path):
  # The mismatch is only visible on the wrapper (an Einsum layer has no
  # in/out features), so the wrappers made before the check are removed.
  class M(nnx.Module):

    def __init__(self):
      self.fc = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      self.ein = nnx.Einsum('bd,dhk->bhk', (3, 2, 2), rngs=nnx.Rngs(1))

  d = tmp_path / 'a'
  d.mkdir()
  safetensors.numpy.save_file({
      PREFIX + 'fc.lora_A.weight': np.ones((1, 3), np.float32),
      PREFIX + 'fc.lora_B.weight': np.ones((4, 1), np.float32),
      PREFIX + 'ein.lora_A.weight': np.ones((1, 3), np.float32),
      PREFIX + 'ein.lora_B.weight': np.ones((5, 1), np.float32),
  }, d / hf.ADAPTER_WEIGHTS)
  (d / hf.ADAPTER_CONFIG).write_text(json.dumps(
      {'peft_type': 'LORA', 'r': 1, 'lora_alpha': 1,
       'target_modules': ['fc', 'ein']}))
  model = M()
  fc, ein = model.fc, model.ein
  with pytest.raises(ValueError, match='ein'):
    hf.load_adapter(d, model)
  assert model.fc is fc and model.ein is ein


def test_strict_false_skips_unmapped_keys_and_targets(tmp_path):
  d = _copy_adapter('llama_lora', tmp_path)
  tensors = _tensors(d)
  tensors[PREFIX + 'model.layers.7.mlp.up_proj.lora_A.weight'] = (
      np.zeros((4, 64), np.float32))
  tensors[PREFIX + 'model.layers.7.mlp.up_proj.lora_B.weight'] = (
      np.zeros((128, 4), np.float32))
  safetensors.numpy.save_file(tensors, d / hf.ADAPTER_WEIGHTS)
  _edit_config(d, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj',
                                  'gate_proj', 'up_proj', 'down_proj', 'fc9'])
  with pytest.raises(ValueError):
    hf.load_adapter(d, tiny.load_base('llama'))
  model = hf.load_adapter(d, tiny.load_base('llama'), strict=False)
  exp = tiny.expected('llama_lora')
  assert _max_diff(tiny.logits(model, exp['input_ids']), exp['logits']) < TOL


@pytest.mark.parametrize('field,value', [
    ('bias', 'all'),
    ('bias', 'lora_only'),
    ('modules_to_save', ['lm_head']),
    ('init_lora_weights', 'pissa'),
    ('init_lora_weights', 'pissa_niter_4'),
    ('init_lora_weights', 'olora'),
    ('target_parameters', ['experts.gate_up_proj']),
    ('layer_replication', [[0, 2]]),
    ('peft_type', 'IA3'),
    ('lora_bias', True),
])
def test_config_fields_that_cannot_be_honoured(tmp_path, field, value):
  d = _copy_adapter('llama_lora', tmp_path)
  _edit_config(d, **{field: value})
  model = tiny.load_base('llama')
  with pytest.raises(ValueError, match=field):
    hf.load_adapter(d, model)
  with pytest.raises(ValueError, match=field):
    hf.load_adapter(d, model, strict=False)
  assert not any(hasattr(m, 'lora') for _, m in pnnx.select(model))


@pytest.mark.parametrize('extra,hint', [
    ('model.embed_tokens.lora_embedding_A', 'embedding'),
    ('model.layers.0.self_attn.q_proj.lora_magnitude_vector',
     'DoRA magnitude, but the config says use_dora=false'),
    ('model.layers.0.self_attn.q_proj.lora_B.bias', 'bias'),
])
def test_unsupported_keys(tmp_path, extra, hint):
  d = _copy_adapter('llama_lora', tmp_path)
  tensors = _tensors(d)
  tensors[PREFIX + extra] = np.zeros((4,), np.float32)
  safetensors.numpy.save_file(tensors, d / hf.ADAPTER_WEIGHTS)
  with pytest.raises(ValueError, match=hint):
    hf.load_adapter(d, tiny.load_base('llama'), strict=False)


# ---------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['llama_dora', 'gemma_dora'])
def test_dora_magnitudes_are_loaded_as_peft_wrote_them(name):
  model = hf.load_adapter(_dir(name), tiny.load_base(ADAPTERS[name]))
  st = _tensors(_dir(name))
  wrapped = [(p, m) for p, m in pnnx.select(model) if hasattr(m, 'lora')]
  assert len(wrapped) == 14
  for path, layer in wrapped:
    key = PREFIX + path.replace('/', '.') + '.lora_magnitude_vector'
    m = layer.lora.magnitude[...]
    assert m.dtype == st[key].dtype
    np.testing.assert_array_equal(np.asarray(m), st[key])
  # The magnitudes matter: PEFT's LoRA-only output (same factors) is far off.
  exp = tiny.expected(name)
  plain = tiny.load_base(ADAPTERS[name])
  d = _dir(name)
  with tempfile.TemporaryDirectory() as t:
    shutil.copytree(d, t, dirs_exist_ok=True)
    _edit_config(t, use_dora=False)
    safetensors.numpy.save_file(
        {k: v for k, v in st.items() if 'magnitude' not in k},
        os.path.join(t, hf.ADAPTER_WEIGHTS))
    hf.load_adapter(t, plain)
  assert _max_diff(tiny.logits(plain, exp['input_ids']), exp['logits']) > 0.05


def test_dora_config_and_keys_must_agree(tmp_path):
  d = _copy_adapter('llama_dora', tmp_path)
  st = _tensors(d)
  del st[PREFIX + 'model.layers.0.mlp.up_proj.lora_magnitude_vector']
  st[PREFIX + 'model.layers.1.mlp.up_proj.lora_magnitude_vector'] = np.ones(
      (3,), np.float32)
  safetensors.numpy.save_file(st, d / hf.ADAPTER_WEIGHTS)
  model = tiny.load_base('llama')
  with pytest.raises(ValueError) as e:
    hf.load_adapter(d, model)
  msg = str(e.value)
  assert 'layers.0.mlp.up_proj: use_dora=true but the file has no' in msg
  assert 'layers.1.mlp.up_proj: lora_magnitude_vector (3,)' in msg
  assert not any(hasattr(m, 'lora') for _, m in pnnx.select(model))


def test_dora_into_wrappers_and_trees(tmp_path):
  model = tiny.load_base('llama')
  pnnx.apply_lora(model, rank=4, where=r'.*q_proj', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='already has a LoRA adapter; the DoRA'):
    hf.load_adapter(_dir('llama_dora'), model)
  dora = hf.load_adapter(_dir('llama_dora'), tiny.load_base('llama'))
  with pytest.raises(ValueError, match='already has a DoRA LoRA adapter'):
    hf.load_adapter(_dir('llama_lora'), dora)
  with pytest.raises(ValueError, match='DoRA loads into NNX models'):
    hf.load_adapter(_dir('llama_dora'), _linen_params('llama'))


def test_dora_and_lora_layers_cannot_be_saved_together(tmp_path):
  model = tiny.load_base('llama')
  pnnx.apply_lora(model, rank=2, where=r'.*q_proj', dora=True,
                  rngs=nnx.Rngs(0))
  pnnx.apply_lora(model, rank=2, where=r'.*k_proj', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='some layers have DoRA adapters'):
    hf.save_adapter(tmp_path, model)


def test_dora_here_hf_here_is_exact(tmp_path):
  model = tiny.load_base('gemma')
  pnnx.apply_lora(model, rank=3, alpha=5.0, dora=True,
                  where=r'.*(q_proj|down_proj)', rngs=nnx.Rngs(1))
  key = jax.random.key(0)
  for _, layer in pnnx.select(model):
    if hasattr(layer, 'lora'):
      key, k1, k2 = jax.random.split(key, 3)
      layer.lora.b.set_value(jax.random.normal(k1, layer.lora.b.shape))
      m = layer.lora.magnitude
      m.set_value(m[...] * (1 + 0.2 * jax.random.normal(k2, m.shape)))
  hf.save_adapter(tmp_path, model)
  assert hf.read_adapter_config(tmp_path)['use_dora'] is True
  fresh = hf.load_adapter(tmp_path, tiny.load_base('gemma'))
  jax.tree.map(np.testing.assert_array_equal, _state(model), _state(fresh))
  ids = tiny.expected('gemma')['input_ids']
  np.testing.assert_array_equal(np.asarray(tiny.logits(model, ids)),
                                np.asarray(tiny.logits(fresh, ids)))


def test_rank_in_file_must_match_config(tmp_path):
  d = _copy_adapter('llama_pattern', tmp_path)
  _edit_config(d, rank_pattern={})
  with pytest.raises(ValueError, match=r'rank 2 in the file but 4'):
    hf.load_adapter(d, tiny.load_base('llama'))


def test_keys_outside_target_modules_are_errors(tmp_path):
  d = _copy_adapter('llama_lora', tmp_path)
  _edit_config(d, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj',
                                  'gate_proj', 'up_proj'])
  with pytest.raises(ValueError, match='not matched by target_modules'):
    hf.load_adapter(d, tiny.load_base('llama'))
  _edit_config(d, target_modules=TARGETS_ALL, layers_to_transform=[0])
  with pytest.raises(ValueError, match='layers.1.*not matched'):
    hf.load_adapter(d, tiny.load_base('llama'))


TARGETS_ALL = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
               'down_proj']


def test_existing_wrappers_are_reused_or_refused():
  model = tiny.load_base('llama')
  pnnx.apply_lora(model, rank=4, where=r'.*q_proj', rngs=nnx.Rngs(0))
  q = model.model.layers[0].self_attn.q_proj
  hf.load_adapter(_dir('llama_lora'), model)
  assert model.model.layers[0].self_attn.q_proj is q
  exp = tiny.expected('llama_lora')
  assert _max_diff(tiny.logits(model, exp['input_ids']), exp['logits']) < TOL
  other = tiny.load_base('llama')
  pnnx.apply_lora(other, rank=3, where=r'.*q_proj', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='do not fit'):
    hf.load_adapter(_dir('llama_lora'), other)


def test_adapter_on_a_quantized_base():
  """QLoRA: the adapter wraps int8-quantized layers; factors as in the file."""
  model = tiny.load_base('llama')
  pnnx.quantize(model, method='int8', where=r'model/layers/\d+/mlp/.*')
  hf.load_adapter(_dir('llama_lora'), model)
  down = model.model.layers[1].mlp.down_proj
  assert type(down.wrapped).__name__.startswith('Int4')
  st = _tensors(_dir('llama_lora'))
  key = PREFIX + 'model.layers.1.mlp.down_proj'
  want = 2.0 * (st[key + '.lora_B.weight'] @ st[key + '.lora_A.weight']).T
  np.testing.assert_allclose(np.asarray(down.delta()), want, atol=1e-6)
  exp = tiny.expected('llama_lora')
  # int8 weights: close to PEFT's float logits, not equal
  assert _max_diff(tiny.logits(model, exp['input_ids']), exp['logits']) < 0.05


def test_loaded_model_trains_under_jit():
  model = hf.load_adapter(_dir('llama_lora'), tiny.load_base('llama'))
  ids = jnp.asarray(tiny.expected('llama_lora')['input_ids'])
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  @jax.jit
  def loss_grad(lora, rest):
    def loss(lora):
      m = nnx.merge(gdef, lora, rest)
      return jnp.mean(m(ids) ** 2)
    return jax.grad(loss)(lora)

  grads = loss_grad(lora, rest)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 28 and all(float(jnp.abs(g).sum()) > 0 for g in leaves)


def test_named_adapters(tmp_path):
  model = hf.load_adapter(_dir('llama_lora'), tiny.load_base('llama'))
  hf.load_adapter(_dir('llama_pattern'), model, adapter_name='pattern')
  q = model.model.layers[0].self_attn.q_proj
  assert q.adapter_names == ('default', 'pattern') or len(q.adapter_names) == 2
  assert q.adapter('pattern').a.shape == (64, 2) and q.lora.a.shape == (64, 4)
  ids = tiny.expected('llama_lora')['input_ids']
  for name, active in (('llama_lora', q.adapter_names[0]),
                       ('llama_pattern', 'pattern')):
    pnnx.set_active_adapters(model, active)
    exp = tiny.expected(name)['logits']
    assert _max_diff(tiny.logits(model, ids), exp) < TOL
  hf.save_adapter(tmp_path / 'p', model, adapter_name='pattern')
  _assert_same_files(_dir('llama_pattern'), tmp_path / 'p')
  hf.save_adapter(tmp_path / 'd', model)
  _assert_same_files(_dir('llama_lora'), tmp_path / 'd')
  # A named adapter on unwrapped layers makes the wrappers with that name.
  fresh = hf.load_adapter(_dir('llama_rslora'), tiny.load_base('llama'),
                          adapter_name='rs')
  assert fresh.model.layers[1].mlp.up_proj.adapter_names == ('rs',)
  # A failing load removes the adapters it added and the wrappers it made.
  bad = tmp_path / 'bad'
  shutil.copytree(_dir('llama_pattern'), bad)
  _edit_config(bad, target_modules=TARGETS_ALL + ['nowhere'])
  with pytest.raises(ValueError, match='nowhere'):
    hf.load_adapter(bad, model, adapter_name='again')
  assert len(q.adapter_names) == 2


@pytest.mark.parametrize('named', [False, True])
def test_failure_while_wrapping_is_undone(monkeypatch, named):
  from peft.nnx import surgery
  real, calls = surgery.apply_lora, []

  def flaky(*args, **kwargs):  # the 3rd group fails
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('boom')
    return real(*args, **kwargs)

  model = tiny.load_base('llama')
  if named:
    hf.load_adapter(_dir('llama_lora'), model)
  before = {p: (type(m), getattr(m, 'adapter_names', None))
            for p, m in pnnx.select(model)}
  params = lambda m: jax.tree.map(
      np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  state = params(model)
  monkeypatch.setattr(surgery, 'apply_lora', flaky)
  with pytest.raises(RuntimeError, match='boom'):
    hf.load_adapter(_dir('llama_pattern'), model,
                    adapter_name='p' if named else None)
  assert len(calls) == 3
  after = {p: (type(m), getattr(m, 'adapter_names', None))
           for p, m in pnnx.select(model)}
  assert after == before
  jax.tree.map(np.testing.assert_array_equal, params(model), state)


# ---------------------------------------------------------------------------
# key maps
# ---------------------------------------------------------------------------


class _Renamed(nnx.Module):
  """The llama MLPs under other names: blocks[i].ff.{wi, wo}."""

  def __init__(self, base):
    self.blocks = nnx.List([])
    for layer in base.model.layers:
      ff = nnx.Module()
      ff.wi = layer.mlp.up_proj
      ff.wo = layer.mlp.down_proj
      blk = nnx.Module()
      blk.ff = ff
      self.blocks.append(blk)


_TO_JAX = [(r'^model\.layers\.(\d+)\.mlp\.up_proj$', r'blocks/\1/ff/wi'),
           (r'^model\.layers\.(\d+)\.mlp\.down_proj$', r'blocks/\1/ff/wo')]
_TO_HF = [(r'^blocks/(\d+)/ff/wi$', r'model.layers.\1.mlp.up_proj'),
          (r'^blocks/(\d+)/ff/wo$', r'model.layers.\1.mlp.down_proj')]


def _mlp_only_adapter(tmp_path):
  d = _copy_adapter('llama_lora', tmp_path)
  tensors = {k: v for k, v in _tensors(d).items()
             if 'up_proj' in k or 'down_proj' in k}
  safetensors.numpy.save_file(tensors, d / hf.ADAPTER_WEIGHTS)
  _edit_config(d, target_modules=['up_proj', 'down_proj'])
  return d


@pytest.mark.parametrize('form', ['rules', 'callable', 'keymap'])
def test_user_key_map(tmp_path, form):
  d = _mlp_only_adapter(tmp_path)
  if form == 'rules':
    km = _TO_JAX
  elif form == 'callable':
    def km(name):
      parts = name.split('.')
      return ('blocks', int(parts[2]), 'ff',
              {'up_proj': 'wi', 'down_proj': 'wo'}[parts[-1]])
  else:
    km = hf.KeyMap(to_jax=_TO_JAX, to_hf=_TO_HF)
  model = _Renamed(tiny.load_base('llama'))
  hf.load_adapter(d, model, key_map=km)
  assert model.blocks[1].ff.wo.lora.a.shape == (128, 4)
  want = _tensors(d)[PREFIX + 'model.layers.1.mlp.down_proj.lora_B.weight']
  np.testing.assert_array_equal(np.asarray(model.blocks[1].ff.wo.lora.b[...]),
                                want.T)
  with pytest.raises(ValueError, match='maps to .*no layer'):
    hf.load_adapter(d, _Renamed(tiny.load_base('llama')))  # default map
  hf.save_adapter(tmp_path / 'back', model, key_map=hf.KeyMap(to_hf=_TO_HF))
  _assert_same_files(d, tmp_path / 'back')


def test_key_map_argument_errors():
  with pytest.raises(TypeError, match='regex, replacement'):
    hf.KeyMap(to_jax=[('a', 'b', 'c')])
  with pytest.raises(ValueError, match='not a valid regex'):
    hf.KeyMap(to_jax=[('(', 'b')])
  with pytest.raises(TypeError, match='list of'):
    hf.load_adapter(_dir('llama_lora'), tiny.load_base('llama'), key_map='x')


@pytest.mark.parametrize('name', ['llama_lora', 'llama_pattern'])
def test_tunix_llama3_layout(name, tmp_path):
  """Einsum projections with split head axes, tunix's names and reshapes."""
  model = tiny.load_tunix_llama()
  exp = tiny.expected(name)
  hf.load_adapter(_dir(name), model, key_map=hf.TUNIX_LLAMA3)
  attn = model.layers[0].attn
  rank_q = 2 if name == 'llama_pattern' else 4
  assert attn.q_proj.lora.a.shape == (64, rank_q)
  assert attn.q_proj.lora.b.shape == (rank_q, 4, 16)  # [r, heads, head_dim]
  assert attn.o_proj.lora.a.shape == (4, 16, 4)  # [heads, head_dim, r]
  assert _max_diff(tiny.logits(model, exp['input_ids']), exp['logits']) < TOL
  hf.save_adapter(tmp_path / 'out', model, key_map=hf.TUNIX_LLAMA3)
  _assert_same_files(_dir(name), tmp_path / 'out')
  with pytest.raises(ValueError, match='layers/0/self_attn/q_proj'):
    hf.load_adapter(_dir(name), tiny.load_tunix_llama())  # default map


def test_kernel_batch_axes_and_stacked_layers_are_refused(tmp_path):
  d = tmp_path / 'a'
  d.mkdir()
  safetensors.numpy.save_file({
      PREFIX + 'experts.lora_A.weight': np.ones((1, 3), np.float32),
      PREFIX + 'experts.lora_B.weight': np.ones((5, 1), np.float32),
      PREFIX + 'stack.lora_A.weight': np.ones((1, 3), np.float32),
      PREFIX + 'stack.lora_B.weight': np.ones((4, 1), np.float32),
  }, d / hf.ADAPTER_WEIGHTS)
  (d / hf.ADAPTER_CONFIG).write_text(json.dumps(
      {'peft_type': 'LORA', 'r': 1, 'lora_alpha': 1,
       'target_modules': ['experts', 'stack']}))

  class M(nnx.Module):

    def __init__(self):
      self.experts = nnx.Einsum('ebd,edf->ebf', (2, 3, 5), rngs=nnx.Rngs(0))

      @nnx.vmap(in_axes=0, out_axes=0)
      def make(key):
        return nnx.Linear(3, 4, rngs=nnx.Rngs(key))

      self.stack = make(jax.random.split(jax.random.key(0), 2))

  model = M()
  with pytest.raises(ValueError) as e:
    hf.load_adapter(d, model)
  assert 'batch axes' in str(e.value) and 'stacked by nnx.vmap' in str(e.value)
  assert not any(hasattr(m, 'lora') for _, m in pnnx.select(model))
  pnnx.apply_lora(model, rank=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='batch axes'):
    hf.save_adapter(tmp_path / 'b', model)


# ---------------------------------------------------------------------------
# save errors
# ---------------------------------------------------------------------------


def test_save_refuses_to_overwrite_and_cleans_stale_shards(tmp_path):
  model = hf.load_adapter(_dir('llama_lora'), tiny.load_base('llama'))
  hf.save_adapter(tmp_path, model)
  with pytest.raises(FileExistsError, match='overwrite=True'):
    hf.save_adapter(tmp_path, model)
  (tmp_path / hf.ADAPTER_INDEX).write_text('{}')
  (tmp_path / 'adapter_model-00001-of-00002.safetensors').write_text('')
  hf.save_adapter(tmp_path, model, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == [hf.ADAPTER_CONFIG, hf.ADAPTER_WEIGHTS]
  _assert_same_files(_dir('llama_lora'), tmp_path)


def test_save_argument_errors(tmp_path):
  with pytest.raises(ValueError, match='no LoRA adapter'):
    hf.save_adapter(tmp_path / 'a', tiny.load_base('llama'))
  model = hf.load_adapter(_dir('llama_lora'), tiny.load_base('llama'))
  with pytest.raises(ValueError, match='params trees'):
    hf.save_adapter(tmp_path / 'b', model, alpha=8)
  with pytest.raises(TypeError, match='nnx.Module or a linen params dict'):
    hf.save_adapter(tmp_path / 'c', [1, 2])
  with pytest.raises(TypeError, match='directory must be a path'):
    hf.save_adapter(3, model)
  with pytest.raises(ValueError, match='14 layers map'):
    hf.save_adapter(tmp_path / 'd', model, key_map=lambda p: 'same')
  assert not (tmp_path / 'd').exists() or not os.listdir(tmp_path / 'd')


def test_load_argument_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a PEFT adapter directory'):
    hf.load_adapter(tmp_path, tiny.load_base('llama'))
  with pytest.raises(TypeError, match='nnx.Module or a linen params dict'):
    hf.load_adapter(_dir('llama_lora'), 'model')
  with pytest.raises(TypeError, match='strict must be a bool'):
    hf.load_adapter(_dir('llama_lora'), tiny.load_base('llama'), strict=1)
  with pytest.raises(ValueError, match='fold_scale= is for params trees'):
    hf.load_adapter(_dir('llama_lora'), tiny.load_base('llama'),
                    fold_scale=False)
  with pytest.raises(ValueError, match='rngs= and adapter_name= are for NNX models'):
    hf.load_adapter(_dir('llama_lora'), _linen_params('llama'),
                    rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------
# here -> HF: adapters for make_hf_adapters.py --check
# ---------------------------------------------------------------------------


def write_check_dir(directory):
  """Adapters trained/perturbed here + our logits, for `--check DIR`."""
  directory = pathlib.Path(directory)
  written = []
  for name, base, rslora_as_alpha in (
      ('llama_lora', 'llama', False), ('llama_pattern', 'llama', False),
      ('llama_rslora', 'llama', False), ('llama_rslora', 'llama', True),
      ('gemma_lora', 'gemma', False), ('llama_bf16', 'llama', False),
      ('llama_dora', 'llama', False), ('gemma_dora', 'gemma', False)):
    model = hf.load_adapter(_dir(name), tiny.load_base(base))
    ids = jnp.asarray(tiny.expected(name)['input_ids'])
    # A few SGD steps on the LoRA factors: the adapter is ours now.
    tiny.train_adapter(model, ids)
    out = directory / (f'{name}_as_alpha' if rslora_as_alpha else name)
    hf.save_adapter(out, model, base_model_name_or_path=base,
                    rslora_as_alpha=rslora_as_alpha, overwrite=True)
    safetensors.numpy.save_file(
        {'input_ids': np.asarray(ids, np.int64),
         'logits': np.asarray(tiny.logits(model, ids), np.float32)},
        out / 'ours.safetensors', metadata={'base': base})
    written.append(out)
  return written


def test_trained_adapters_reload_with_our_logits(tmp_path):
  for out in write_check_dir(tmp_path):
    ours = safetensors.numpy.load_file(out / 'ours.safetensors')
    base = hf.read_adapter_config(out)['base_model_name_or_path']
    model = hf.load_adapter(out, tiny.load_base(base))
    got = tiny.logits(model, ours['input_ids'])
    np.testing.assert_array_equal(np.asarray(got), ours['logits'])
    ref = tiny.expected(out.name.replace('_as_alpha', ''))['logits']
    assert _max_diff(ours['logits'], ref) > 1e-3  # training changed it


if __name__ == '__main__':
  for path in write_check_dir(sys.argv[1]):
    print(path)

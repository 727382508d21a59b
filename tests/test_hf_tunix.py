"""peft.hf on tunix's real NNX Llama3 and Gemma, against PEFT's golden logits.

The base weights are the tiny fixtures of tests/fixtures/make_hf_adapters.py:
tunix's Llama3 reads `llama_tunix/model.safetensors` with its own loader
(`tunix.models.llama3.params.create_model_from_safe_tensors`; that fixture
uses RoPE theta 1e6, the theta tunix's Llama3 forward computes with whatever
the config says). tunix's Gemma loader expects Gemma2 names (it maps HF's
`post_attention_layernorm` to the post-attention norm Gemma 1 does not have),
so the Gemma fixture is mapped here as tunix reshapes it: `q_proj.weight`
transposed, split to `[embed, heads, head_dim]`, moved to `[heads, embed,
head_dim]`; k and v the same and stacked into `kv_einsum` `[2, kv_heads,
embed, head_dim]`; `o_proj` to `[heads, head_dim, embed]`.

Run as a script, `python tests/test_hf_tunix.py DIR` writes adapters trained
here on the tunix models (plus our logits) for `make_hf_adapters.py --check`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile

import flax
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

import peft.nnx as pnnx  # noqa: E402
from peft import hf  # noqa: E402
from peft.hf import _fused  # noqa: E402

from _tunix import WARNING_FILTERS  # noqa: E402
from _tunix import import_tunix  # noqa: E402
from _tunix import tunix_flax_config  # noqa: E402,F401  (autouse fixture)

llama3, llama3_params, gemma = import_tunix(
    'tunix.models.llama3.model', 'tunix.models.llama3.params',
    'tunix.models.gemma.model')

pytestmark = WARNING_FILTERS + [
    # tunix's safetensors loader calls State.to_pure_dict (flax warns).
    pytest.mark.filterwarnings(
        'ignore:`flax.nnx.State` will be deprecated:DeprecationWarning'),
]

TOL = 1e-4
PREFIX = 'base_model.model.'
LLAMA = {'llama_tunix_lora': 'llama_tunix', 'llama_tunix_dora': 'llama_tunix'}
GEMMA = {'gemma_lora': 'gemma', 'gemma_dora': 'gemma'}


def _max_diff(x, y):
  return float(np.max(np.abs(np.asarray(x, np.float32)
                             - np.asarray(y, np.float32))))


def load_llama3() -> nnx.Module:
  """tunix's Llama3 from the `llama_tunix` fixture, by tunix's own loader."""
  cfg = tiny.config('llama_tunix')
  config = llama3.ModelConfig(
      num_layers=cfg['num_hidden_layers'], vocab_size=cfg['vocab_size'],
      embed_dim=cfg['hidden_size'], hidden_dim=cfg['intermediate_size'],
      num_heads=cfg['num_attention_heads'], head_dim=cfg['head_dim'],
      num_kv_heads=cfg['num_key_value_heads'],
      rope_theta=int(cfg['rope_theta']), norm_eps=cfg['rms_norm_eps'])
  with tempfile.TemporaryDirectory() as d:  # the loader reads every file
    shutil.copy(tiny.FIXTURES / 'llama_tunix' / 'model.safetensors', d)
    return llama3_params.create_model_from_safe_tensors(d, config)


def load_gemma() -> nnx.Module:
  """tunix's Gemma with the `gemma` fixture's weights, reshaped like tunix."""
  cfg = tiny.config('gemma')
  d, h, kv, hd = (cfg['hidden_size'], cfg['num_attention_heads'],
                  cfg['num_key_value_heads'], cfg['head_dim'])
  n = cfg['num_hidden_layers']
  config = gemma.ModelConfig(
      num_layers=n, num_embed=cfg['vocab_size'], embed_dim=d,
      hidden_dim=cfg['intermediate_size'], num_heads=h, head_dim=hd,
      num_kv_heads=kv, final_logit_softcap=None, use_post_attn_norm=False,
      use_post_ffw_norm=False,
      attention_types=(gemma.AttentionType.GLOBAL,) * n)
  assert cfg['rope_theta'] == 10_000 and cfg['rms_norm_eps'] == 1e-6
  model = gemma.Gemma(config, rngs=nnx.Rngs(0))
  w = tiny.base_weights('gemma')
  model.embedder.input_embedding.set_value(
      jnp.asarray(w['model.embed_tokens.weight']))
  model.final_norm.scale.set_value(jnp.asarray(w['model.norm.weight']))
  for i, layer in enumerate(model.layers):
    pre = f'model.layers.{i}.'

    def split(key, *shape, pre=pre):
      t = w[pre + key + '.weight'].T
      return t.reshape(shape) if shape else t

    attn = layer.attn
    attn.q_einsum.w.set_value(jnp.asarray(
        split('self_attn.q_proj', d, h, hd).transpose(1, 0, 2)))
    attn.kv_einsum.w.set_value(jnp.asarray(np.stack([
        split(f'self_attn.{x}_proj', d, kv, hd).transpose(1, 0, 2)
        for x in 'kv'])))
    attn.attn_vec_einsum.w.set_value(jnp.asarray(
        split('self_attn.o_proj', h, hd, d)))
    for x in ('gate_proj', 'up_proj', 'down_proj'):
      getattr(layer.mlp, x).kernel.set_value(jnp.asarray(split('mlp.' + x)))
    layer.pre_attention_norm.scale.set_value(
        jnp.asarray(w[pre + 'input_layernorm.weight']))
    layer.pre_ffw_norm.scale.set_value(
        jnp.asarray(w[pre + 'post_attention_layernorm.weight']))
  return model


def logits(model, ids):
  ids = jnp.asarray(ids, jnp.int32)
  b, l = ids.shape
  out, _ = model(ids, jnp.broadcast_to(jnp.arange(l), (b, l)), None,
                 jnp.broadcast_to(jnp.tril(jnp.ones((l, l), bool)), (b, l, l)))
  return out


_LOADERS = {'llama_tunix': (load_llama3, hf.TUNIX_LLAMA3),
            'gemma': (load_gemma, hf.TUNIX_GEMMA)}


def _tensors(directory):
  return safetensors.numpy.load_file(
      pathlib.Path(directory) / hf.ADAPTER_WEIGHTS)


def _assert_same_files(src, dst):
  a, b = _tensors(src), _tensors(dst)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  ca, cb = hf.read_adapter_config(src), hf.read_adapter_config(dst)
  for field in ('r', 'lora_alpha', 'use_rslora', 'use_dora', 'rank_pattern',
                'alpha_pattern'):
    assert ca.get(field) == cb.get(field), field


# ---------------------------------------------------------------------------
# logits: tunix model + adapter loaded here == PEFT
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('base', sorted(_LOADERS))
def test_tunix_base_matches_transformers(base):
  exp = tiny.expected(base)
  got = logits(_LOADERS[base][0](), exp['input_ids'])
  assert _max_diff(got, exp['logits']) < TOL


@pytest.mark.parametrize('name', sorted({**LLAMA, **GEMMA}))
def test_tunix_logits_match_peft(name, tmp_path):
  base = {**LLAMA, **GEMMA}[name]
  load, key_map = _LOADERS[base]
  model = load()
  exp = tiny.expected(name)
  assert hf.load_adapter(tiny.FIXTURES / name, model, key_map=key_map) is model
  got = logits(model, exp['input_ids'])
  assert _max_diff(got, exp['logits']) < TOL
  assert _max_diff(tiny.expected(base)['logits'], exp['logits']) > 0.1
  wrapped = [p for p, m in pnnx.select(model) if hasattr(m, 'lora')]
  assert len(wrapped) == (12 if base == 'gemma' else 14)  # kv fused in Gemma
  hf.save_adapter(tmp_path / 'out', model, key_map=key_map)
  _assert_same_files(tiny.FIXTURES / name, tmp_path / 'out')


def test_gemma_kv_adapters_share_one_lora():
  """k and v (own lora_A each) -> one LoRA of rank 2r, b block-diagonal."""
  model = hf.load_adapter(tiny.FIXTURES / 'gemma_dora', load_gemma(),
                          key_map=hf.TUNIX_GEMMA)
  st_ = _tensors(tiny.FIXTURES / 'gemma_dora')
  kv = model.layers[1].attn.kv_einsum.lora
  assert kv.a.shape == (64, 8) and kv.b.shape == (8, 2, 1, 16)
  assert kv.magnitude.shape == (2, 1, 16)
  key = PREFIX + 'model.layers.1.self_attn.'
  a, b = np.asarray(kv.a[...]), np.asarray(kv.b[...])
  np.testing.assert_array_equal(a[:, :4], st_[key + 'k_proj.lora_A.weight'].T)
  np.testing.assert_array_equal(a[:, 4:], st_[key + 'v_proj.lora_A.weight'].T)
  np.testing.assert_array_equal(b[:4, 0].reshape(4, 16),
                                st_[key + 'k_proj.lora_B.weight'].T)
  np.testing.assert_array_equal(b[4:, 1].reshape(4, 16),
                                st_[key + 'v_proj.lora_B.weight'].T)
  assert not b[4:, 0].any() and not b[:4, 1].any()
  np.testing.assert_array_equal(
      np.asarray(kv.magnitude[...]).reshape(2, 16),
      np.stack([st_[key + f'{x}_proj.lora_magnitude_vector'] for x in 'kv']))
  assert float(kv.scale[...]) == 16 / 4  # the scale of rank 4, not 8
  q = model.layers[1].attn.q_einsum.lora
  assert q.a.shape == (64, 4) and q.b.shape == (4, 4, 16)
  assert model.layers[1].attn.attn_vec_einsum.lora.a.shape == (4, 16, 4)


def test_gemma_trained_here_shared_a_round_trip(tmp_path):
  """A LoRA trained on kv_einsum (one `a`) saves as k and v with equal A."""
  model = load_gemma()
  pnnx.apply_lora(model, rank=3, alpha=6.0, where=r'.*attn/.*',
                  rngs=nnx.Rngs(1))
  key = jax.random.key(0)
  for _, layer in pnnx.select(model):
    if hasattr(layer, 'lora'):
      key, sub = jax.random.split(key)
      layer.lora.b.set_value(jax.random.normal(sub, layer.lora.b.shape))
  hf.save_adapter(tmp_path, model, key_map=hf.TUNIX_GEMMA)
  st_ = _tensors(tmp_path)
  key = PREFIX + 'model.layers.0.self_attn.'
  np.testing.assert_array_equal(st_[key + 'k_proj.lora_A.weight'],
                                st_[key + 'v_proj.lora_A.weight'])
  assert st_[key + 'v_proj.lora_B.weight'].shape == (16, 3)
  cfg = hf.read_adapter_config(tmp_path)
  assert cfg['r'] == 3 and cfg['lora_alpha'] == 6
  assert sorted(cfg['target_modules']) == ['k_proj', 'o_proj', 'q_proj',
                                           'v_proj']
  fresh = hf.load_adapter(tmp_path, load_gemma(), key_map=hf.TUNIX_GEMMA)
  state = lambda m: jax.tree.map(np.asarray, nnx.to_pure_dict(
      nnx.state(m, nnx.LoRAParam)))
  jax.tree.map(np.testing.assert_array_equal, state(model), state(fresh))
  ids = tiny.expected('gemma')['input_ids']
  np.testing.assert_array_equal(np.asarray(logits(model, ids)),
                                np.asarray(logits(fresh, ids)))


def _edit(directory, drop=(), config=None, **tensors):
  st_ = {k: v for k, v in _tensors(directory).items()
         if not any(d in k for d in drop)}
  st_.update({PREFIX + k: v for k, v in tensors.items()})
  safetensors.numpy.save_file(st_, directory / hf.ADAPTER_WEIGHTS)
  if config:
    path = directory / hf.ADAPTER_CONFIG
    cfg = json.loads(path.read_text())
    cfg.update(config)
    path.write_text(json.dumps(cfg))


def test_gemma_fused_errors(tmp_path):
  src = tiny.FIXTURES / 'gemma_lora'
  ranks = tmp_path / 'ranks'
  shutil.copytree(src, ranks)
  _edit(ranks, drop=['layers.0.self_attn.v_proj'],
        config={'rank_pattern': {r'model\.layers\.0\.self_attn\.v_proj': 2}},
        **{'model.layers.0.self_attn.v_proj.lora_A.weight':
           np.ones((2, 64), np.float32),
           'model.layers.0.self_attn.v_proj.lora_B.weight':
           np.ones((16, 2), np.float32)})
  missing = tmp_path / 'missing'
  shutil.copytree(src, missing)
  _edit(missing, drop=['layers.1.self_attn.k_proj'])
  alpha = tmp_path / 'alpha'
  shutil.copytree(src, alpha)
  _edit(alpha, config={'alpha_pattern': {'v_proj': 3}})
  for d, match in (
      (ranks, r'layers/0/attn/kv_einsum: the modules of a fused layer must'
              r' agree on the rank; got \[4, 2\]'),
      (missing, r'layers/1/attn/kv_einsum: a fused layer needs an adapter for'
                r' every slot; slots \[0\] have none'),
      (alpha, r'agree on the scale')):
    model = load_gemma()
    with pytest.raises(ValueError, match=match):
      hf.load_adapter(d, model, key_map=hf.TUNIX_GEMMA)
    assert not any(hasattr(m, 'lora') for _, m in pnnx.select(model))
  with pytest.raises(ValueError, match='fused layers load into NNX models'):
    hf.load_adapter(src, {'layers': {}}, key_map=hf.TUNIX_GEMMA)
  # The MHA map on a GQA model: its slots name a layer the model lacks.
  with pytest.raises(ValueError, match=r'qkv_einsum\[0\].*no layer'):
    hf.load_adapter(src, load_gemma(), key_map=hf.TUNIX_GEMMA_QKV)


def test_gemma_qkv_map_equals_merged_weights(tmp_path):
  """TUNIX_GEMMA_QKV (heads == kv heads): q, k, v are slots of qkv_einsum.

  Reference: the HF updates `s * B @ A` merged into the base kernels with
  tunix's own reshapes (the transpose, split and move of its loader).
  """
  d, h, hd, r, alpha = 32, 2, 8, 2, 6.0
  config = gemma.ModelConfig(
      num_layers=1, num_embed=64, embed_dim=d, hidden_dim=48, num_heads=h,
      head_dim=hd, num_kv_heads=h, final_logit_softcap=None,
      use_post_attn_norm=False, use_post_ffw_norm=False,
      attention_types=(gemma.AttentionType.GLOBAL,))
  rng = np.random.default_rng(0)
  tensors = {}
  for n in ('q', 'k', 'v', 'o'):
    key = f'{PREFIX}model.layers.0.self_attn.{n}_proj'
    tensors[key + '.lora_A.weight'] = rng.standard_normal(
        (r, h * hd if n == 'o' else d)).astype(np.float32)
    tensors[key + '.lora_B.weight'] = rng.standard_normal(
        (d if n == 'o' else h * hd, r)).astype(np.float32)
  safetensors.numpy.save_file(tensors, tmp_path / hf.ADAPTER_WEIGHTS)
  (tmp_path / hf.ADAPTER_CONFIG).write_text(json.dumps(
      {'peft_type': 'LORA', 'r': r, 'lora_alpha': alpha,
       'target_modules': ['q_proj', 'k_proj', 'v_proj', 'o_proj']}))
  model = gemma.Gemma(config, rngs=nnx.Rngs(0))
  hf.load_adapter(tmp_path, model, key_map=hf.TUNIX_GEMMA_QKV)
  qkv = model.layers[0].attn.qkv_einsum.lora
  assert qkv.a.shape == (d, 3 * r) and qkv.b.shape == (3 * r, 3, h, hd)
  merged = gemma.Gemma(config, rngs=nnx.Rngs(0))
  attn = merged.layers[0].attn

  def delta(n):
    key = f'{PREFIX}model.layers.0.self_attn.{n}_proj'
    return (alpha / r) * (tensors[key + '.lora_B.weight']
                          @ tensors[key + '.lora_A.weight'])

  w = np.array(attn.qkv_einsum.w[...])
  for c, n in enumerate('qkv'):
    w[c] += delta(n).T.reshape(d, h, hd).transpose(1, 0, 2)
  attn.qkv_einsum.w.set_value(jnp.asarray(w))
  attn.attn_vec_einsum.w.set_value(
      attn.attn_vec_einsum.w[...] + delta('o').T.reshape(h, hd, d))
  ids = rng.integers(0, 64, (2, 5))
  want, got = logits(merged, ids), logits(model, ids)
  assert _max_diff(want, logits(gemma.Gemma(config, rngs=nnx.Rngs(0)),
                                ids)) > 1e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  hf.save_adapter(tmp_path / 'out', model, key_map=hf.TUNIX_GEMMA_QKV)
  back = _tensors(tmp_path / 'out')
  assert sorted(back) == sorted(tensors)
  assert all(back[k].tobytes() == tensors[k].tobytes() for k in tensors)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(count=st.sampled_from([2, 3]), r=st.integers(1, 3),
                  shared=st.booleans(), dora=st.booleans(),
                  seed=st.integers(0, 2**16))
def test_fuse_and_split_are_inverse(count, r, shared, dora, seed):
  """HF slots -> one (a, b) -> HF slots gives the same arrays."""
  rng = np.random.default_rng(seed)
  n_in, n_out = 5, 6
  a0 = rng.standard_normal((r, n_in)).astype(np.float32)
  slots = {}
  for c in range(count):
    a = a0 if shared else rng.standard_normal((r, n_in)).astype(np.float32)
    slots[c] = hf._Module(
        name=f'm{c}', lora_a=a,
        lora_b=rng.standard_normal((n_out, r)).astype(np.float32), rank=r,
        alpha=2.0, magnitude=(rng.standard_normal(n_out).astype(np.float32)
                              if dora else None))
  errors = []
  mod = _fused._fuse('x', slots, errors)
  assert not errors and mod.rank == (r if shared or count == 1 else count * r)
  assert mod.scale == 2.0 / r
  a, b = hf._factors_from_hf(mod.lora_a, mod.lora_b, (n_in, mod.rank),
                             (mod.rank, count, n_out))
  magnitude = None if not dora else mod.magnitude.reshape(count, n_out)
  for c, (ac, bc, mc) in enumerate(_fused._split_fused(a, b, magnitude)):
    np.testing.assert_array_equal(ac.T, slots[c].lora_a)
    np.testing.assert_array_equal(bc.T, slots[c].lora_b)
    if dora:
      np.testing.assert_array_equal(mc, slots[c].magnitude)


# ---------------------------------------------------------------------------
# here -> HF: adapters trained on tunix models, for make_hf_adapters.py --check
# ---------------------------------------------------------------------------


def write_check_dir(directory):
  """LoRA / DoRA adapters trained here on tunix's models + our logits."""
  directory = pathlib.Path(directory)
  written = []
  for name, base in (('llama_tunix_lora', 'llama_tunix'),
                     ('llama_tunix_dora', 'llama_tunix'),
                     ('gemma_lora', 'gemma'), ('gemma_dora', 'gemma')):
    load, key_map = _LOADERS[base]
    model = hf.load_adapter(tiny.FIXTURES / name, load(), key_map=key_map)
    ids = jnp.asarray(tiny.expected(name)['input_ids'], jnp.int32)
    tiny.train_adapter(model, ids, logits)
    out = directory / f'tunix_{name}'
    hf.save_adapter(out, model, key_map=key_map, base_model_name_or_path=base,
                    overwrite=True)
    safetensors.numpy.save_file(
        {'input_ids': np.asarray(ids, np.int64),
         'logits': np.asarray(logits(model, ids), np.float32)},
        out / 'ours.safetensors', metadata={'base': base})
    written.append(out)
  return written


def test_trained_adapters_reload_with_our_logits(tmp_path):
  for out in write_check_dir(tmp_path):
    ours = safetensors.numpy.load_file(out / 'ours.safetensors')
    base = hf.read_adapter_config(out)['base_model_name_or_path']
    load, key_map = _LOADERS[base]
    model = hf.load_adapter(out, load(), key_map=key_map)
    np.testing.assert_array_equal(
        np.asarray(logits(model, ours['input_ids'])), ours['logits'])
    ref = tiny.expected(out.name[len('tunix_'):])['logits']
    assert _max_diff(ours['logits'], ref) > 1e-3  # training changed it


if __name__ == '__main__':
  flax.config.update('flax_always_shard_variable', False)
  for path in write_check_dir(sys.argv[1]):
    print(path)

"""A pure-JAX Llama / Gemma forward pass for the tiny fixture models (tests only).

An NNX model whose attribute names follow the Hugging Face PyTorch module
names (`model.layers[0].self_attn.q_proj` is an `nnx.Linear`), so the HF
module path read with dots as keys is the JAX path. It reads the base
weights that `tests/fixtures/make_hf_adapters.py` saved with transformers'
`save_pretrained` and computes the logits transformers computes (float32,
no cache, no padding).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'hf'
_HI = jax.lax.Precision.HIGHEST


def _linear(n_in, n_out, rngs):
  return nnx.Linear(n_in, n_out, use_bias=False, precision=_HI, rngs=rngs)


class RMSNorm(nnx.Module):

  def __init__(self, dim, eps, gemma):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps
    self.gemma = gemma

  def __call__(self, x):
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    w = self.weight[...]
    return x * (1.0 + w) if self.gemma else w * x


class Attention(nnx.Module):

  def __init__(self, cfg, rngs):
    d, h, kv, hd = (cfg['hidden_size'], cfg['num_attention_heads'],
                    cfg['num_key_value_heads'], cfg['head_dim'])
    self.q_proj = _linear(d, h * hd, rngs)
    self.k_proj = _linear(d, kv * hd, rngs)
    self.v_proj = _linear(d, kv * hd, rngs)
    self.o_proj = _linear(h * hd, d, rngs)
    self.heads, self.kv_heads, self.head_dim = h, kv, hd
    self.theta = cfg['rope_theta']

  def _rope(self, x):  # x: [B, T, H, hd], HF's rotate_half convention
    t = x.shape[1]
    inv = 1.0 / (self.theta ** (jnp.arange(0, self.head_dim, 2,
                                           dtype=jnp.float32) / self.head_dim))
    freqs = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb)[None, :, None], jnp.sin(emb)[None, :, None]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin

  def _project(self, x):  # -> q, k, v: [B, T, heads, head_dim]
    b, t, _ = x.shape
    return (self.q_proj(x).reshape(b, t, self.heads, self.head_dim),
            self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim),
            self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim))

  def _out(self, o):  # [B, T, heads, head_dim] -> [B, T, D]
    b, t = o.shape[:2]
    return self.o_proj(o.reshape(b, t, self.heads * self.head_dim))

  def __call__(self, x):
    t = x.shape[1]
    q, k, v = self._project(x)
    q, k = self._rope(q), self._rope(k)
    rep = self.heads // self.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=_HI)
    s = s / np.sqrt(self.head_dim).astype(np.float32)
    mask = jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum('bhqk,bkhd->bqhd', p, v, precision=_HI)
    return self._out(o)


class TunixAttention(Attention):
  """tunix's Llama3 / Qwen layout: Einsum projections with split head axes.

  `q_proj` kernel `[embed, heads, head_dim]`, `o_proj` `[heads, head_dim,
  embed]` (tunix's `q_proj.w` / `o_proj.w`; here `nnx.Einsum`, which has the
  same geometry).
  """

  def __init__(self, cfg, rngs):  # pylint: disable=super-init-not-called
    d, h, kv, hd = (cfg['hidden_size'], cfg['num_attention_heads'],
                    cfg['num_key_value_heads'], cfg['head_dim'])
    ein = lambda s, shape: nnx.Einsum(s, shape, precision=_HI, rngs=rngs)
    self.q_proj = ein('BTD,DNH->BTNH', (d, h, hd))
    self.k_proj = ein('BTD,DKH->BTKH', (d, kv, hd))
    self.v_proj = ein('BTD,DKH->BTKH', (d, kv, hd))
    self.o_proj = ein('BTNH,NHD->BTD', (h, hd, d))
    self.heads, self.kv_heads, self.head_dim = h, kv, hd
    self.theta = cfg['rope_theta']

  def _project(self, x):
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)

  def _out(self, o):
    return self.o_proj(o)


class MLP(nnx.Module):

  def __init__(self, cfg, rngs):
    d, f = cfg['hidden_size'], cfg['intermediate_size']
    self.gate_proj = _linear(d, f, rngs)
    self.up_proj = _linear(d, f, rngs)
    self.down_proj = _linear(f, d, rngs)
    self.gelu = cfg['model_type'] == 'gemma'

  def __call__(self, x):
    g = self.gate_proj(x)
    g = jax.nn.gelu(g, approximate=True) if self.gelu else jax.nn.silu(g)
    return self.down_proj(g * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg, rngs):
    gemma = cfg['model_type'] == 'gemma'
    eps = cfg['rms_norm_eps']
    self.self_attn = Attention(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.input_layernorm = RMSNorm(cfg['hidden_size'], eps, gemma)
    self.post_attention_layernorm = RMSNorm(cfg['hidden_size'], eps, gemma)

  def __call__(self, x):
    x = x + self.self_attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))


class TunixBlock(DecoderLayer):

  def __init__(self, cfg, rngs):  # pylint: disable=super-init-not-called
    eps = cfg['rms_norm_eps']
    self.attn = TunixAttention(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.input_layernorm = RMSNorm(cfg['hidden_size'], eps, False)
    self.post_attention_layernorm = RMSNorm(cfg['hidden_size'], eps, False)

  def __call__(self, x):
    x = x + self.attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))


class TunixLlama(nnx.Module):
  """The tiny Llama in tunix's Llama3 layout (`layers[i].attn.q_proj`...)."""

  def __init__(self, cfg, rngs):
    self.embedder = nnx.Embed(cfg['vocab_size'], cfg['hidden_size'],
                              rngs=rngs)
    self.layers = nnx.List([TunixBlock(cfg, rngs)
                            for _ in range(cfg['num_hidden_layers'])])
    self.final_norm = RMSNorm(cfg['hidden_size'], cfg['rms_norm_eps'], False)
    self.lm_head = _linear(cfg['hidden_size'], cfg['vocab_size'], rngs)

  def __call__(self, ids):
    x = self.embedder(ids)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.final_norm(x))


def load_tunix_llama(weights=None) -> TunixLlama:
  """The llama fixture in tunix's layout, with tunix's weight transforms.

  `q/k/v_proj.weight` are transposed, then reshaped to `(embed, heads,
  head_dim)`, `o_proj.weight` to `(heads, head_dim, embed)` (row-major), as
  `tunix.models.llama3.params` does.
  """
  cfg = config('llama')
  model = TunixLlama(cfg, nnx.Rngs(0))
  weights = base_weights('llama') if weights is None else weights
  d, h, kv, hd = (cfg['hidden_size'], cfg['num_attention_heads'],
                  cfg['num_key_value_heads'], cfg['head_dim'])
  shapes = {'q_proj': (d, h, hd), 'k_proj': (d, kv, hd),
            'v_proj': (d, kv, hd), 'o_proj': (h, hd, d)}
  model.embedder.embedding.set_value(
      jnp.asarray(weights['model.embed_tokens.weight']))
  model.final_norm.weight.set_value(jnp.asarray(weights['model.norm.weight']))
  model.lm_head.kernel.set_value(jnp.asarray(weights['lm_head.weight'].T))
  for i, layer in enumerate(model.layers):
    pre = f'model.layers.{i}.'
    for n, shape in shapes.items():
      w = weights[pre + f'self_attn.{n}.weight'].T.reshape(shape)
      getattr(layer.attn, n).kernel.set_value(jnp.asarray(w))
    for n in ('gate_proj', 'up_proj', 'down_proj'):
      getattr(layer.mlp, n).kernel.set_value(
          jnp.asarray(weights[pre + f'mlp.{n}.weight'].T))
    for n in ('input_layernorm', 'post_attention_layernorm'):
      getattr(layer, n).weight.set_value(
          jnp.asarray(weights[pre + f'{n}.weight']))
  return model


class Model(nnx.Module):

  def __init__(self, cfg, rngs):
    self.embed_tokens = nnx.Embed(cfg['vocab_size'], cfg['hidden_size'],
                                  rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs)
                            for _ in range(cfg['num_hidden_layers'])])
    self.norm = RMSNorm(cfg['hidden_size'], cfg['rms_norm_eps'],
                        cfg['model_type'] == 'gemma')
    self.normalizer = (float(np.float32(cfg['hidden_size'] ** 0.5))
                       if cfg['model_type'] == 'gemma' else None)

  def __call__(self, ids):
    x = self.embed_tokens(ids)
    if self.normalizer is not None:
      x = x * jnp.float32(self.normalizer)
    for layer in self.layers:
      x = layer(x)
    return self.norm(x)


class CausalLM(nnx.Module):
  """`model` + `lm_head` (tied to the embedding when the config says so)."""

  def __init__(self, cfg, rngs):
    self.model = Model(cfg, rngs)
    self.tied = bool(cfg.get('tie_word_embeddings',
                             cfg['model_type'] == 'gemma'))
    if not self.tied:
      self.lm_head = _linear(cfg['hidden_size'], cfg['vocab_size'], rngs)

  def __call__(self, ids):
    h = self.model(ids)
    if self.tied:
      return jnp.einsum('btd,vd->btv', h, self.model.embed_tokens.embedding[...],
                        precision=_HI)
    return self.lm_head(h)


def config(name):
  return json.loads((FIXTURES / name / 'config.json').read_text())


def base_weights(name) -> dict[str, np.ndarray]:
  """The fixture's PyTorch state dict (HF names, `[out, in]` weights)."""
  return safetensors.numpy.load_file(FIXTURES / name / 'model.safetensors')


def load_base(name) -> CausalLM:
  """The tiny `llama` / `gemma` fixture model with its base weights loaded."""
  cfg = config(name)
  model = CausalLM(cfg, nnx.Rngs(0))
  weights = base_weights(name)
  used = set()
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    keys = [str(k) for k in path]
    if keys[-1] == 'kernel':
      key = '.'.join(keys[:-1]) + '.weight'
      value = weights[key].T
    elif keys[-1] == 'embedding':
      key = '.'.join(keys[:-1]) + '.weight'
      value = weights[key]
    elif keys[-1] == 'weight':
      key = '.'.join(keys)
      value = weights[key]
    else:
      continue
    if tuple(var.get_value().shape) != value.shape:
      raise ValueError(f'{key}: {value.shape} vs {var.get_value().shape}')
    var.set_value(jnp.asarray(value))
    used.add(key)
  unused = set(weights) - used
  if unused:
    raise ValueError(f'unused base weights: {sorted(unused)}')
  return model


def expected(name) -> dict[str, np.ndarray]:
  """`input_ids`, `logits` (and `merged_logits`) the fixture script saved."""
  return safetensors.numpy.load_file(FIXTURES / name / 'expected.safetensors')


@nnx.jit
def logits(model, ids):
  return model(ids)


def train_adapter(model, ids, forward=lambda m, ids: m(ids), steps=3):
  """A few SGD steps (lr 0.5) on the model's LoRA params, in place.

  The loss is the next-token cross-entropy of `forward(model, ids)`; used to
  make adapters that differ from the fixtures (`--check` mode).
  """
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(lora):
    out = forward(nnx.merge(gdef, lora, rest), ids)
    logp = jax.nn.log_softmax(out.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(
        logp[:, :-1], ids[:, 1:, None], axis=-1))

  step = jax.jit(lambda l: jax.tree.map(
      lambda p, g: (p - 0.5 * g).astype(p.dtype), l, jax.grad(loss)(l)))
  for _ in range(steps):
    lora = step(lora)
  nnx.update(model, lora)
  return model

"""Sharded LoRA / QLoRA training on a 2x4 device mesh; run by test_sharding.py.

Not a test module (the leading underscore keeps pytest away): it needs 8
devices, so `tests/test_sharding.py` runs it in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and reads the JSON it
prints on its last line. Every scenario records the losses of a few jitted
LoRA-only train steps and the `PartitionSpec` of every LoRA factor and every
piece of quantized storage (before and after the step), so the test can
compare them with the specs it derives from the kernels' sharding names.

Mesh: `jax.make_mesh((2, 4), ('data', 'model'), axis_types=Auto)`. Auto axes
are what GSPMD-style user code (MaxText-like: annotate params, let the compiler
propagate) runs with; Explicit axes would need `out_sharding=` on every matmul
whose contracting dim is sharded, which no flax layer passes by default.

Usage: python tests/_sharding_script.py [nnx_lora nnx_qlora linen_lora ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
from flax import nnx
import flax.linen as nn
import optax

D, H, K, F, V = 64, 4, 16, 256, 128  # model, heads, head dim, mlp, vocab
B, T = 8, 16  # batch, sequence
STEPS = 3
LR = 0.5

# Kernel sharding names (mesh axis names used directly as logical names).
# 'data' also shards parameters (FSDP-style) so that both a and b of every
# layer carry a non-trivial axis.
NAMES = {
    'attn/q': ('data', 'model', None),   # Einsum 'btd,dhk->bthk'
    'attn/k': ('data', 'model', None),
    'attn/v': ('data', 'model', None),
    'attn/o': ('model', None, 'data'),   # Einsum 'bthk,hkd->btd'
    'mlp/up': ('data', 'model'),         # Linear D -> F
    'mlp/down': ('model', 'data'),       # Linear F -> D
    'head': ('data', 'model'),           # LinearGeneral D -> V
}


def _spec(x) -> list | None:
  """The PartitionSpec of a jax array as a JSON list (None if not Named)."""
  sharding = getattr(x, 'sharding', None)
  if not isinstance(sharding, NamedSharding):
    return None
  spec = list(sharding.spec)
  # Normalise: trailing unsharded axes may be omitted by jax.
  spec += [None] * (x.ndim - len(spec))
  return [s if s is None or isinstance(s, str) else list(s) for s in spec]


def _mesh():
  return jax.make_mesh((2, 4), ('data', 'model'),
                       axis_types=(AxisType.Auto, AxisType.Auto))


def _data(mesh):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, size=(B, T + 1))
  x = jax.device_put(tokens[:, :-1], NamedSharding(mesh, P('data')))
  y = jax.device_put(tokens[:, 1:], NamedSharding(mesh, P('data')))
  return x, y


# ---------------------------------------------------------------------------
# NNX model.


def _init(names):
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class Attention(nnx.Module):

  def __init__(self, rngs):
    for n in ('q', 'k', 'v'):
      setattr(self, n, nnx.Einsum('btd,dhk->bthk', (D, H, K),
                                  kernel_init=_init(NAMES[f'attn/{n}']),
                                  rngs=rngs))
    self.o = nnx.Einsum('bthk,hkd->btd', (H, K, D),
                        kernel_init=_init(NAMES['attn/o']), rngs=rngs)

  def __call__(self, x):
    q, k, v = self.q(x), self.k(x), self.v(x)
    logits = jnp.einsum('bthk,bshk->bhts', q, k) / np.sqrt(K)
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    w = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    return self.o(jnp.einsum('bhts,bshk->bthk', w, v))


class Mlp(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(D, F, kernel_init=_init(NAMES['mlp/up']), rngs=rngs)
    self.down = nnx.Linear(F, D, kernel_init=_init(NAMES['mlp/down']),
                           rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class Transformer(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(
        V, D, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(1.0), (None, 'data')), rngs=rngs)
    self.ln1 = nnx.LayerNorm(D, rngs=rngs)
    self.attn = Attention(rngs)
    self.ln2 = nnx.LayerNorm(D, rngs=rngs)
    self.mlp = Mlp(rngs)
    self.head = nnx.LinearGeneral(D, V, kernel_init=_init(NAMES['head']),
                                  rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn(self.ln1(x))
    x = x + self.mlp(self.ln2(x))
    return self.head(x)


def _path(path) -> str:
  return '/'.join(str(p) for p in path)


def _nnx_lora_specs(model) -> dict:
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    out[_path(path)] = {'shape': list(var[...].shape), 'spec': _spec(var[...])}
  return out


def _nnx_quant_specs(model) -> dict:
  """Specs of every quantized storage array, by path of its layer's QArray.

  The storage is a layer's `values` and `scale` variables (rebuilt as a QArray
  by its `qarray` property); recorded with the actual arrays' shardings and
  the specs `nnx.get_partition_spec` gives from their metadata.
  """
  from peft.nnx.quantized import QuantizedLayer  # pylint: disable=g-import-not-at-top
  from peft.quantization import QArray  # pylint: disable=g-import-not-at-top
  out = {}
  for path, node in nnx.iter_graph(model):
    value = node.qarray if isinstance(node, QuantizedLayer) else None
    if isinstance(value, QArray):
      meta = {}
      for name in ('values', 'scale'):
        spec = nnx.get_partition_spec(getattr(node, name)).get_value()
        meta[name] = list(spec) + [None] * (
            getattr(value, name).ndim - len(spec))
      out[_path(path) + '/qarray'] = {
          'method': value.method.value,
          'values_shape': list(value.values.shape),
          'values_spec': _spec(value.values),
          'values_metadata_spec': meta['values'],
          'scale_shape': list(value.scale.shape),
          'scale_spec': _spec(value.scale),
          'scale_metadata_spec': meta['scale'],
      }
  return out


def _nnx_train(model, mesh) -> tuple[list[float], object]:
  x, y = _data(mesh)
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  @jax.jit
  def step(lora, rest, x, y):
    def loss_fn(lora):
      m = nnx.merge(gdef, lora, rest)
      logits = m(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(lora)
    lora = jax.tree.map(lambda p, g: p - LR * g, lora, grads)
    return lora, loss

  losses = []
  for _ in range(STEPS):
    lora, loss = step(lora, rest, x, y)
    losses.append(float(loss))
  nnx.update(model, lora)
  return losses, lora


def scenario_nnx_lora() -> dict:
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top
  mesh = _mesh()
  with jax.set_mesh(mesh):
    model = Transformer(nnx.Rngs(0))
    kernels = {_path(p): _spec(v[...]) for p, v in nnx.to_flat_state(
        nnx.state(model, nnx.Param)) if p[-1] == 'kernel'}
    surgery.apply_lora(model, rank=4, rngs=nnx.Rngs(1))
    before = _nnx_lora_specs(model)
    losses, _ = _nnx_train(model, mesh)
    after = _nnx_lora_specs(model)
  return {'kernels': kernels, 'lora_before': before, 'lora_after': after,
          'losses': losses}


def scenario_nnx_qlora() -> dict:
  """QLoRA: attention int4 (per channel), MLP and head Q4_0 (blocks)."""
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top
  mesh = _mesh()
  with jax.set_mesh(mesh):
    model = Transformer(nnx.Rngs(0))
    kernels = {_path(p): _spec(v[...]) for p, v in nnx.to_flat_state(
        nnx.state(model, nnx.Param)) if p[-1] == 'kernel'}
    surgery.quantize(model, method='int4', where=r'attn/.*')
    surgery.quantize(model, method='q4_0', where=r'mlp/(up|down)|head')
    quant = _nnx_quant_specs(model)
    surgery.apply_lora(model, rank=4, rngs=nnx.Rngs(1))
    before = _nnx_lora_specs(model)
    losses, _ = _nnx_train(model, mesh)
    after = _nnx_lora_specs(model)
    quant_after = _nnx_quant_specs(model)
  return {'kernels': kernels, 'quant': quant, 'quant_after': quant_after,
          'lora_before': before, 'lora_after': after, 'losses': losses}


def scenario_nnx_multi() -> dict:
  """Two named adapters routed per example (a rank-padded bank per layer)."""
  import peft.nnx as pnnx  # pylint: disable=g-import-not-at-top
  mesh = _mesh()
  with jax.set_mesh(mesh):
    model = Transformer(nnx.Rngs(0))
    pnnx.apply_lora(model, rank=4, name='task_a', rngs=nnx.Rngs(1))
    pnnx.apply_lora(model, rank=2, name='task_b', rngs=nnx.Rngs(2))
    ids = jnp.array([0, 1, 1, 0, -1, 0, 1, 0])[:B]
    pnnx.set_adapter_ids(model, ids)
    before = _nnx_lora_specs(model)
    losses, _ = _nnx_train(model, mesh)
    after = _nnx_lora_specs(model)
  return {'lora_before': before, 'lora_after': after, 'losses': losses}


# ---------------------------------------------------------------------------
# Linen model (nn.with_partitioning; peft.LoRADense / LoRAEinsum).


def _linen_model():
  import peft.linen as pl  # pylint: disable=g-import-not-at-top

  init = nn.initializers.lecun_normal()

  class LinenTransformer(nn.Module):

    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(V, D, embedding_init=nn.with_partitioning(
          nn.initializers.normal(1.0), (None, 'data')))(tokens)
      h = nn.LayerNorm()(x)
      q = pl.LoRAEinsum(rank=4, wrapped=nn.Einsum(
          shape=(D, H, K), einsum_str='btd,dhk->bthk', use_bias=False,
          kernel_init=nn.with_partitioning(init, NAMES['attn/q']),
          name='q'))(h)
      kk = pl.LoRAEinsum(rank=4, wrapped=nn.Einsum(
          shape=(D, H, K), einsum_str='btd,dhk->bthk', use_bias=False,
          kernel_init=nn.with_partitioning(init, NAMES['attn/k']),
          name='k'))(h)
      v = pl.LoRAEinsum(rank=4, wrapped=nn.Einsum(
          shape=(D, H, K), einsum_str='btd,dhk->bthk', use_bias=False,
          kernel_init=nn.with_partitioning(init, NAMES['attn/v']),
          name='v'))(h)
      logits = jnp.einsum('bthk,bshk->bhts', q, kk) / np.sqrt(K)
      mask = jnp.tril(jnp.ones((T, T), bool))
      w = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
      a = jnp.einsum('bhts,bshk->bthk', w, v)
      x = x + pl.LoRAEinsum(rank=4, wrapped=nn.Einsum(
          shape=(H, K, D), einsum_str='bthk,hkd->btd', use_bias=False,
          kernel_init=nn.with_partitioning(init, NAMES['attn/o']),
          name='o'))(a)
      h = nn.LayerNorm()(x)
      h = pl.LoRADense(rank=4, wrapped=nn.Dense(
          F, kernel_init=nn.with_partitioning(init, NAMES['mlp/up']),
          name='up'))(h)
      h = pl.LoRADense(rank=4, wrapped=nn.Dense(
          D, kernel_init=nn.with_partitioning(init, NAMES['mlp/down']),
          name='down'))(jax.nn.gelu(h))
      x = x + h
      return pl.LoRADenseGeneral(rank=4, wrapped=nn.DenseGeneral(
          V, kernel_init=nn.with_partitioning(init, NAMES['head']),
          name='head'))(x)

  return LinenTransformer()


def _flat_specs(specs) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: isinstance(s, P))[0]
  return {_path(tuple(getattr(k, 'key', k) for k in kp)): s for kp, s in flat}


def scenario_linen_lora() -> dict:
  import peft  # pylint: disable=g-import-not-at-top
  import peft.params as pp  # pylint: disable=g-import-not-at-top
  mesh = _mesh()
  model = _linen_model()
  x, y = _data(mesh)
  with jax.set_mesh(mesh):
    # The usual linen recipe: shapes + partition specs from eval_shape, then
    # a jitted init that places every param with its NamedSharding.
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    specs = nn.get_partition_spec(abstract)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    variables = jax.jit(model.init, out_shardings=shardings)(
        jax.random.key(0), x)
    params = nn.unbox(variables['params'])
    original, lora = pp.split_params(params)
    del peft

    def flat(tree):
      return {_path(tuple(getattr(k, 'key', k) for k in kp)): _spec(v)
              for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    kernels = {p: s for p, s in flat(original).items()
               if p.endswith('kernel')}
    before = {p: {'spec': s} for p, s in flat(lora).items()}

    @jax.jit
    def step(lora, original, x, y):
      def loss_fn(lora):
        logits = model.apply({'params': pp.merge_params(original, lora)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, y).mean()

      loss, grads = jax.value_and_grad(loss_fn)(lora)
      return jax.tree.map(lambda p, g: p - LR * g, lora, grads), loss

    losses = []
    for _ in range(STEPS):
      lora, loss = step(lora, original, x, y)
      losses.append(float(loss))
    after = {p: {'spec': s} for p, s in flat(lora).items()}
  return {'kernels': kernels, 'lora_before': before, 'lora_after': after,
          'losses': losses,
          # The PartitionSpec linen metadata gives each LoRA factor (P() when
          # the factor is not boxed in nn.Partitioned).
          'lora_metadata_specs': {
              p: list(s) for p, s in _flat_specs(specs['params']).items()
              if '/lora/' in p}}


def _quantize_checkpoint():
  try:
    from peft import quantize_checkpoint  # pylint: disable=g-import-not-at-top
  except ImportError:
    from peft.linen.quantized import quantize_checkpoint  # pylint: disable=g-import-not-at-top
  return quantize_checkpoint


def scenario_linen_quantize_checkpoint() -> dict:
  """`quantize_checkpoint` on boxed, sharded linen params.

  Records, for `up/kernel` and `up/scale`, the PartitionSpec the linen
  metadata gives (`nn.get_partition_spec`, what the usual recipe places
  with) and the sharding the arrays actually have.
  """
  quantize_checkpoint = _quantize_checkpoint()
  mesh = _mesh()
  model = nn.Dense(F, kernel_init=nn.with_partitioning(
      nn.initializers.lecun_normal(), NAMES['mlp/up']), name='up')
  x = jnp.ones((B, D))
  out = {}
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s),
                             nn.get_partition_spec(abstract),
                             is_leaf=lambda s: isinstance(s, P))
    boxed = jax.jit(model.init, out_shardings=shardings)(
        jax.random.key(0), x)['params']
    for method in ('int4', 'q4_0'):
      q = quantize_checkpoint({'up': boxed}, method=method)
      meta = _flat_specs(nn.get_partition_spec(q))
      arrays = nn.unbox(q)
      out[method] = {
          name: {'shape': list(np.shape(arrays['up'][name])),
                 'metadata_spec': list(meta[f'up/{name}']),
                 'spec': _spec(arrays['up'][name])}
          for name in ('kernel', 'scale')}
  return out


SCENARIOS = {
    'nnx_lora': scenario_nnx_lora,
    'nnx_qlora': scenario_nnx_qlora,
    'linen_lora': scenario_linen_lora,
    'linen_quantize_checkpoint': scenario_linen_quantize_checkpoint,
    'nnx_multi': scenario_nnx_multi,
}


def main(argv):
  names = argv[1:] or list(SCENARIOS)
  results = {'n_devices': jax.device_count()}
  for name in names:
    t0 = time.perf_counter()
    try:
      results[name] = SCENARIOS[name]()
    except Exception as e:  # reported to the test, which fails with it
      results[name] = {'error': f'{type(e).__name__}: {e}',
                       'traceback': traceback.format_exc()}
    results[name]['seconds'] = round(time.perf_counter() - t0, 2)
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv)

"""Cost of LoRA through `flax.nnx.bridge` vs a hand-written linen LoRA layer.

A jitted LoRA train step (forward, gradient w.r.t. the LoRA params only,
optax adam update) of a linen MLP whose `nn.Dense` layers are wrapped by
`peft.LoRADense` (through `ModuleInterceptor`, i.e. the NNX adapter run by
`nnx.bridge.ToLinen`), versus the same step with a plain linen module that
writes `x @ kernel + bias + x @ a @ b` with `self.param`. Both have the same
params tree. Target: bridge / plain <= 1.02 under jit.

Timing: `--runs` rounds; each round times `--steps` steps of each variant
(which one goes first alternates between rounds), so that load from other
processes on a shared machine hits both alike. The verdict uses the ratio of
the fastest round of each variant (the least disturbed measurement, as
`timeit` advises); the median of the per-round ratios is printed too. The
script also checks that both variants compile to the same optimized HLO
(metadata aside), which is what makes the cost equal.

Run: `python benchmarks/linen_lora.py [--width 1024] [--depth 4] [--batch 256]`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft.linen.interceptor import ModuleInterceptor
from peft.linen.lora import LoRADense
from peft.params import merge_params, split_params

_TARGET = 1.02


class MLP(nn.Module):
  """A plain linen MLP: `depth` Dense layers with gelu in between."""

  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = nn.Dense(self.width, name=f'Dense_{i}')(x)
      if i < self.depth - 1:
        x = nn.gelu(x)
    return x


class _HandLoRAMLP(nn.Module):
  width: int
  depth: int
  rank: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = _HandLoRABlock(self.width, self.rank, name=f'Dense_{i}')(x)
      if i < self.depth - 1:
        x = nn.gelu(x)
    return x


class _HandLoRABlock(nn.Module):
  """Same params tree as a LoRADense: {'kernel', 'bias', 'lora': {'a', 'b'}}."""

  features: int
  rank: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    lora = _HandAB(self.features, self.rank, name='lora')
    return x @ kernel + bias + lora(x)


class _HandAB(nn.Module):
  features: int
  rank: int

  @nn.compact
  def __call__(self, x):
    a = self.param('a', nn.initializers.kaiming_uniform(),
                   (x.shape[-1], self.rank))
    b = self.param('b', nn.initializers.zeros_init(),
                   (self.rank, self.features))
    return x @ a @ b


def _to_lora(rank):
  def fn(module):
    if isinstance(module, nn.Dense):
      return LoRADense(rank=rank, wrapped=module)
    return module
  return fn


def _make_step(apply_fn, original, tx):
  def loss_fn(lora, x, y):
    out = apply_fn({'params': merge_params(original, lora)}, x)
    return jnp.mean((out - y) ** 2)

  @jax.jit
  def step(lora, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(lora, x, y)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step


def _normalized_hlo(step, *args) -> str:
  """Optimized HLO text without metadata, source tables and value names."""
  text = step.lower(*args).compile().as_text()
  lines = []
  for line in text.splitlines():
    if re.match(r'^\s*\d+ ', line) or line.strip() in (
        'FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      continue
    line = re.sub(r', metadata=\{[^}]*\}', '', line)
    line = re.sub(r'stack_frame_id=\d+', '', line)
    lines.append(re.sub(r'[._]\d+\b', '', line))
  return '\n'.join(lines)


def _time_steps(step, state, x, y, steps):
  lora, opt_state = state
  start = time.perf_counter()
  for _ in range(steps):
    lora, opt_state, loss = step(lora, opt_state, x, y)
  jax.block_until_ready(loss)
  return time.perf_counter() - start, (lora, opt_state)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=int, default=1024)
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--runs', type=int, default=31)
  args = parser.parse_args()

  x = jax.random.normal(jax.random.key(0), (args.batch, args.width))
  y = jax.random.normal(jax.random.key(1), (args.batch, args.width))
  mlp = MLP(args.width, args.depth)
  with ModuleInterceptor(_to_lora(args.rank)):
    params = mlp.init(jax.random.key(2), x)['params']

  def bridge_apply(variables, x):
    with ModuleInterceptor(_to_lora(args.rank)):
      return mlp.apply(variables, x)

  hand = _HandLoRAMLP(args.width, args.depth, args.rank)
  hand_params = hand.init(jax.random.key(2), x)['params']
  if jax.tree.structure(hand_params) != jax.tree.structure(params):
    raise SystemExit('baseline params tree differs from the bridge one')

  # Same params for both (b nonzero so the LoRA branch matters).
  params = jax.tree.map(
      lambda p: p + 0.01 * jnp.ones_like(p), params)
  original, lora = split_params(params)
  np.testing.assert_allclose(
      bridge_apply({'params': params}, x), hand.apply({'params': params}, x),
      rtol=1e-4, atol=1e-4)

  tx = optax.adam(1e-3)
  variants = {
      'bridge': _make_step(bridge_apply, original, tx),
      'plain': _make_step(hand.apply, original, tx),
  }
  states = {k: (lora, tx.init(lora)) for k in variants}
  same_hlo = len({
      _normalized_hlo(step, *states[name], x, y)
      for name, step in variants.items()
  }) == 1
  for name, step in variants.items():  # compile + warm-up
    _, states[name] = _time_steps(step, states[name], x, y, 2)

  times = {k: [] for k in variants}
  ratios = []
  names = list(variants)
  for i in range(args.runs):
    round_times = {}
    for name in names[::-1] if i % 2 else names:  # alternate who goes first
      step = variants[name]
      t, states[name] = _time_steps(step, states[name], x, y, args.steps)
      round_times[name] = t / args.steps
      times[name].append(t / args.steps)
    ratios.append(round_times['bridge'] / round_times['plain'])

  n_lora = sum(l.size for l in jax.tree.leaves(lora))
  print(
      f'jax {jax.__version__} on {jax.devices()[0].platform}, linen MLP'
      f' depth={args.depth} width={args.width} batch={args.batch}'
      f' rank={args.rank} ({n_lora} LoRA params), adam, jitted step;'
      f' {args.runs} rounds x {args.steps} steps per variant'
  )
  for name, label in (('bridge', 'bridge (peft.LoRADense via nnx.bridge)'),
                      ('plain', 'plain  (hand-written x @ a @ b)       ')):
    print(f'{label}: min {min(times[name]) * 1e3:8.3f} ms/step,'
          f' median {statistics.median(times[name]) * 1e3:8.3f} ms/step')
  print(f'same optimized HLO (metadata aside): {same_hlo}')
  ratio_min = min(times['bridge']) / min(times['plain'])
  ratio_median = statistics.median(ratios)
  verdict = 'OK' if ratio_min <= _TARGET else 'ABOVE TARGET'
  print(f'ratio bridge/plain: {ratio_min:.3f} (of the minima; target <='
        f' {_TARGET}: {verdict}), {ratio_median:.3f} (median of per-round'
        ' ratios)')


if __name__ == '__main__':
  main()

"""Several adapters in one batch: mixed per-example routing vs alternatives.

Three ways to serve 32 examples that use 4 adapters (8 examples each):

* `mixed`: one call of 32 examples with `set_adapter_ids` (one id per example);
* `separate`: 4 calls of 8 examples, each with one adapter active;
* `single`: one call of 32 examples with a single adapter active (the cost
  the mixed batch is compared with; target: mixed <= 1.3x single).

Also timed, for reference: `weighted` (one call of 32 examples with two
adapters active, weights 0.5 each: the `set_active_adapters` path) and
`plain` (a model with only one adapter: no routing at all).

Models: the 4x1024 MLP (batch 32 rows) and a 2-layer transformer block
stack (d_model 256, 4 heads, sequence 64, Einsum projections). Every call is
a `jax.jit` of a function of the split state (no `nnx.jit` dispatch cost),
warmed up, then timed `3 * --reps` times with `block_until_ready`, one call
of each kind per round (so a busy machine slows every kind alike); the
script prints medians, the ratios, and the minima.

Run: `python benchmarks/multi_adapter.py [--reps 30]`.

`--sweep` instead times the two formulations of per-example routing
(`peft.nnx.routing`: dense masked and rank-padded gather) on one
1024x1024 Linear for several numbers of adapters and tokens per example, and
prints which one the static rule picks (`routing._use_dense`): the data
behind `routing._FLOPS_PER_FLOAT_MOVED`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import peft.nnx as pnnx

N_ADAPTERS, BATCH, RANKS = 4, 32, (8, 16, 8, 4)


class MLP(nnx.Module):
  """4 layers of 1024, ReLU between."""

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(1024, 1024, rngs=rngs)
                            for _ in range(4)])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      x = jax.nn.relu(x) if i < 3 else x
    return x


class Block(nnx.Module):
  """Pre-norm attention + MLP block with Einsum projections."""

  def __init__(self, d, heads, rngs):
    hd = d // heads
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.q = nnx.Einsum('btd,dnh->btnh', (d, heads, hd), rngs=rngs)
    self.k = nnx.Einsum('btd,dnh->btnh', (d, heads, hd), rngs=rngs)
    self.v = nnx.Einsum('btd,dnh->btnh', (d, heads, hd), rngs=rngs)
    self.o = nnx.Einsum('btnh,nhd->btd', (heads, hd, d), rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    h = self.norm1(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    att = jax.nn.softmax(jnp.einsum('btnh,bsnh->bnts', q, k)
                         / q.shape[-1] ** 0.5)
    x = x + self.o(jnp.einsum('bnts,bsnh->btnh', att, v))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):

  def __init__(self, rngs):
    self.blocks = nnx.List([Block(256, 4, rngs) for _ in range(2)])

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return x


def _with_adapters(model):
  for i, r in enumerate(RANKS):
    pnnx.apply_lora(model, rank=r, alpha=2.0 * r, name=f'task{i}',
                    b_init=nnx.initializers.normal(0.1), rngs=nnx.Rngs(i))
  return model


def _prepare(model, x):
  """A warmed-up `once()` timing one call of the jitted model on `x`."""
  gdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))
  fn(state, x).block_until_ready()
  fn(state, x).block_until_ready()

  def once():
    t = time.perf_counter()
    fn(state, x).block_until_ready()
    return time.perf_counter() - t
  return once


def _timer(model, x, reps):
  once = _prepare(model, x)
  return [once() for _ in range(reps)]


def run(name, make, x_shape, reps):
  key = jax.random.key(0)
  x = jax.random.normal(key, (BATCH, *x_shape))
  ids = jnp.repeat(jnp.arange(N_ADAPTERS), BATCH // N_ADAPTERS)

  mixed = _with_adapters(make())
  pnnx.set_adapter_ids(mixed, ids)
  single = _with_adapters(make())
  pnnx.set_active_adapters(single, 'task1')
  weighted = _with_adapters(make())
  pnnx.set_active_adapters(weighted, {'task0': 0.5, 'task1': 0.5})
  plain = make()
  pnnx.apply_lora(plain, rank=RANKS[1], alpha=2.0 * RANKS[1],
                  b_init=nnx.initializers.normal(0.1), rngs=nnx.Rngs(1))
  per = BATCH // N_ADAPTERS
  seps = []
  for i in range(N_ADAPTERS):
    m = _with_adapters(make())
    pnnx.set_active_adapters(m, f'task{i}')
    seps.append(m)
  calls = {'mixed': [_prepare(mixed, x)], 'single': [_prepare(single, x)],
           'separate': [_prepare(m, x[i * per:(i + 1) * per])
                        for i, m in enumerate(seps)],
           'weighted': [_prepare(weighted, x)], 'plain': [_prepare(plain, x)]}
  times = {k: [] for k in calls}
  # Round robin, one call of each kind per round: every kind sees the same
  # machine load (the separate kind sums its 4 calls of one round).
  for _ in range(3 * reps):
    for k, fns in calls.items():
      times[k].append(sum(once() for once in fns))
  med = {k: statistics.median(v) for k, v in times.items()}
  low = {k: min(v) for k, v in times.items()}
  print(f'{name}: median ms  mixed {1e3 * med["mixed"]:.3f}  single'
        f' {1e3 * med["single"]:.3f}  4 separate calls'
        f' {1e3 * med["separate"]:.3f}  weighted (2 active)'
        f' {1e3 * med["weighted"]:.3f}  plain (1 adapter)'
        f' {1e3 * med["plain"]:.3f}')
  print(f'{name}: mixed / single = {med["mixed"] / med["single"]:.3f}'
        f' (target <= 1.3);  mixed / separate ='
        f' {med["mixed"] / med["separate"]:.3f};  weighted / single ='
        f' {med["weighted"] / med["single"]:.3f};  mixed / plain ='
        f' {med["mixed"] / med["plain"]:.3f}')
  print(f'{name}: minima ms  mixed {1e3 * low["mixed"]:.3f}  single'
        f' {1e3 * low["single"]:.3f};  mixed / single ='
        f' {low["mixed"] / low["single"]:.3f}')
  return med


def sweep(reps):
  """Dense vs gather per-example routing on one Linear(1024, 1024)."""
  from peft.nnx import routing  # pylint: disable=g-import-not-at-top
  print('adapters  tokens/example  dense ms  gather ms  rule picks'
        '  (medians; minima in brackets)')
  for n in (2, 4, 16, 64):
    for t in (1, 16, 128):
      x = jax.random.normal(jax.random.key(0), (BATCH, t, 1024))
      res = {}
      for path in ('dense', 'gather'):
        model = _Routed(nnx.Linear(1024, 1024, rngs=nnx.Rngs(0)), path)
        for i in range(n):
          pnnx.apply_lora(model, rank=16, name=f't{i}',
                          b_init=nnx.initializers.normal(0.1),
                          rngs=nnx.Rngs(i))
        pnnx.set_adapter_ids(model, jnp.arange(BATCH) % n)
        res[path] = _timer(model, x, reps)
      pick = 'dense' if routing._use_dense(  # pylint: disable=protected-access
          [16] * n, BATCH, BATCH * t) else 'gather'
      d, g = res['dense'], res['gather']
      print(f'{n:8d}  {t:14d}  {1e3 * statistics.median(d):8.3f}'
            f' [{1e3 * min(d):.3f}]  {1e3 * statistics.median(g):9.3f}'
            f' [{1e3 * min(g):.3f}]  {pick}')


class _Routed(nnx.Module):
  """Calls `routing.per_example` on a wrapped layer with a fixed path."""

  def __init__(self, layer, path):
    self.layer = layer
    self.path = path

  def __call__(self, x):
    from peft.nnx import routing  # pylint: disable=g-import-not-at-top
    return routing.per_example(self.layer, x, path=self.path)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reps', type=int, default=30)
  parser.add_argument('--sweep', action='store_true',
                      help='time dense vs gather routing instead')
  args = parser.parse_args()
  if args.sweep:
    sweep(args.reps)
    return
  run('4x1024 MLP', lambda: MLP(nnx.Rngs(0)), (1024,), args.reps)
  run('2-layer transformer', lambda: Transformer(nnx.Rngs(0)), (64, 256),
      args.reps)


if __name__ == '__main__':
  main()

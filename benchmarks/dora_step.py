"""DoRA vs LoRA train step: compiled temporary memory and time.

The 4x1024 MLP of `lora_step.py` (batch 256, rank 16, SGD on the adapters),
one jitted step of the split state per variant. Reported: XLA's
`memory_analysis().temp_size_in_bytes` of the compiled step (targets: DoRA
<= 1.5x LoRA) and the median step time over interleaved rounds (target
<= 1.5x LoRA). DoRA's column norm is formed from [out, r] and [r, r] pieces
(peft.nnx.dora), never from a dense [in, out] update; the base's squared
column norms are stored when the adapter is made. The second pair of rows is
the same on an int4-quantized base (QDoRA vs QLoRA): the cross term goes
through the quantized matmul, so no step dequantizes a whole kernel.

Run: `python benchmarks/dora_step.py [--rounds 10 --steps 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import peft.nnx as pnnx

WIDTH, DEPTH, BATCH, RANK = 1024, 4, 256, 16


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs)
                            for _ in range(DEPTH)])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      x = jax.nn.relu(x) if i + 1 < DEPTH else x
    return x


def _step(dora: bool, quantized: bool = False):
  model = MLP(nnx.Rngs(0))
  if quantized:
    pnnx.quantize(model, method='int4')
  pnnx.apply_lora(model, rank=RANK, dora=dora, rngs=nnx.Rngs(1))
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  x = jax.random.normal(jax.random.key(0), (BATCH, WIDTH))
  y = jnp.sin(x)

  def step(lora, rest, x, y):
    def loss(lora):
      return jnp.mean((nnx.merge(gdef, lora, rest)(x) - y) ** 2)
    l, g = jax.value_and_grad(loss)(lora)
    return jax.tree.map(lambda p, d: p - 1e-3 * d, lora, g), l

  compiled = jax.jit(step).lower(lora, rest, x, y).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return compiled, (lora, rest, x, y), temp


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  variants = {name: _step(dora, quantized) for name, dora, quantized in
              (('lora', False, False), ('dora', True, False),
               ('qlora', False, True), ('qdora', True, True))}
  times = {name: [] for name in variants}
  for fn, inputs, _ in variants.values():
    jax.block_until_ready(fn(*inputs))
  for _ in range(args.rounds):
    for name, (fn, inputs, _) in variants.items():
      t = time.perf_counter()
      for _ in range(args.steps):
        out = fn(*inputs)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / args.steps)
  med = {k: statistics.median(v) for k, v in times.items()}
  temp = {k: v[2] for k, v in variants.items()}
  for k in variants:
    print(f'{k}: step {1e3 * med[k]:.2f} ms, temp {temp[k] / 2**20:.2f} MiB')
  for d, l in (('dora', 'lora'), ('qdora', 'qlora')):
    print(f'{d} / {l}: time {med[d] / med[l]:.3f} (target <= 1.5),'
          f' temp memory {temp[d] / temp[l]:.3f} (target <= 1.5)')


if __name__ == '__main__':
  main()

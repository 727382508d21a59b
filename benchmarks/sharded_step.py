"""LoRA / QLoRA train-step time on 1 vs 8 simulated CPU devices.

For catching regressions in the sharded path (a step that suddenly gathers
whole kernels, or recompiles), not for speed claims: 8 "devices" simulated
on a few CPU cores share those cores (each runs on its own thread, with
smaller matmuls), so the 8/1 ratio says nothing about real accelerators;
compare it with earlier runs on the same machine.

Each device count runs in its own subprocess (`XLA_FLAGS=
--xla_force_host_platform_device_count=N`, which must be set before jax
starts). The model is a stack of MLP blocks whose kernels are annotated with
`nnx.with_partitioning` (('data', 'model') up, ('model', 'data') down) and
created under `jax.set_mesh` on an Auto-axes mesh: (1, 1) for one device,
(2, 4) for eight; the batch is sharded over 'data'. `peft.nnx.surgery`
applies LoRA (rank 8) to every layer, or quantizes to int4 first (QLoRA).
The step is the split-state pattern: `jax.jit` of a function of the LoRA
state that merges, takes the gradient of a softmax cross-entropy loss and
applies optax Adam. Printed: per-step medians over rounds after warm-up
(wall and process CPU time) and the 8/1 ratio.

Run: `python benchmarks/sharded_step.py [--rounds 5 --steps 5]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WIDTH, HIDDEN, DEPTH, BATCH, SEQ, RANK = 256, 1024, 4, 16, 64, 8


def _child(n_devices: int, rounds: int, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from flax import nnx
  import optax

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top

  if jax.device_count() != n_devices:
    raise RuntimeError(
        f'expected {n_devices} devices, got {jax.device_count()}')
  shape = (1, 1) if n_devices == 1 else (2, 4)
  mesh = jax.make_mesh(shape, ('data', 'model'),
                       axis_types=(AxisType.Auto, AxisType.Auto))

  def init(names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.up = nnx.Linear(WIDTH, HIDDEN, kernel_init=init(('data', 'model')),
                           rngs=rngs)
      self.down = nnx.Linear(HIDDEN, WIDTH,
                             kernel_init=init(('model', 'data')), rngs=rngs)

    def __call__(self, x):
      return x + self.down(jax.nn.gelu(self.up(x)))

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.blocks = nnx.List([Block(rngs) for _ in range(DEPTH)])
      self.head = nnx.Linear(WIDTH, WIDTH, kernel_init=init(('data', 'model')),
                             rngs=rngs)

    def __call__(self, x):
      for block in self.blocks:
        x = block(x)
      return self.head(x)

  key = jax.random.key(0)
  x = jax.device_put(jax.random.normal(key, (BATCH, SEQ, WIDTH)),
                     NamedSharding(mesh, P('data')))
  y = jax.device_put(jax.random.randint(key, (BATCH, SEQ), 0, WIDTH),
                     NamedSharding(mesh, P('data')))
  results = {}
  for variant in ('lora', 'qlora_int4'):
    with jax.set_mesh(mesh):
      model = Model(nnx.Rngs(0))
      if variant == 'qlora_int4':
        surgery.quantize(model, method='int4')
      surgery.apply_lora(model, rank=RANK, rngs=nnx.Rngs(1))
      gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
      tx = optax.adam(1e-3)
      opt_state = tx.init(lora)

      @jax.jit
      def step(lora, opt_state, rest, x, y):
        def loss_fn(lora):
          logits = nnx.merge(gdef, lora, rest)(x)
          return optax.softmax_cross_entropy_with_integer_labels(
              logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

      for _ in range(3):  # warm-up (compile + first runs)
        lora, opt_state, loss = step(lora, opt_state, rest, x, y)
      jax.block_until_ready(loss)
      walls, cpus = [], []
      for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
          lora, opt_state, loss = step(lora, opt_state, rest, x, y)
        jax.block_until_ready((lora, loss))
        walls.append((time.perf_counter() - w0) / steps)
        cpus.append((time.process_time() - c0) / steps)
      results[variant] = {
          'wall_ms': 1e3 * statistics.median(walls),
          'cpu_ms': 1e3 * statistics.median(cpus),
          'loss': float(loss),
      }
  return results


def _run(n_devices: int, rounds: int, steps: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '').replace(
          '--xla_force_host_platform_device_count', '--_unused')
      + f' --xla_force_host_platform_device_count={n_devices}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--child', str(n_devices),
       '--rounds', str(rounds), '--steps', str(steps)],
      env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{n_devices}-device run failed:\n{proc.stderr}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_child(args.child, args.rounds, args.steps)))
    return
  print(f'LoRA train step, {DEPTH} MLP blocks {WIDTH}->{HIDDEN}->{WIDTH} +'
        f' head, batch {BATCH}x{SEQ}, rank {RANK}, Adam; medians of'
        f' {args.rounds} rounds x {args.steps} steps after 3 warm-up steps')
  runs = {n: _run(n, args.rounds, args.steps) for n in (1, 8)}
  print(f'{"variant":<12} {"devices":>7} {"mesh":>6} {"wall ms":>9}'
        f' {"cpu ms":>9} {"loss":>8}')
  for variant in runs[1]:
    for n, mesh in ((1, '1x1'), (8, '2x4')):
      r = runs[n][variant]
      print(f'{variant:<12} {n:>7} {mesh:>6} {r["wall_ms"]:>9.2f}'
            f' {r["cpu_ms"]:>9.2f} {r["loss"]:>8.4f}')
    ratio = runs[8][variant]['wall_ms'] / runs[1][variant]['wall_ms']
    print(f'{variant:<12} 8-device / 1-device wall time: {ratio:.2f}x')
  print('(simulated devices share the host cores: a regression check, not a'
        ' speed-up measurement)')


if __name__ == '__main__':
  main()

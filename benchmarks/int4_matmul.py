"""Int4 / Q4_0 matmul on CPU: time and memory against a float32 nnx.Linear.

Run: `python benchmarks/int4_matmul.py [--batch 8] [--dim 4096] [--reps 30]
[--strategies auto,fused]`

Every variant is a jitted forward over the split nnx state (`nnx.split` +
`jax.jit`), warmed up, then timed round-robin (interleaved, so load on the
machine hits all variants alike); the table gives the median, its ratio to
float32, the compiled program's temporary memory
(`compiled.memory_analysis().temp_size_in_bytes`) and the real weight storage
per weight (packed values + scales, bias excluded); `max rel err` is against a
float64 matmul with the same (dequantized) kernel. On a shared machine the f32
baseline (which streams 64 MiB of weights per call, where the packed weights
fit in the L3 cache) suffers most from other jobs' memory traffic: read the
`min` column too, and the load average printed above the table.

Variants:
* `f32`: `nnx.Linear`.
* `int4`, `int8`, `q4_0`, `q4_0_transpose`, `fp8`, `nf4` (bitsandbytes'
  blocks of 64), `nf4 dq` (with double quantization), `int4 g128` (one
  scale per 128 contracted values): `Int4Linear.from_float(...)` with the
  default `strategy='auto'` (blockwise dequantization inside the matmul on
  CPU, see `peft.kernels`).
* `fused int4`, ... (one row per method and per other strategy given with
  `--strategies`): the same layer with `strategy='fused'` (`x @
  convert(values)`, scale after the dot: what XLA fuses on GPU / TPU) or
  `'blockwise'`.
* `naive int4`, `naive q4_0`: dequantize the whole kernel, then matmul (what
  XLA does with a plain `x @ dequantize(w)`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from peft.kernels import choose_strategy
from peft.nnx.quantized import Int4Linear
from peft.quantization import dequantize


# (row label, method, options of `Int4Linear.from_float`)
METHODS = (
    ('int4', 'int4', {}),
    ('int8', 'int8', {}),
    ('q4_0', 'q4_0', {}),
    ('q4_0_transpose', 'q4_0_transpose', {}),
    ('fp8', 'fp8', {}),
    ('nf4', 'nf4', {}),
    ('nf4 dq', 'nf4', {'double_quant': True}),
    ('int4 g128', 'int4', {'group_size': 128}),
)


def _compiled(fn, module, x):
  gdef, state = nnx.split(module)
  jitted = jax.jit(lambda s, x: fn(nnx.merge(gdef, s), x))
  compiled = jitted.lower(state, x).compile()
  return compiled, state


def _naive(m, x):
  return x @ dequantize(m.qarray) + m.bias[...]


def _loadavg():
  try:
    return tuple(float(v) for v in open('/proc/loadavg').read().split()[:3])
  except OSError:
    return ()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--dim', type=int, default=4096)
  p.add_argument('--reps', type=int, default=30)
  p.add_argument('--strategies', default='auto,fused',
                 help='comma-separated: auto, blockwise, fused')
  args = p.parse_args()
  b, d = args.batch, args.dim

  dense = nnx.Linear(d, d, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (b, d), jnp.float32)
  call = lambda m, x: m(x)
  variants = [('f32', call, dense, d * d * 4, None)]
  quantized = {}
  strategies = [s.strip() for s in args.strategies.split(',') if s.strip()]
  for strategy in strategies:
    for label, method, options in METHODS:
      q = Int4Linear.from_float(dense, method=method, strategy=strategy,
                                **options)
      quantized.setdefault(label, q)
      name = label if strategy == 'auto' else f'{strategy} {label}'
      variants.append((name, call, q, q.nbytes, label))
  for label in ('int4', 'q4_0', 'nf4'):
    q = quantized[label]
    variants.append((f'naive {label}', _naive, q, q.nbytes, label))
  # Exact reference per method: float64 matmul with the dequantized kernel.
  x64 = np.asarray(x, np.float64)
  refs = {None: x64 @ np.asarray(dense.kernel[...], np.float64)}
  for method, q in quantized.items():
    refs[method] = x64 @ np.asarray(dequantize(q.qarray), np.float64)
  refs = {k: v + np.asarray(dense.bias[...], np.float64)
          for k, v in refs.items()}

  runs = []
  for name, fn, module, nbytes, method in variants:
    compiled, state = _compiled(fn, module, x)
    for _ in range(3):
      jax.block_until_ready(compiled(state, x))
    temp = compiled.memory_analysis().temp_size_in_bytes
    runs.append((name, compiled, state, nbytes, temp, method))

  times = {name: [] for name, *_ in runs}
  for _ in range(args.reps):
    for name, compiled, state, *_ in runs:
      t = time.perf_counter()
      jax.block_until_ready(compiled(state, x))
      times[name].append(time.perf_counter() - t)

  f32 = np.median(times['f32'])
  f32_min = np.min(times['f32'])
  print(f'batch {b} x {d}x{d}, {args.reps} interleaved reps, jax'
        f' {jax.__version__}, {jax.devices()[0].device_kind}, auto ='
        f' {choose_strategy("auto", x)}')
  print(f'load average {" ".join(f"{v:.1f}" for v in _loadavg())}')
  print('| variant | median ms | min ms | x f32 (median) | x f32 (min) |'
        ' temp MiB | temp / f32 weight | weight B/weight | max rel err |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name, compiled, state, nbytes, temp, method in runs:
    med = np.median(times[name])
    ref = refs[method]
    out = np.asarray(compiled(state, x), np.float64)
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    print(f'| {name} | {med * 1e3:.2f} | {np.min(times[name]) * 1e3:.2f} |'
          f' {med / f32:.2f} | {np.min(times[name]) / f32_min:.2f} |'
          f' {temp / 2**20:.1f} | {temp / (d * d * 4):.2f} |'
          f' {nbytes / (d * d):.4f} | {err:.3g} |')


if __name__ == '__main__':
  main()

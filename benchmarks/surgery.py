"""Benchmark: `apply_lora` on models of 100, 1000 and 5000 `nnx.Linear` layers.

Measures the wall-clock and CPU time of `peft.nnx.surgery.apply_lora` (one
rank-4 LoRA wrapper per layer) and splits it into

* walk: the graph walk and selection alone (`dry_run=True`);
* build (one by one): constructing the `LoRALinear` wrappers with the
  constructor, one per layer (flax module construction and RNG calls), which
  is what `apply_lora` would cost without its grouped construction (identical
  layers get their adapters initialised in stacked chunks of 64 and their
  wrappers made by `nnx.merge`; see `peft/nnx/surgery.py`);
* install: putting prepared replacements into the graph (`surgery.replace`).

For scale it also times building the same number of plain `nnx.Linear(8, 8)`
layers (what creating the model itself costs on this machine). The model is
`nnx.List` of blocks, each an `nnx.Dict` of 4 Linear layers (width 8), so the
walk goes through lists, dicts and nested modules. Each size runs `--repeats`
times on a fresh model; the best run is reported. The machine's load average is
printed, since other processes inflate wall-clock times (CPU time less so).

Usage: python benchmarks/surgery.py [--sizes 100 1000 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from flax import nnx
import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from peft.nnx import lora as _lora  # pylint: disable=g-import-not-at-top
from peft.nnx import surgery  # pylint: disable=g-import-not-at-top

WIDTH = 8
PER_BLOCK = 4


class Block(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.Dict(
        {f'l{i}': nnx.Linear(WIDTH, WIDTH, rngs=rngs) for i in range(PER_BLOCK)}
    )


class Model(nnx.Module):

  def __init__(self, n_layers, rngs):
    self.blocks = nnx.List(
        [Block(rngs) for _ in range(n_layers // PER_BLOCK)]
    )


def _timed(fn):
  w0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - w0, time.process_time() - c0


def run(n_layers: int, repeats: int) -> dict[str, float]:
  best: dict[str, float] = {}
  for _ in range(repeats):
    model = Model(n_layers, nnx.Rngs(0))
    _, walk, _ = _timed(
        lambda: surgery.apply_lora(model, rank=4, dry_run=True)
    )
    _, total, total_cpu = _timed(
        lambda: surgery.apply_lora(model, rank=4, rngs=nnx.Rngs(1))
    )
    wrapped = surgery.select(model)
    if len(wrapped) != n_layers or not all(
        isinstance(m, _lora.LoRALinear) for _, m in wrapped
    ):
      raise RuntimeError('apply_lora did not wrap every layer')
    # Phases, on a fresh model.
    fresh = Model(n_layers, nnx.Rngs(0))
    layers = [m for _, m in surgery.select(fresh)]
    rngs = nnx.Rngs(1)
    wrappers, build, _ = _timed(
        lambda: {id(m): _lora.LoRALinear(m, rank=4, rngs=rngs) for m in layers}
    )
    _, install, _ = _timed(
        lambda: surgery.replace(fresh, lambda p, m: wrappers.get(id(m), m))
    )
    _, linear_ctor, _ = _timed(
        lambda: [
            nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(n_layers)
        ]
    )
    run_ = dict(total=total, total_cpu=total_cpu, walk=walk, build=build,
                install=install, linear_ctor=linear_ctor)
    if not best or run_['total'] < best['total']:
      best = run_
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[100, 1000, 5000])
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  # Warm up: compiles the RNG / init ops for this layer shape once (the
  # stacked chunks have a fixed size, so no size below compiles anything new).
  surgery.apply_lora(Model(8, nnx.Rngs(0)), rank=4, rngs=nnx.Rngs(1))
  print(f'jax {jax.__version__}, backend {jax.default_backend()},'
        f' load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)')
  header = (
      f'{"layers":>7} | {"apply_lora":>10} | {"per layer":>9} |'
      f' {"cpu":>7} | {"cpu/layer":>9} |'
      f' {"walk":>7} | {"1-by-1":>7} | {"install":>7} |'
      f' {"walk+inst/layer":>15} | {"nnx.Linear x n":>14}'
  )
  print(header)
  print('-' * len(header))
  results = {}
  for n in args.sizes:
    r = run(n, args.repeats if n <= 1000 else 1)
    results[n] = r
    print(
        f'{n:>7} | {r["total"]:>9.3f}s | {1e3 * r["total"] / n:>7.3f}ms |'
        f' {r["total_cpu"]:>6.2f}s | {1e3 * r["total_cpu"] / n:>7.3f}ms |'
        f' {r["walk"]:>6.3f}s | {r["build"]:>6.3f}s |'
        f' {r["install"]:>6.3f}s |'
        f' {1e6 * (r["walk"] + r["install"]) / n:>13.1f}us |'
        f' {r["linear_ctor"]:>13.3f}s',
        flush=True,
    )
  if 1000 in results:
    t = results[1000]['total']
    print(f'1000 layers: {t:.3f}s -> {"PASS" if t < 1.0 else "FAIL"} (< 1 s)')
  for key, what in (('total', 'wall'), ('total_cpu', 'cpu')):
    per = {n: r[key] / n for n, r in results.items()}
    if len(per) > 1:
      lo, hi = min(per.values()), max(per.values())
      print(f'{what} time per layer: min {1e3 * lo:.3f} ms, max'
            f' {1e3 * hi:.3f} ms (ratio {hi / lo:.2f}; flat = linear scaling)')


if __name__ == '__main__':
  main()

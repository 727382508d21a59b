"""Cost of `simulate_quantize` relative to one fused elementwise pass; error
of group-wise scales on heavy-tailed weights.

First, the error of every method: on the same Student-t weights (below),
bits per weight of the real storage (values + scales) and the relative RMS
error `||w' - w|| / ||w||`, and who reads the format.

Then a quality table: on Student-t weights (df=3, 1024 x 1024, numpy rng,
seed 0), the relative RMS error `||w' - w|| / ||w||` of INT4, INT8 and FP8
with one scale per output channel and with groups of 32, 64 and 128
contracted values. Target: INT4 with groups of 32 <= 0.7x the per-channel
error.

Then the timing table:

For a 4096 x 4096 float32 kernel, every method's jitted `simulate_quantize`
is timed (median of several runs after warm-up, `block_until_ready`) and
divided by the time of `jnp.round(x * s) / s`, one fused elementwise pass over
the same array: the floor any fake-quantizer has to pay. Target: every method
<= 1.5x (wall-clock ratio). Runs alternate with the baseline so that a busy
machine slows both alike; the CPU-time ratio (process CPU seconds, all
threads) is shown beside it as a second, less load-sensitive view. Also
shown, for information: real `quantize` and `dequantize` times.

The simulated paths include the special-value handling (scales from the
finite values only, NaN / inf passed through): one extra sum over `x` to
detect non-finite values, and a select in the elementwise pass.

Run: `python benchmarks/quantization.py [--size 4096] [--runs 15]
[--errors-only]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from peft.quantization import QuantizationMethod
from peft.quantization import dequantize
from peft.quantization import quantize
from peft.quantization import simulate_quantize

_TARGET = 1.5
_GROUP_TARGET = 0.7  # INT4 group 32 error / per-channel error.
_GROUP_SIZES = (None, 32, 64, 128)


def _relative_rms_error(w: np.ndarray, w_q) -> float:
  w64 = w.astype(np.float64)
  diff = np.asarray(w_q, np.float64) - w64
  return float(np.sqrt(np.mean(diff**2) / np.mean(w64**2)))


def group_error_table(n: int = 1024, df: float = 3.0) -> bool:
  """Prints the group-wise error table; True if the INT4 target is met."""
  w = np.random.default_rng(0).standard_t(df, (n, n)).astype(np.float32)
  print(
      f'relative RMS error on Student-t weights (df={df:g}, {n}x{n}, numpy'
      ' rng seed 0); groups along the contracted axis (axis 0)\n'
  )
  header = f'{"method":<8}' + ''.join(
      f'{"per-channel" if g is None else f"group {g}":>14}'
      for g in _GROUP_SIZES
  ) + f'{"g32 / per-ch":>14}'
  print(header)
  print('-' * len(header))
  ok = True
  for method in ('int4', 'int8', 'fp8'):
    errors = [
        _relative_rms_error(w, dequantize(quantize(w, method, group_size=g)))
        for g in _GROUP_SIZES
    ]
    ratio = errors[1] / errors[0]
    if method == 'int4':
      ok = ratio <= _GROUP_TARGET
    print(
        f'{method:<8}' + ''.join(f'{e:>14.5f}' for e in errors)
        + f'{ratio:>13.3f}x'
    )
  verdict = 'met' if ok else 'MISSED'
  print(f'\nINT4 group 32 <= {_GROUP_TARGET}x per-channel error: {verdict}\n')
  return ok


# (label, method, options, who reads the format)
_EVERY_METHOD = (
    ('int8', 'int8', {}, 'any int8 runtime (per-channel scales)'),
    ('int8 g128', 'int8', {'group_size': 128}, 'peft (group-wise scales)'),
    ('fp8', 'fp8', {}, 'FP8 checkpoints (e4m3fn + float32 scale)'),
    ('fp8 g128', 'fp8', {'group_size': 128},
     'FP8 checkpoints with block scales (128)'),
    ('sfp8 (simulated)', 'sfp8', {}, 'simulation only'),
    ('int4', 'int4', {}, 'peft (per-channel)'),
    ('int4 g32', 'int4', {'group_size': 32}, 'peft; AWQ / GPTQ-style groups'),
    ('int4 g64', 'int4', {'group_size': 64}, 'peft; AWQ / GPTQ-style groups'),
    ('int4 g128', 'int4', {'group_size': 128},
     'peft; AWQ / GPTQ-style groups'),
    ('q4_0', 'q4_0', {}, 'ggml / llama.cpp (byte-exact)'),
    ('q4_0_transpose', 'q4_0_transpose', {}, 'ggml / llama.cpp of w.T'),
    ('nf4', 'nf4', {}, 'bitsandbytes (bit-exact)'),
    ('nf4 dq', 'nf4', {'double_quant': True},
     'bitsandbytes compress_statistics=True'),
)


def method_error_rows(n: int = 1024, df: float = 3.0):
  """(label, bits per weight, relative RMS error, reader) of every method."""
  w = np.random.default_rng(0).standard_t(df, (n, n)).astype(np.float32)
  rows = []
  for label, method, options, reader in _EVERY_METHOD:
    if method == 'sfp8':
      bits, w_q = 8.0, simulate_quantize(w, method)
    else:
      q = quantize(w, method, **options)
      bits, w_q = q.nbytes * 8 / w.size, dequantize(q)
    rows.append((label, bits, _relative_rms_error(w, w_q), reader))
  return rows


def method_error_table(n: int = 1024, df: float = 3.0) -> None:
  """Prints bits per weight and error of every method (Student-t weights)."""
  print(f'every method on Student-t weights (df={df:g}, {n}x{n}, numpy rng'
        ' seed 0)\n')
  print('| method | bits / weight | relative RMS error | read by |')
  print('|---|---|---|---|')
  for label, bits, err, reader in method_error_rows(n, df):
    print(f'| {label} | {bits:.3f} | {err:.4f} | {reader} |')
  print()


def _seconds(fn, *args) -> tuple[float, float]:
  """Wall-clock and process CPU seconds of one call."""
  start, cpu_start = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, time.process_time() - cpu_start


def _paired(fn, args, baseline_fn, baseline_args, runs: int):
  """Median times of `fn` and the baseline, and medians of their ratios.

  Runs alternate between the two so that load from other processes on a
  shared machine hits both alike. Returns (fn ms, baseline ms, wall-clock
  ratio, CPU-time ratio).
  """
  for _ in range(2):  # compile + warm-up
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(baseline_fn(*baseline_args))
  times, base_times, ratios, cpu_ratios = [], [], [], []
  for _ in range(runs):
    b, b_cpu = _seconds(baseline_fn, *baseline_args)
    t, t_cpu = _seconds(fn, *args)
    times.append(t)
    base_times.append(b)
    ratios.append(t / b)
    cpu_ratios.append(t_cpu / max(b_cpu, 1e-9))
  return (
      statistics.median(times) * 1e3,
      statistics.median(base_times) * 1e3,
      statistics.median(ratios),
      statistics.median(cpu_ratios),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=4096)
  parser.add_argument('--runs', type=int, default=15)
  parser.add_argument(
      '--errors-only', action='store_true',
      help='print the group-wise error table only (no timing)',
  )
  args = parser.parse_args()

  method_error_table()
  group_error_table()
  if args.errors_only:
    return

  x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
  s = jnp.float32(7.0)
  baseline_fn = jax.jit(lambda x, s: jnp.round(x * s) / s)
  base = (baseline_fn, (x, s))

  print(
      f'jax {jax.__version__} on {jax.devices()[0].platform}'
      f' ({jax.device_count()} device), x: float32 {args.size}x{args.size},'
      f' medians of {args.runs} runs alternating with the baseline'
  )
  print('baseline: jax.jit(lambda x, s: jnp.round(x * s) / s)\n')
  header = (
      f'{"method":<16}{"simulate ms":>12}{"baseline ms":>12}{"ratio":>8}'
      f'  {"<=1.5x":<7}{"cpu ratio":>10}{"quantize ms":>12}'
      f'{"dequantize ms":>14}'
  )
  print(header)
  print('-' * len(header))
  slow = []
  for method in QuantizationMethod:
    sim_fn = jax.jit(lambda x, m=method: simulate_quantize(x, m))
    t, b, ratio, cpu_ratio = _paired(sim_fn, (x,), *base, runs=args.runs)
    ok = 'ok' if ratio <= _TARGET else 'SLOW'
    if ratio > _TARGET:
      slow.append(method.name)
    q_ms = dq_ms = '-'
    if method not in (QuantizationMethod.NONE, QuantizationMethod.SFP8):
      q_fn = jax.jit(lambda x, m=method: quantize(x, m))
      q_ms = f'{_paired(q_fn, (x,), *base, runs=args.runs)[0]:.2f}'
      dq_fn = jax.jit(dequantize)
      dq_ms = f'{_paired(dq_fn, (q_fn(x),), *base, runs=args.runs)[0]:.2f}'
    print(
        f'{method.name:<16}{t:>12.2f}{b:>12.2f}{ratio:>7.2f}x'
        f'  {ok:<7}{cpu_ratio:>9.2f}x{q_ms:>12}{dq_ms:>14}'
    )
  print()
  if slow:
    print(f'above the {_TARGET}x target: {", ".join(slow)}')
  else:
    print(f'all methods within {_TARGET}x of one elementwise pass')


if __name__ == '__main__':
  main()

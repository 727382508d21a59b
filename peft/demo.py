"""End-to-end demo: pre-train, LoRA fine-tune, QAT, quantize, merge, save.

Run it with ``python -m peft.demo`` (``--help`` lists the flags). Everything is
local (no downloads) and deterministic for a given ``--seed``:

1. pre-train a small character-level NNX transformer (``TinyTransformer``:
   ``nnx.Einsum`` attention, ``nnx.Linear`` MLP) on prose bundled with the
   package (``peft/data/pretrain.txt``);
2. ``apply_lora`` and fine-tune only the adapters on a second text
   (``peft/data/finetune.txt``, weather reports), with a progress bar;
3. save the adapter alone (``peft.checkpoint.save_adapter``, orbax) and load
   it onto a fresh copy of the base;
4. ``merge_lora``;
5. real post-training quantization (int4 per channel, ggml Q4_0) with the
   held-out loss and the real bytes per weight;
6. QAT with Q4_0 (``simulate_quantization``), then real Q4_0, against a
   float32 control trained for the same steps;
7. write a loss-curve PNG (matplotlib) and a treescope HTML page of the
   LoRA-wrapped model, and print where each file went.

Example:

```python
from peft import demo
result = demo.main(['--steps', '20', '--out', '/tmp/peft_demo'])
result.eval_loss['lora'], result.files
```

"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import importlib.util
import math
import os
import sys
import time
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ['TinyTransformer', 'DemoResult', 'main']

_D_MODEL = 64
_HEADS = 2
_LAYERS = 2
_MLP = 256
_CONTEXT = 64
_BATCH = 16
_EVAL_WINDOWS = 64
_RANK = 8
_ALPHA = 16.0


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _read_text(name: str) -> str:
  return (
      importlib.resources.files('peft')
      .joinpath('data', name)
      .read_text(encoding='utf-8')
  )


@dataclasses.dataclass(frozen=True)
class _Corpus:
  """Two texts encoded with one shared character vocabulary."""

  chars: str
  pretrain: np.ndarray
  finetune_train: np.ndarray
  finetune_eval: np.ndarray
  pretrain_eval: np.ndarray

  @property
  def vocab_size(self) -> int:
    # Padded to a multiple of 32 so the output layer can be stored as Q4_0.
    return 32 * math.ceil(len(self.chars) / 32)


def _load_corpus() -> _Corpus:
  pre, fine = _read_text('pretrain.txt'), _read_text('finetune.txt')
  chars = ''.join(sorted(set(pre) | set(fine)))
  index = {c: i for i, c in enumerate(chars)}

  def encode(s):
    return np.array([index[c] for c in s], dtype=np.int32)

  pre_ids, fine_ids = encode(pre), encode(fine)
  cut_p = int(len(pre_ids) * 0.9)
  cut_f = int(len(fine_ids) * 0.8)
  return _Corpus(
      chars=chars,
      pretrain=pre_ids[:cut_p],
      pretrain_eval=pre_ids[cut_p:],
      finetune_train=fine_ids[:cut_f],
      finetune_eval=fine_ids[cut_f:],
  )


def _batch(ids: np.ndarray, rng: np.random.Generator, batch: int):
  starts = rng.integers(0, len(ids) - _CONTEXT - 1, size=batch)
  x = np.stack([ids[s : s + _CONTEXT] for s in starts])
  y = np.stack([ids[s + 1 : s + _CONTEXT + 1] for s in starts])
  return jnp.asarray(x), jnp.asarray(y)


def _eval_windows(ids: np.ndarray):
  """Fixed, evenly spaced windows covering the held-out text."""
  last = len(ids) - _CONTEXT - 1
  starts = np.linspace(0, last, _EVAL_WINDOWS).astype(np.int64)
  x = np.stack([ids[s : s + _CONTEXT] for s in starts])
  y = np.stack([ids[s + 1 : s + _CONTEXT + 1] for s in starts])
  return jnp.asarray(x), jnp.asarray(y)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class _Attention(nnx.Module):
  """Causal multi-head attention with ``nnx.Einsum`` projections."""

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    hd = d // heads
    self.q = nnx.Einsum('btd,dhk->bthk', (d, heads, hd), rngs=rngs)
    self.k = nnx.Einsum('btd,dhk->bthk', (d, heads, hd), rngs=rngs)
    self.v = nnx.Einsum('btd,dhk->bthk', (d, heads, hd), rngs=rngs)
    self.o = nnx.Einsum('bthk,hkd->btd', (heads, hd, d), rngs=rngs)

  def __call__(self, x):
    q, k, v = self.q(x), self.k(x), self.v(x)
    t = x.shape[1]
    logits = jnp.einsum('bqhk,bshk->bhqs', q, k) / math.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, -1e9)
    attn = jax.nn.softmax(logits, axis=-1)
    return self.o(jnp.einsum('bhqs,bshk->bqhk', attn, v))


class _Block(nnx.Module):
  """Pre-norm transformer block: attention then a ``nnx.Linear`` MLP."""

  def __init__(self, d: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = _Attention(d, heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, mlp, rngs=rngs)
    self.down = nnx.Linear(mlp, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TinyTransformer(nnx.Module):
  """A small character-level decoder-only transformer used by the demo.

  Attention projections are ``nnx.Einsum`` layers, the MLP and the output
  layer are ``nnx.Linear``; every kernel axis is a multiple of 32 so all of
  them can be stored as Q4_0.

  Example:

  ```python
  model = TinyTransformer(vocab_size=96, rngs=nnx.Rngs(0))
  logits = model(jnp.zeros((1, 16), jnp.int32))   # (1, 16, 96)
  ```

  """

  def __init__(
      self,
      vocab_size: int,
      *,
      d_model: int = _D_MODEL,
      heads: int = _HEADS,
      layers: int = _LAYERS,
      mlp: int = _MLP,
      context: int = _CONTEXT,
      rngs: nnx.Rngs,
  ):
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.pos = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (context, d_model))
    )
    self.blocks = nnx.List(
        [_Block(d_model, heads, mlp, rngs=rngs) for _ in range(layers)]
    )
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def _loss(model, x, y):
  logits = model(x).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


# --------------------------------------------------------------------------
# Training (split-state pattern: jax.jit over the state, not nnx.jit)
# --------------------------------------------------------------------------


class _Progress:
  """A minimal progress bar: redraws in place on a terminal, else prints lines."""

  def __init__(self, total: int, label: str, file=None, width: int = 24):
    self.total, self.label, self.width = max(total, 1), label, width
    self.file = file if file is not None else sys.stdout
    self.tty = hasattr(self.file, 'isatty') and self.file.isatty()
    self.start = time.perf_counter()
    self.every = max(1, self.total // (50 if self.tty else 5))

  def update(self, step: int, loss: float):
    done = step + 1
    if done % self.every and done != self.total:
      return
    filled = int(self.width * done / self.total)
    bar = '#' * filled + '.' * (self.width - filled)
    dt = time.perf_counter() - self.start
    line = (
        f'  {self.label:<9} [{bar}] {done:>5}/{self.total} '
        f'loss {loss:6.3f}  {dt:5.1f}s'
    )
    if self.tty:
      end = '\n' if done == self.total else ''
      self.file.write('\r' + line + end)
    else:
      self.file.write(line + '\n')
    self.file.flush()


_STEP_FNS: dict[tp.Any, tp.Callable[..., tp.Any]] = {}


def _step_fn(graphdef, wrt):
  """One jitted Adam step per model structure (reused across phases)."""
  import optax  # pylint: disable=g-import-not-at-top

  tx = optax.scale_by_adam()

  def loss_fn(trainable, rest, x, y):
    return _loss(nnx.merge(graphdef, trainable, rest), x, y)

  @jax.jit
  def step(trainable, rest, opt_state, x, y, lr):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, rest, x, y)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = jax.tree.map(lambda p, u: p - lr * u, trainable, updates)
    return trainable, opt_state, loss

  try:
    return _STEP_FNS.setdefault((graphdef, wrt), step), tx
  except TypeError:  # unhashable graph definition
    return step, tx


def _train(
    model,
    wrt,
    ids: np.ndarray,
    *,
    steps: int,
    lr: float,
    seed: int,
    label: str,
) -> list[float]:
  """Trains the variables selected by ``wrt`` in place; returns the losses.

  Adam with a cosine decay from ``lr`` to ``lr / 10``; the learning rate is an
  argument of the jitted step so phases with the same model structure share
  one compiled function.
  """
  graphdef, trainable, rest = nnx.split(model, wrt, ...)
  step, tx = _step_fn(graphdef, wrt)
  opt_state = tx.init(trainable)
  rng = np.random.default_rng(seed)
  bar = _Progress(steps, label)
  losses = []
  for i in range(steps):
    x, y = _batch(ids, rng, _BATCH)
    cos = 0.5 * (1 + math.cos(math.pi * i / max(steps, 1)))
    lr_i = jnp.float32(lr * (0.1 + 0.9 * cos))
    trainable, opt_state, loss = step(trainable, rest, opt_state, x, y, lr_i)
    losses.append(float(loss))
    bar.update(i, losses[-1])
  nnx.update(model, trainable)
  return losses


_EVAL_FNS: dict[tp.Any, tp.Callable[..., tp.Any]] = {}


def _evaluate(model, windows) -> tuple[float, jax.Array]:
  """Mean loss over the windows and the logits of the first four windows."""
  graphdef, state = nnx.split(model)

  def fn(state, x, y):
    logits = nnx.merge(graphdef, state)(x).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)
    return jnp.mean(nll), logits[:4]

  try:  # models with the same structure share one compiled function
    jitted = _EVAL_FNS.setdefault(graphdef, jax.jit(fn))
  except TypeError:  # unhashable graph definition
    jitted = jax.jit(fn)
  loss, logits = jitted(state, *windows)
  return float(loss), logits


def _count(model, filt) -> int:
  return sum(
      int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, filt))
  )


def _sample(model, corpus: _Corpus, prompt: str, n: int) -> str:
  """Greedy decoding (deterministic), one jit for a fixed window."""
  index = {c: i for i, c in enumerate(corpus.chars)}
  ids = [index[c] for c in prompt]
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_id(state, window, pos):
    logits = nnx.merge(graphdef, state)(window[None])[0, pos]
    logits = logits[: len(corpus.chars)]
    return jnp.argmax(logits)

  for _ in range(n):
    window = ids[-_CONTEXT:]
    pos = len(window) - 1
    window = window + [0] * (_CONTEXT - len(window))
    ids.append(int(next_id(state, jnp.asarray(window, jnp.int32), pos)))
  return ''.join(corpus.chars[i] for i in ids)


# --------------------------------------------------------------------------
# Reporting helpers
# --------------------------------------------------------------------------


def _weight_bytes(model) -> tuple[int, int]:
  """(number of kernel weights, bytes used to store them) of the big layers."""
  from peft.nnx import quantized  # pylint: disable=g-import-not-at-top

  n = nbytes = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (quantized.Int4Linear, quantized.Int4Einsum,
                           quantized.Int4LinearGeneral)):
      n += int(np.prod(module.weight.get_value().shape))
      nbytes += int(module.weight.get_value().nbytes)
    elif isinstance(module, (nnx.Linear, nnx.Einsum, nnx.LinearGeneral)):
      n += int(module.kernel.get_value().size)
      nbytes += int(module.kernel.get_value().nbytes)
  return n, nbytes


def _save_curve(path: str, curves: dict[str, list[float]]) -> str | None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('  matplotlib is not installed: skipping the loss-curve PNG '
          '(pip install matplotlib)')
    return None
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
  offset = 0
  for name, losses in curves.items():
    if not losses:
      continue
    xs = np.arange(offset, offset + len(losses))
    ax.plot(xs, losses, label=name, linewidth=1.2)
    offset += len(losses)
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (nats / character)')
  ax.set_title('flax-peft demo: pre-training, LoRA fine-tuning, QAT (Q4_0)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _page(block: str, model: str) -> str:
  """A standalone HTML page around two treescope renderings."""
  return (
      '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
      '<title>flax-peft demo: the LoRA-wrapped model</title></head>'
      '<body style="font-family: sans-serif">'
      '<h3>TinyTransformer after <code>apply_lora</code></h3>'
      '<p>Click a node to expand it. Green blocks are the trainable LoRA '
      'adapters; the wrapped base layers are frozen.</p>'
      '<h4><code>model.blocks[0]</code></h4>' + block
      + '<h4><code>model</code></h4>' + model + '</body></html>\n'
  )


@dataclasses.dataclass
class DemoResult:
  """Numbers and file paths produced by :func:`main` (for tests and scripts).

  Example:

  ```python
  result = demo.main(['--steps', '10', '--out', '/tmp/d'])
  print(result.eval_loss['lora'], result.files['adapter'])
  ```

  """

  eval_loss: dict[str, float]
  params: dict[str, int]
  bytes_per_weight: dict[str, float]
  files: dict[str, str]
  seconds: float


# --------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------

_LORA_WHERE = r'.*blocks/\d+/(attn/(q|k|v|o)|up|down)$'


def _parse(argv):
  p = argparse.ArgumentParser(
      prog='python -m peft.demo',
      description=(
          'flax-peft demo: pre-train a tiny NNX transformer on bundled text, '
          'LoRA fine-tune it on a second text, run QAT with Q4_0, quantize '
          'it for real (int4, Q4_0), merge LoRA and save the adapter. No '
          'downloads; deterministic for a given seed.'
      ),
  )
  p.add_argument('--steps', type=int, default=300,
                 help='pre-training and LoRA fine-tuning steps (each; default'
                      ' 300; QAT uses a quarter of it)')
  p.add_argument('--out', default='./peft_demo_out',
                 help='output folder (default ./peft_demo_out)')
  p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error('--steps must be >= 1')
  return args


def main(argv: tp.Sequence[str] | None = None) -> DemoResult:
  """Runs the demo; ``argv`` as on the command line (``None``: ``sys.argv``).

  Example:

  ```python
  from peft import demo
  result = demo.main(['--steps', '5', '--out', '/tmp/peft_demo'])
  ```

  """
  args = _parse(argv)
  missing = [m for m in ('optax', 'orbax.checkpoint')
             if importlib.util.find_spec(m.split('.')[0]) is None]
  if missing:
    raise ImportError(
        f'the demo needs {" and ".join(missing)}: pip install "flax-peft[test]"'
    )
  import treescope  # pylint: disable=g-import-not-at-top
  from peft import checkpoint  # pylint: disable=g-import-not-at-top
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  files: dict[str, str] = {}
  evals: dict[str, float] = {}
  bpw: dict[str, float] = {}
  params: dict[str, int] = {}

  corpus = _load_corpus()
  pre_eval = _eval_windows(corpus.pretrain_eval)
  fine_eval = _eval_windows(corpus.finetune_eval)
  print(f'flax-peft demo (jax {jax.__version__} on {jax.default_backend()}, '
        f'seed {args.seed}, {args.steps} steps)')
  print(f'data: prose {len(corpus.pretrain):,} chars (peft/data/pretrain.txt)'
        f', weather reports {len(corpus.finetune_train):,} chars '
        f'(peft/data/finetune.txt), {len(corpus.chars)} distinct characters; '
        'the metric is the loss on held-out text (nats/char, lower is better)')

  # 1. Pre-training ---------------------------------------------------------
  model = TinyTransformer(corpus.vocab_size, rngs=nnx.Rngs(args.seed))
  params['base'] = _count(model, nnx.Param)
  print(f'\n[1/7] pre-train a TinyTransformer on prose: {_LAYERS} layers, '
        f'd_model {_D_MODEL}, nnx.Einsum attention, nnx.Linear MLP, '
        f'{params["base"]:,} params, optax.adam')
  curves = {}
  curves['pre-training (prose)'] = _train(
      model, nnx.Param, corpus.pretrain, steps=args.steps, lr=3e-3,
      seed=args.seed, label='pretrain')
  evals['pretrained/prose'], _ = _evaluate(model, pre_eval)
  evals['pretrained'], _ = _evaluate(model, fine_eval)
  print(f'  held-out loss: prose {evals["pretrained/prose"]:.3f}, '
        f'weather reports {evals["pretrained"]:.3f} (not seen yet)')
  base = nnx.clone(model)  # a pristine copy, to reload the adapter onto

  # 2. LoRA -----------------------------------------------------------------
  targets = surgery.apply_lora(model, rank=_RANK, alpha=_ALPHA,
                               where=_LORA_WHERE, dry_run=True)
  surgery.apply_lora(model, rank=_RANK, alpha=_ALPHA, where=_LORA_WHERE,
                     rngs=nnx.Rngs(args.seed + 1))
  s = surgery.summary(model)
  kinds = {}
  for _, m in nnx.iter_modules(model):
    if hasattr(m, 'lora') and hasattr(m, 'wrapped'):
      kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
  params['trainable'], params['total'] = s.trainable, s.total
  print(f'\n[2/7] LoRA fine-tune on weather reports: apply_lora(rank={_RANK}, '
        f'alpha={_ALPHA:g}) on attention q/k/v/o and MLP up/down: '
        f'{len(targets)} layers ('
        + ', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) + ')')
  print(f'  trainable {s.trainable:,} of {s.total:,} params '
        f'({100 * s.trainable_fraction:.1f}%); the base stays frozen')
  curves['LoRA fine-tuning (weather)'] = _train(
      model, nnx.LoRAParam, corpus.finetune_train, steps=args.steps,
      lr=1e-2, seed=args.seed + 1, label='LoRA')
  evals['lora'], lora_logits = _evaluate(model, fine_eval)
  print(f'  held-out loss on weather reports: {evals["pretrained"]:.3f} -> '
        f'{evals["lora"]:.3f}')
  print('  greedy sample: ' + repr(_sample(model, corpus, 'Monday: ', 64)))
  html = os.path.join(out, 'model.html')
  with open(html, 'w', encoding='utf-8') as f:
    f.write(_page(
        treescope.render_to_html(model.blocks[0], compressed=False),
        treescope.render_to_html(model, compressed=False)))
  files['treescope page of the LoRA model'] = html

  # 3. Save the adapter, reload it onto a fresh copy of the base ----------
  adapter_dir = os.path.join(out, 'adapter')
  checkpoint.save_adapter(adapter_dir, model, overwrite=True)
  files['LoRA adapter (orbax + adapter_config.json)'] = adapter_dir
  reloaded = checkpoint.load_adapter(adapter_dir, nnx.clone(base))
  evals['reloaded'], _ = _evaluate(reloaded, fine_eval)
  size = sum(
      os.path.getsize(os.path.join(d, name))
      for d, _, names in os.walk(adapter_dir)
      for name in names
  )
  print(f'\n[3/7] save_adapter: only the {s.trainable:,} LoRA params '
        f'({size / 1024:.0f} KiB on disk); load_adapter onto a fresh base: '
        f'loss {evals["reloaded"]:.3f}')

  # 4. merge_lora -----------------------------------------------------------
  surgery.merge_lora(model)
  evals['merged'], merged_logits = _evaluate(model, fine_eval)
  diff = float(jnp.max(jnp.abs(merged_logits - lora_logits)))
  print(f'\n[4/7] merge_lora: adapters folded into the kernels, wrappers '
        f'gone: loss {evals["merged"]:.3f} (max |logit change| {diff:.1e})')
  merged = nnx.clone(model)

  # 5. Post-training quantization -------------------------------------------
  n_w, float_bytes = _weight_bytes(model)
  bpw['float32'] = 8 * float_bytes / n_w
  print(f'\n[5/7] quantize (post-training) the {n_w:,} weights of the '
        'Einsum/Linear kernels:')
  print(f'  {"":<16}{"loss":>8}{"bits/weight":>13}{"kernel bytes":>14}')
  print(f'  {"float32":<16}{evals["merged"]:>8.3f}{bpw["float32"]:>13.2f}'
        f'{float_bytes:>14,}')
  for method in ('int4', 'q4_0'):
    q = surgery.quantize(nnx.clone(merged), method=method)
    evals[f'ptq/{method}'], _ = _evaluate(q, fine_eval)
    _, nbytes = _weight_bytes(q)
    bpw[method] = 8 * nbytes / n_w
    print(f'  {method:<16}{evals[f"ptq/{method}"]:>8.3f}{bpw[method]:>13.2f}'
          f'{nbytes:>14,}')

  # 6. QAT with Q4_0 --------------------------------------------------------
  qat_steps = max(1, args.steps // 4)
  print(f'\n[6/7] QAT: simulate_quantization(method="q4_0"), then {qat_steps}'
        ' steps of training through the fake-quantized kernels '
        '(straight-through gradients)')
  surgery.simulate_quantization(model, method='q4_0')
  evals['qat/before'], _ = _evaluate(model, fine_eval)
  curves['QAT with Q4_0 (weather)'] = _train(
      model, nnx.Param, corpus.finetune_train, steps=qat_steps, lr=1e-3,
      seed=args.seed + 2, label='QAT q4_0')
  evals['qat/simulated'], sim_logits = _evaluate(model, fine_eval)
  surgery.quantize(model, method='q4_0')
  evals['qat/q4_0'], real_logits = _evaluate(model, fine_eval)
  real_diff = float(jnp.max(jnp.abs(real_logits - sim_logits)))
  _, nbytes = _weight_bytes(model)
  bpw['qat/q4_0'] = 8 * nbytes / n_w
  print(f'  simulated q4_0 loss {evals["qat/before"]:.3f} -> '
        f'{evals["qat/simulated"]:.3f}; then quantize(method="q4_0") for real:'
        f' {evals["qat/q4_0"]:.3f} (max |logit change| {real_diff:.1e})')
  # The fair comparison: the same extra steps in float32, then PTQ.
  control = nnx.clone(merged)
  _train(control, nnx.Param, corpus.finetune_train, steps=qat_steps,
         lr=1e-3, seed=args.seed + 2, label='float32')
  evals['control/float32'], _ = _evaluate(control, fine_eval)
  surgery.quantize(control, method='q4_0')
  evals['control/q4_0'], _ = _evaluate(control, fine_eval)
  print(f'  control, the same {qat_steps} steps in float32: '
        f'{evals["control/float32"]:.3f}, then post-training q4_0: '
        f'{evals["control/q4_0"]:.3f}')
  print(f'  q4_0 ({bpw["qat/q4_0"]:.2f} bits/weight): QAT '
        f'{evals["qat/q4_0"]:.3f} vs post-training '
        f'{evals["control/q4_0"]:.3f} at the same training budget')

  # 7. Files ----------------------------------------------------------------
  png = _save_curve(os.path.join(out, 'loss_curve.png'), curves)
  if png:
    files['loss curve'] = png
  seconds = time.perf_counter() - t0
  print(f'\n[7/7] files in {out}:')
  for name, path in files.items():
    print(f'  {name + ":":<44} {path}')
  print(f'done in {seconds:.0f} s')
  return DemoResult(eval_loss=evals, params=params, bytes_per_weight=bpw,
                    files=files, seconds=seconds)


if __name__ == '__main__':
  main()

"""Tests for peft/demo.py: a tiny end-to-end run, files, printed numbers."""

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft import demo

# Independent arithmetic for the demo architecture (d_model 64, 2 heads of 32,
# MLP 256, 2 blocks, context 64, vocabulary padded to 64).
_D, _MLP, _V, _T, _R = 64, 256, 64, 64, 8
_BLOCK = (2 * 2 * _D                          # two LayerNorms
          + 4 * _D * _D                       # q, k, v, o einsum kernels
          + _D * _MLP + _MLP + _MLP * _D + _D)  # up, down (+ biases)
_BASE = _V * _D + _T * _D + 2 * _BLOCK + 2 * _D + _D * _V + _V
# LoRA: q, k, v, o: a (64, r) + b (r, 64) each; up: (64, r) + (r, 256);
# down: (256, r) + (r, 64).
_LORA = 2 * (4 * (_R * _D + _R * _D) + 2 * (_R * _D + _R * _MLP))
_KERNELS = 2 * (4 * _D * _D + 2 * _D * _MLP) + _D * _V
# int4: half a byte per value + one float32 scale per output channel
# (q/k/v: 2x32 outputs, o: 64, up: 256, down: 64, head: 64).
_INT4_BYTES = _KERNELS // 2 + 4 * (2 * (3 * 64 + 64 + _MLP + _D) + _V)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp('demo')
  import contextlib
  import io

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    result = demo.main(['--steps', '4', '--out', str(out), '--seed', '1'])
  return result, buf.getvalue(), out


def test_files_exist(run):
  result, printed, out = run
  html = out / 'model.html'
  assert html.is_file() and html.stat().st_size > 10_000
  text = html.read_text(encoding='utf-8')
  assert 'LoRAEinsum' in text and 'LoRALinear' in text
  png = out / 'loss_curve.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert png.stat().st_size > 5_000
  config = json.loads((out / 'adapter' / 'adapter_config.json').read_text())
  assert config['rank'] == 8 and config['alpha'] == 16.0
  assert len(config['targets']) == 12
  assert ['blocks', 0, 'attn', 'q'] in config['targets']
  assert (out / 'adapter' / 'lora').is_dir()
  # every file is announced with its path
  for path in result.files.values():
    assert os.path.exists(path)
    assert path in printed


def test_printed_sections_and_counts(run):
  _, printed, _ = run
  for i in range(1, 8):
    assert f'[{i}/7]' in printed
  assert f'{_BASE:,} params' in printed
  assert (f'trainable {_LORA:,} of {_BASE + _LORA:,} params '
          f'({100 * _LORA / (_BASE + _LORA):.1f}%)') in printed
  assert '12 layers (8 LoRAEinsum, 4 LoRALinear)' in printed
  # progress bars with the loss
  assert re.search(r'pretrain +\[#+\] +4/4 loss +\d+\.\d{3}', printed)
  assert re.search(r'LoRA +\[#+\] +4/4 loss +\d+\.\d{3}', printed)
  assert 'files in ' in printed


def test_numbers_are_sane(run):
  result, printed, _ = run
  losses = result.eval_loss
  for name, value in losses.items():
    assert math.isfinite(value) and 0 < value < math.log(_V) + 2, name
  # reloading the saved adapter gives the same model
  assert losses['reloaded'] == losses['lora']
  # merging changes the function only by float rounding
  assert abs(losses['merged'] - losses['lora']) < 1e-4
  # real Q4_0 computes what the simulated Q4_0 computed
  assert abs(losses['qat/q4_0'] - losses['qat/simulated']) < 1e-4
  assert result.params == {'base': _BASE, 'trainable': _LORA,
                           'total': _BASE + _LORA}
  bpw = result.bytes_per_weight
  assert bpw['float32'] == 32.0
  assert bpw['q4_0'] == 4.5 and bpw['qat/q4_0'] == 4.5  # 18 bytes / 32
  assert bpw['int4'] == pytest.approx(8 * _INT4_BYTES / _KERNELS)
  assert f'{_INT4_BYTES:>14,}' in printed


def test_help(capsys):
  with pytest.raises(SystemExit) as e:
    demo.main(['--help'])
  assert e.value.code == 0
  usage = capsys.readouterr().out
  for flag in ('--steps', '--out', '--seed'):
    assert flag in usage


def test_bad_steps():
  with pytest.raises(SystemExit) as e:
    demo.main(['--steps', '0'])
  assert e.value.code == 2


def test_data_and_model_are_deterministic():
  a, b = demo._load_corpus(), demo._load_corpus()
  np.testing.assert_array_equal(a.finetune_eval, b.finetune_eval)
  assert a.vocab_size % 32 == 0 and len(a.chars) <= a.vocab_size
  m1 = demo.TinyTransformer(a.vocab_size, rngs=nnx.Rngs(3))
  m2 = demo.TinyTransformer(a.vocab_size, rngs=nnx.Rngs(3))
  x = jnp.asarray(a.pretrain[None, :16])
  np.testing.assert_array_equal(np.asarray(m1(x)), np.asarray(m2(x)))
  assert m1(x).shape == (1, 16, a.vocab_size)

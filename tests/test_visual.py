"""Tests for peft/nnx/visual.py: treescope text, HTML, and headless Chromium."""

import os
import re
import shutil
import struct
import subprocess

import jax
import numpy as np
import pytest
import treescope
from flax import nnx

from peft.nnx import lora
from peft.nnx import quantized
from peft.nnx import surgery
from peft.nnx import visual


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(64, 128, rngs=rngs)
    self.down = nnx.Linear(128, 64, rngs=rngs)
    self.attn = nnx.Einsum('btd,dhk->bthk', (64, 2, 32), rngs=rngs)


def _model():
  """up: LoRA on a float base; down: LoRA on a Q4_0 base; attn: int4."""
  model = _Net(nnx.Rngs(0))
  surgery.quantize(model, method='q4_0', where='down')
  surgery.quantize(model, method='int4', where='attn')
  surgery.apply_lora(model, rank=8, alpha=16.0, where='up|down',
                     rngs=nnx.Rngs(1))
  return model


def test_every_wrapper_class_has_its_own_rendering():
  for cls in (lora.LoRALinear, lora.LoRAEinsum, lora.LoRALinearGeneral,
              lora.LoRALinearAdapter, lora.LoRAEinsumAdapter,
              lora.LoRALinearGeneralAdapter, quantized.Int4Linear,
              quantized.Int4Einsum, quantized.Int4LinearGeneral,
              quantized.SimulateQuantizedLinear,
              quantized.SimulateQuantizedEinsum,
              quantized.SimulateQuantizedLinearGeneral):
    assert cls.__treescope_repr__ is not nnx.Module.__treescope_repr__, cls


def test_lora_linear_text_header_and_counts():
  layer = lora.LoRALinear(nnx.Linear(1024, 1024, rngs=nnx.Rngs(0)), rank=8,
                          alpha=16.0, rngs=nnx.Rngs(1))
  text = treescope.render_to_text(layer)
  first = text.splitlines()[0]
  assert first.startswith('LoRALinear(rank=8, scale=2.0) ▸ Linear(1024→1024)')
  # trainable = a + b = 2 * 1024 * 8; frozen = kernel + bias
  assert f'trainable {2 * 1024 * 8:,}' in first
  assert f'frozen {1024 * 1024 + 1024:,}' in first
  assert '# frozen' in text and '# trainable' in text
  assert 'LoRAAdapter(rank=8, scale=2.0, a 1024×8, b 8×1024)' in text


def test_model_text_names_wrappers_ranks_and_methods():
  text = treescope.render_to_text(_model())
  assert 'LoRALinear(rank=8, scale=2.0) ▸ Linear(64→128)' in text
  # the LoRA header names the quantized base and its method
  assert 'LoRALinear(rank=8, scale=2.0) ▸ Int4Linear(method=q4_0, 128→64)' in text
  assert 'Int4Einsum(method=int4, btd,dhk->bthk: 64×2×32)' in text


def test_lora_over_simulated_base_shows_the_chain():
  model = _Net(nnx.Rngs(0))
  surgery.apply_lora(model, rank=4, where='up', rngs=nnx.Rngs(1))
  surgery.simulate_quantization(model, method='q4_0', where='up')
  text = treescope.render_to_text(model.up)
  assert text.startswith('LoRALinear(rank=4, scale=1.0) ▸ '
                         'SimulateQuantizedLinear(method=q4_0) ▸ '
                         'Linear(64→128)')


def test_quantized_text_shows_real_bytes():
  layer = quantized.Int4Linear.from_float(
      nnx.Linear(128, 64, rngs=nnx.Rngs(0)), method='q4_0')
  text = treescope.render_to_text(layer)
  # ggml Q4_0: 18 bytes per block of 32 weights along the last axis
  nbytes = 128 * 64 // 32 * 18
  assert f'{nbytes / 1024:.2f} KiB real' in text
  assert '4.50 bits/weight' in text
  assert f'float32: {128 * 64 * 4 / 1024:.2f} KiB' in text

  layer = quantized.Int4Linear.from_float(
      nnx.Linear(128, 64, rngs=nnx.Rngs(0)), method='int4')
  text = treescope.render_to_text(layer)
  # int4 values (half a byte) + one float32 scale per output channel
  nbytes = 128 * 64 // 2 + 64 * 4
  assert f'{nbytes / 1024:.2f} KiB real' in text
  assert f'{8 * nbytes / (128 * 64):.2f} bits/weight' in text


def test_simulated_text():
  layer = quantized.SimulateQuantizedLinear(
      nnx.Linear(64, 32, rngs=nnx.Rngs(0)), method='q4_0')
  text = treescope.render_to_text(layer)
  assert text.startswith(
      'SimulateQuantizedLinear(method=q4_0) ▸ Linear(64→32)')
  assert 'QAT' in text


def test_describe():
  assert visual.describe(nnx.Linear(3, 5, rngs=nnx.Rngs(0))) == 'Linear(3→5)'
  einsum = nnx.Einsum('btd,dhk->bthk', (64, 2, 32), rngs=nnx.Rngs(0))
  assert visual.describe(einsum) == 'Einsum(btd,dhk->bthk: 64×2×32)'
  wrapped = lora.LoRAEinsum(einsum, rank=4, rngs=nnx.Rngs(1))
  assert visual.describe(wrapped) == (
      'LoRAEinsum(rank=4, scale=1.0) ▸ Einsum(btd,dhk->bthk: 64×2×32)')
  general = nnx.LinearGeneral(64, (2, 32), rngs=nnx.Rngs(0))
  assert visual.describe(general) == 'LinearGeneral(64→2×32)'


def test_stacked_layers_are_labelled():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(8, 4, rngs=nnx.Rngs(key))

  stacked = make(jax.random.split(jax.random.key(0), 3))
  assert visual.describe(stacked) == 'Linear(8→4, stacked 3)'


def test_abstract_model_renders():
  abstract = nnx.eval_shape(_model)
  text = treescope.render_to_text(abstract)
  assert 'LoRALinear(rank=8' in text


def test_broken_renderer_falls_back_to_default():
  layer = lora.LoRALinear(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rank=2,
                          rngs=nnx.Rngs(1))
  del layer.lora  # the custom renderer needs it
  text = treescope.render_to_text(layer)
  assert text.startswith('LoRALinear(')


def test_html_rendering():
  html = treescope.render_to_html(_model())
  assert '<script' in html and 'treescope' in html
  plain = treescope.render_to_html(_model(), compressed=False)
  assert 'LoRALinear' in plain and 'Int4Linear' in plain


# --------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------

_CHROMIUM = shutil.which('chromium') or (
    '/usr/bin/chromium' if os.path.exists('/usr/bin/chromium') else None)

# The treescope page draws into a shadow root; this probe copies the rendered
# text into the ordinary DOM once it is there, so --dump-dom can show it.
_PROBE = """
<pre id="peft-probe"></pre>
<script>
(function poll(n) {
  const c = document.querySelector('treescope-container');
  const r = c && c.shadowRoot ? c.shadowRoot.querySelector('.treescope_root')
                              : null;
  const t = r ? r.innerText : '';
  const out = document.getElementById('peft-probe');
  if (t) { out.textContent = 'RENDERED:' + t; }
  else if (n > 0) { setTimeout(() => poll(n - 1), 50); }
  else { out.textContent = 'TIMEOUT'; }
})(1200);  // up to 60 s of (virtual) time
</script>
"""


def _chromium(args, tmp_path, name):
  flags = [
      _CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu',
      '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync',
      f'--user-data-dir={tmp_path / ("profile-" + name)}',
      '--virtual-time-budget=60000',
  ]
  return subprocess.run(flags + args, capture_output=True, text=True,
                        timeout=180, check=False)


@pytest.mark.skipif(
    _CHROMIUM is None,
    reason='headless Chromium not installed (Debian: apt-get install -y '
    'chromium); the HTML rendering check needs a browser')
def test_html_renders_in_headless_chromium(tmp_path):
  page = tmp_path / 'model.html'
  html = treescope.render_to_html(_model(), compressed=False)
  page.write_text(
      '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
      + html + _PROBE + '</body></html>', encoding='utf-8')
  url = page.as_uri()

  png = tmp_path / 'shot.png'
  _chromium([f'--screenshot={png}', '--window-size=1200,800', url],
            tmp_path, 'shot')
  assert png.exists(), 'chromium wrote no screenshot'
  data = png.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  width, height = struct.unpack('>II', data[16:24])
  assert (width, height) == (1200, 800)
  import matplotlib.image  # pylint: disable=g-import-not-at-top

  pixels = matplotlib.image.imread(str(png))[..., :3]
  non_white = np.mean(np.any(pixels < 0.9, axis=-1))
  assert non_white > 0.02, f'screenshot nearly blank ({non_white:.3%} ink)'
  colors = {tuple(c) for c in np.round(pixels.reshape(-1, 3), 1)}
  assert len(colors) > 10  # coloured blocks, not just text

  result = _chromium(['--dump-dom', url], tmp_path, 'dom')
  match = re.search(r'<pre id="peft-probe">(.*?)</pre>', result.stdout, re.S)
  assert match, 'no probe element in the dumped DOM'
  text = match.group(1)
  assert text.startswith('RENDERED:'), text[:200]
  assert 'LoRALinear(rank=8, scale=2.0) ▸ Linear(64→128)' in text
  assert 'Int4Linear(method=q4_0' in text
  assert 'Int4Einsum(method=int4' in text

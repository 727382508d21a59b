"""Tests for peft/checkpoint/_atomic.py: atomic saves, killed saves."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft import checkpoint
from peft.nnx import surgery
from test_checkpoint import _Net
from test_checkpoint import _trained
from test_checkpoint import _x


# --------------------------------------------------------------------------
# Atomic save: leftovers of a killed save
# --------------------------------------------------------------------------


def _leftover_names(tmp_path):
  return sorted(p.name for p in tmp_path.iterdir() if '.peft-' in p.name)


def test_save_leaves_no_temporary_directories(tmp_path):
  model, _ = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', model)
  checkpoint.save_adapter(tmp_path / 'ad', model, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['ad']


def test_kill_between_the_two_renames_loads_the_previous_adapter(tmp_path):
  """The state a save killed after 'old aside', before 'new in', leaves."""
  old, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', old)
  (tmp_path / 'ad' / 'notes.txt').write_text('mine')
  os.rename(tmp_path / 'ad', tmp_path / '.ad.peft-old-x1')
  os.makedirs(tmp_path / '.ad.peft-new-x2' / 'lora')  # the half-written new
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base))
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(old(_x())))
  assert checkpoint.read_adapter_config(tmp_path / 'ad')['rank'] == 4
  # The next save puts the previous one back first: overwrite rules apply.
  new, _ = _trained(rank=2)
  with pytest.raises(ValueError, match='overwrite=True'):
    checkpoint.save_adapter(tmp_path / 'ad', new)
  assert _leftover_names(tmp_path) == []
  assert (tmp_path / 'ad' / 'notes.txt').read_text() == 'mine'
  checkpoint.save_adapter(tmp_path / 'ad', new, overwrite=True)
  assert (tmp_path / 'ad' / 'notes.txt').read_text() == 'mine'
  assert checkpoint.read_adapter_config(tmp_path / 'ad')['rank'] == 2


def test_half_written_new_adapter_is_ignored(tmp_path):
  old, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', old)
  os.makedirs(tmp_path / '.ad.peft-new-x3' / 'lora')
  loaded = checkpoint.load_adapter(tmp_path / 'ad', nnx.clone(base))
  np.testing.assert_array_equal(np.asarray(loaded(_x())),
                                np.asarray(old(_x())))


def test_failed_save_keeps_the_previous_adapter(tmp_path):
  old, base = _trained()
  checkpoint.save_adapter(tmp_path / 'ad', old)
  new, _ = _trained(rank=2)
  with pytest.raises(TypeError, match='metadata'):
    checkpoint.save_adapter(tmp_path / 'ad', new, overwrite=True,
                            metadata={'bad': object()})
  assert sorted(os.listdir(tmp_path)) == ['ad']
  assert checkpoint.read_adapter_config(tmp_path / 'ad')['rank'] == 4


def test_save_pytree_overwrite_is_atomic_too(tmp_path):
  checkpoint.save_pytree(tmp_path / 'p', {'w': np.ones(3, np.float32)})
  checkpoint.save_pytree(tmp_path / 'p', {'w': np.zeros(3, np.float32)},
                         overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['p']
  os.rename(tmp_path / 'p', tmp_path / '.p.peft-old-x')
  np.testing.assert_array_equal(
      checkpoint.restore_pytree(tmp_path / 'p')['w'], np.zeros(3))


# A process that imports everything once, then forks one saver per round (no
# JAX backend exists before the fork: nothing runs in the parent). The saver
# writes adapter versions v, v+1, ... forever; every array and the scale of
# version v encode v, so a loaded adapter shows which version it is and
# whether it is whole.
_SAVER = r'''
import os, pickle, sys
import jax, numpy as np
from flax import nnx
from peft import checkpoint
from peft.nnx import surgery

sys.path.insert(0, sys.argv[2])
from test_checkpoint import _Net

target = sys.argv[1]
with open(sys.argv[3], 'rb') as f:
  values = pickle.load(f)
while True:
  line = sys.stdin.readline()
  if not line:
    break
  pid = os.fork()
  if pid == 0:
    v = int(line)
    # Built abstractly and filled with numpy values: nothing to compile.
    abstract = nnx.eval_shape(lambda: surgery.apply_lora(
        _Net(nnx.Rngs(0)), rank=4, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, values)
    model = nnx.merge(graphdef, state)
    while True:
      for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):
          var.set_value(np.full(var.get_value().shape, v, np.float32))
      model.proj.lora.scale.set_value(np.float32(v))
      checkpoint.save_adapter(target, model, overwrite=True)
      with open(sys.argv[4], 'a') as f:  # version v is saved
        f.write(f'{v}\n')
      v += 1
  print(pid, flush=True)
  os.waitpid(pid, 0)
  print('reaped', flush=True)
'''


def _version_of(model):
  """The version a loaded adapter encodes; AssertionError if not whole."""
  leaves = [np.asarray(x) for x in
            jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]
  v = float(leaves[0].reshape(-1)[0])
  assert all(np.all(x == v) for x in leaves), 'a mix of versions'
  assert float(model.proj.lora.scale[...]) == v, 'scale of another version'
  return int(v)


def test_save_adapter_survives_sigkill_at_random_moments(tmp_path):
  import random  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  kills = 24
  target = tmp_path / 'ad'
  first = surgery.apply_lora(_Net(nnx.Rngs(0)), rank=4, rngs=nnx.Rngs(1))
  nnx.update(first, jax.tree.map(jnp.zeros_like,
                                 nnx.state(first, nnx.LoRAParam)))
  first.proj.lora.scale[...] = 0.0
  checkpoint.save_adapter(target, first)  # version 0: the "previous" one
  script = tmp_path / 'saver.py'
  script.write_text(_SAVER)
  progress = tmp_path / 'progress.txt'
  import pickle  # pylint: disable=g-import-not-at-top
  values = tmp_path / 'values.pkl'
  values.write_bytes(pickle.dumps(jax.tree.map(
      np.asarray, nnx.to_pure_dict(nnx.state(first)))))
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(tests_dir), os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.Popen(
      [sys.executable, str(script), str(target), tests_dir, str(values),
       str(progress)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
  rng = random.Random(0)

  def first_saved(deadline=120.0):
    """Waits for this round's first completed save; returns its version."""
    t = time.monotonic()
    while time.monotonic() - t < deadline:
      lines = progress.read_text().split('\n')[:-1]
      if lines:
        return int(lines[0])
      time.sleep(0.02)
    raise AssertionError('the saver wrote nothing in 120 s')

  last, whole, lost, mid_save, no_target, newer = 0, 0, 0, 0, 0, 0
  errors = []
  start = time.monotonic()
  try:
    for k in range(kills):
      base_v = (k + 1) * 1000
      progress.write_text('')
      proc.stdin.write(f'{base_v}\n')
      proc.stdin.flush()
      pid = int(proc.stdout.readline())
      try:
        done = first_saved()
      finally:
        # The saver writes version after version: a random moment of a save.
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(pid, signal.SIGKILL)
      assert proc.stdout.readline().strip() == 'reaped'
      if _leftover_names(tmp_path):
        mid_save += 1
      if not target.exists():
        no_target += 1
      try:
        loaded = checkpoint.load_adapter(target, _Net(nnx.Rngs(0)),
                                         strict=True)
        v = _version_of(loaded)
        # At least the save that completed before the kill; this round's.
        assert done <= v < base_v + 1000, (v, done)
      except Exception as e:  # pylint: disable=broad-except
        lost += 1
        errors.append(f'kill {k}: {type(e).__name__}: {e}')
        continue
      whole += 1
      newer += v != last
      last = v
  finally:
    proc.stdin.close()
    proc.wait(timeout=60)
  seconds = time.monotonic() - start
  print(f'\nsave_adapter fault injection: {kills} SIGKILLs at random moments,'
        f' {whole} adapters loaded whole, {lost} lost; {mid_save} kills left'
        f' a half-done save behind, {no_target} between the two renames;'
        f' {newer} rounds advanced the version; {seconds:.1f} s')
  assert lost == 0, errors
  assert whole == kills
  assert newer == kills  # every round's saver got adapters written

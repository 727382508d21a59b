"""LoRA and QLoRA on a 2x4 device mesh: shardings are inherited, training runs.

The device-dependent part runs once, in a subprocess with 8 simulated CPU
devices (`tests/_sharding_script.py`), so the rest of the suite keeps one
device. The script trains a small transformer (Einsum attention, Linear MLP,
LinearGeneral head, kernels annotated with `nnx.with_partitioning` /
`nn.with_partitioning`) for a few jitted LoRA-only steps and reports the
`PartitionSpec` of every LoRA factor and quantized storage array; the expected
specs below are written out by hand from the kernels' sharding names:

* `a` = the kernel's names on its contracted (input) axes, then `None` (rank);
* `b` = `None` (rank), then the kernel's names on its output axes;
* int4/int8 `values` = the kernel's names; `scale` = the kernel's names with
  `None` on the reduced axes; Q4_0 `values` (in, out // 32, 16) =
  (in_name, out_name, None) and `scale` (in, out // 32) = (in_name, out_name).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).with_name('_sharding_script.py')

# Kernel names of the script's model (tests/_sharding_script.py, NAMES).
_D, _M = 'data', 'model'
_NNX_LORA = {
    # Einsum 'btd,dhk->bthk', kernel (d, h, k) = ('data', 'model', None).
    'attn/q': ([_D, None], [None, _M, None]),
    'attn/k': ([_D, None], [None, _M, None]),
    'attn/v': ([_D, None], [None, _M, None]),
    # Einsum 'bthk,hkd->btd', kernel (h, k, d) = ('model', None, 'data').
    'attn/o': ([_M, None, None], [None, _D]),
    'mlp/up': ([_D, None], [None, _M]),       # Linear ('data', 'model')
    'mlp/down': ([_M, None], [None, _D]),     # Linear ('model', 'data')
    'head': ([_D, None], [None, _M]),         # LinearGeneral ('data', 'model')
}
_LINEN_LORA = {k.split('/')[-1]: v for k, v in _NNX_LORA.items()}
_KERNELS = {
    'attn/q': [_D, _M, None], 'attn/k': [_D, _M, None],
    'attn/v': [_D, _M, None], 'attn/o': [_M, None, _D],
    'mlp/up': [_D, _M], 'mlp/down': [_M, _D], 'head': [_D, _M],
}
# Axes each kernel's per-channel int scale reduces over (contracted axes).
_REDUCED = {'attn/q': (0,), 'attn/k': (0,), 'attn/v': (0,),
            'attn/o': (0, 1), 'mlp/up': (0,), 'mlp/down': (0,), 'head': (0,)}

@pytest.fixture(scope='module')
def results():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  # As in the test process (pyproject's filterwarnings): a jax/flax
  # deprecation raised by peft code fails the scenario that triggers it
  # (treescope walking jax's namespace is third-party code: ignored).
  env['PYTHONWARNINGS'] = ('error::DeprecationWarning,'
                           'ignore::DeprecationWarning:treescope.canonical_aliases')
  proc = subprocess.run(
      [sys.executable, str(_SCRIPT)], env=env, capture_output=True,
      text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _scenario(results, name):
  res = results[name]
  if 'error' in res:
    pytest.fail(f'{name} raised {res["error"]}\n{res["traceback"]}')
  return res


def _lora_specs(res, key):
  return {p: v['spec'] for p, v in res[key].items()}


def _expected_lora(table):
  out = {}
  for layer, (a, b) in table.items():
    out[f'{layer}/lora/a'] = a
    out[f'{layer}/lora/b'] = b
  return out


def test_runs_on_eight_devices(results):
  assert results['n_devices'] == 8


_NNX = ['nnx_lora', 'nnx_qlora']


@pytest.mark.parametrize('name', _NNX + ['linen_lora', 'nnx_multi'])
def test_jitted_lora_step_loss_falls(results, name):
  losses = _scenario(results, name)['losses']
  assert all(l == l for l in losses), losses  # no NaN
  assert losses[-1] < losses[0] - 1e-3, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize('name', _NNX + ['linen_lora'])
def test_kernels_are_sharded_as_annotated(results, name):
  res = _scenario(results, name)
  for layer, spec in _KERNELS.items():
    key = layer if name != 'linen_lora' else layer.split('/')[-1]
    assert res['kernels'][f'{key}/kernel'] == spec, (layer, res['kernels'])


@pytest.mark.parametrize('when', ['lora_before', 'lora_after'])
def test_nnx_lora_factors_inherit_kernel_names(results, when):
  res = _scenario(results, 'nnx_lora')
  assert _lora_specs(res, when) == _expected_lora(_NNX_LORA)


@pytest.mark.parametrize('when', ['lora_before', 'lora_after'])
def test_nnx_qlora_factors_inherit_kernel_names(results, when):
  res = _scenario(results, 'nnx_qlora')
  assert _lora_specs(res, when) == _expected_lora(_NNX_LORA)


@pytest.mark.parametrize('when', ['lora_before', 'lora_after'])
def test_named_adapter_banks_keep_kernel_names(results, when):
  """Every named adapter's factors carry the kernel's names on the non-rank
  axes, before and after a jitted step routed per example."""
  res = _scenario(results, 'nnx_multi')
  expected = {}
  for layer, (a, b) in _NNX_LORA.items():
    expected[f'{layer}/lora/a'] = a
    expected[f'{layer}/lora/b'] = b
    expected[f'{layer}/adapters/task_b/a'] = a
    expected[f'{layer}/adapters/task_b/b'] = b
  assert _lora_specs(res, when) == expected


def _storage(res, key, layer):
  """(values_spec, scale_spec) of the quantized storage of `layer`."""
  quant = res[key]
  hits = [v for p, v in quant.items() if p.startswith(layer + '/')
          and 'lora' not in p]
  assert len(hits) == 1, (layer, sorted(quant))
  (hit,) = hits
  if 'values_spec' in hit:
    return hit['values_spec'], hit['scale_spec']
  return hit['values']['spec'], hit['scale']['spec']


@pytest.mark.parametrize('key', ['quant', 'quant_after'])
@pytest.mark.parametrize('layer', ['attn/q', 'attn/k', 'attn/v', 'attn/o'])
def test_int4_storage_sharded_like_kernel(results, key, layer):
  res = _scenario(results, 'nnx_qlora')
  values, scale = _storage(res, key, layer)
  kernel = _KERNELS[layer]
  expected_scale = [None if i in _REDUCED[layer] else n
                    for i, n in enumerate(kernel)]
  assert values == kernel
  assert scale == expected_scale


@pytest.mark.parametrize('key', ['quant', 'quant_after'])
@pytest.mark.parametrize('layer', ['mlp/up', 'mlp/down', 'head'])
def test_q4_0_storage_sharded_like_kernel(results, key, layer):
  res = _scenario(results, 'nnx_qlora')
  values, scale = _storage(res, key, layer)
  in_name, out_name = _KERNELS[layer]
  # Blocks of 32 along the kernel's last (output) axis: (in, out//32, 16).
  assert values == [in_name, out_name, None]
  assert scale == [in_name, out_name]


@pytest.mark.parametrize('key', ['quant', 'quant_after'])
@pytest.mark.parametrize('layer', sorted(_KERNELS))
def test_quantized_storage_metadata_matches_placement(results, key, layer):
  """nnx.get_partition_spec of values / scale = how they are placed."""
  res = _scenario(results, 'nnx_qlora')
  hits = [v for p, v in res[key].items() if p.startswith(layer + '/')
          and 'lora' not in p]
  assert len(hits) == 1, (layer, sorted(res[key]))
  (hit,) = hits
  assert hit['values_metadata_spec'] == hit['values_spec']
  assert hit['scale_metadata_spec'] == hit['scale_spec']


def test_linen_lora_factors_carry_partitioning_metadata(results):
  res = _scenario(results, 'linen_lora')
  assert res['lora_metadata_specs'] == _expected_lora(_LINEN_LORA)


def test_linen_lora_factors_placed_at_init(results):
  res = _scenario(results, 'linen_lora')
  assert _lora_specs(res, 'lora_before') == _expected_lora(_LINEN_LORA)


# quantize_checkpoint of a ('data', 'model') kernel (64, 256): expected specs.
_CHECKPOINT = {
    'int4': {'kernel': [_D, _M], 'scale': [None, _M]},
    'q4_0': {'kernel': [_D, _M, None], 'scale': [_D, _M]},
}


@pytest.mark.parametrize('method', ['int4', 'q4_0'])
def test_linen_quantize_checkpoint_arrays_stay_sharded(results, method):
  res = _scenario(results, 'linen_quantize_checkpoint')[method]
  for name, spec in _CHECKPOINT[method].items():
    assert res[name]['spec'] == spec, (name, res[name])


@pytest.mark.parametrize('method', ['int4', 'q4_0'])
def test_linen_quantize_checkpoint_keeps_partitioning_metadata(results,
                                                               method):
  res = _scenario(results, 'linen_quantize_checkpoint')[method]
  for name, spec in _CHECKPOINT[method].items():
    assert res[name]['metadata_spec'] == spec, (name, res[name])


# ---------------------------------------------------------------------------
# Single-device checks (a 1x1 mesh in this process): the sharding of quantized
# storage must be declared, not only propagated, so that the usual flax
# recipes (abstract model + partition specs -> sharded init / restore) work.


def _one_by_one_mesh():
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
  return jax.make_mesh((1, 1), ('data', 'model'),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=jax.devices()[:1])


def _quantized_mlp():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top

  class Mlp(nnx.Module):

    def __init__(self, rngs):
      self.up = nnx.Linear(64, 256, kernel_init=nnx.with_partitioning(
          nnx.initializers.lecun_normal(), (_D, _M)), rngs=rngs)

  model = Mlp(nnx.Rngs(0))
  return surgery.quantize(model, method='int4')


def test_abstract_quantized_model_under_mesh():
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(_one_by_one_mesh()):
    abstract = nnx.eval_shape(_quantized_mlp)
  q = abstract.up.weight.get_value()
  assert tuple(q.values.shape) == (64, 256)


def test_restore_qlora_model_under_mesh(tmp_path):
  """save_model, then restore_model into nnx.eval_shape's abstract model."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from peft import checkpoint  # pylint: disable=g-import-not-at-top
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top

  def make():
    return surgery.apply_lora(_quantized_mlp(), rank=4, rngs=nnx.Rngs(1))

  with jax.set_mesh(_one_by_one_mesh()):
    model = make()
    path = checkpoint.save_model(tmp_path / 'qlora', model)
    restored = checkpoint.restore_model(path, nnx.eval_shape(make))
  saved, got = model.up.wrapped, restored.up.wrapped
  assert got.values[...].sharding.spec == P(_D, _M)
  assert got.scale[...].sharding.spec == P(None, _M)
  np.testing.assert_array_equal(np.asarray(got.values[...], np.int8),
                                np.asarray(saved.values[...], np.int8))
  x = jnp.ones((2, 64))
  np.testing.assert_array_equal(np.asarray(restored.up(x)),
                                np.asarray(model.up(x)))


def test_partition_spec_of_quantized_storage():
  # The storage is two Variables, `values` and `scale`, each with its own
  # out_sharding (the int4 scale of a (64, 256) kernel is (1, 256)).
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(_one_by_one_mesh()):
    model = _quantized_mlp()
    specs = nnx.get_partition_spec(nnx.state(model))
  got = {name: specs['up'][name].get_value() for name in ('values', 'scale')}
  assert got == {'values': P(_D, _M), 'scale': P(None, _M)}

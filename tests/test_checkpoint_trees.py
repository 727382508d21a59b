"""Tests for peft/checkpoint/trees.py: whole (quantized) models, pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft import checkpoint
from peft.nnx import surgery
from test_checkpoint import _assert_trees_bit_equal
from test_checkpoint import _Net
from test_checkpoint import _x


# --------------------------------------------------------------------------
# Whole quantized NNX models and linen checkpoints
# --------------------------------------------------------------------------


def _quantized(method):
  model = _Net(nnx.Rngs(0))
  return surgery.quantize(model, method=method)


@pytest.mark.parametrize('method', ['int4', 'q4_0'])
def test_quantized_model_round_trip_bit_exact(tmp_path, method):
  model = _quantized(method)
  checkpoint.save_model(tmp_path / 'm', model)
  abstract = nnx.eval_shape(lambda: _quantized(method))
  restored = checkpoint.restore_model(tmp_path / 'm', abstract)
  _assert_trees_bit_equal(nnx.state(model), nnx.state(restored))
  np.testing.assert_array_equal(np.asarray(restored(_x())),
                                np.asarray(model(_x())))
  weight = restored.layers[0].weight.get_value()
  expected = {'int4': 'int4', 'q4_0': 'uint8'}[method]
  assert str(weight.values.dtype) == expected


def test_restore_model_is_strict(tmp_path):
  checkpoint.save_model(tmp_path / 'm', _quantized('int4'))
  with pytest.raises(ValueError, match='mismatch|missing|unexpected'):
    checkpoint.restore_model(tmp_path / 'm',
                             nnx.eval_shape(lambda: _quantized('q4_0')))


def _linen_quantized_params():
  """A linen-style quantized checkpoint dict, built with numpy only."""
  rng = np.random.default_rng(0)
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  codes = rng.integers(-8, 8, size=(64, 32)).astype(ml_dtypes.int4)
  scale = rng.uniform(1, 20, size=(1, 32)).astype(np.float32)
  q4 = rng.integers(0, 256, size=(32, 2, 18)).astype(np.uint8)
  d = rng.normal(size=(32, 2)).astype(np.float16)
  return {
      'params': {
          'Dense_0': {'kernel': jnp.asarray(codes), 'scale': jnp.asarray(scale),
                      'bias': jnp.zeros((32,), jnp.float32)},
          'Einsum_0': {'kernel': jnp.asarray(q4), 'scale': jnp.asarray(d)},
      }
  }


def test_linen_quantized_checkpoint_round_trip_bit_exact(tmp_path):
  params = _linen_quantized_params()
  checkpoint.save_pytree(tmp_path / 'p', params)
  # restore against a target (e.g. jax.eval_shape of init) ...
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  restored = checkpoint.restore_pytree(tmp_path / 'p', target)
  _assert_trees_bit_equal(params, restored)
  assert restored['params']['Dense_0']['kernel'].dtype == jnp.int4
  # ... and without one: dtypes as saved
  again = checkpoint.restore_pytree(tmp_path / 'p')
  _assert_trees_bit_equal(params, again)


def test_restore_pytree_strict_errors(tmp_path):
  params = _linen_quantized_params()
  checkpoint.save_pytree(tmp_path / 'p', params)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  target['params']['Dense_0']['kernel'] = jax.ShapeDtypeStruct((64, 16),
                                                               jnp.int4)
  del target['params']['Einsum_0']['scale']
  target['params']['Dense_1'] = {'kernel': jax.ShapeDtypeStruct((2,),
                                                                jnp.float32)}
  with pytest.raises(ValueError) as e:
    checkpoint.restore_pytree(tmp_path / 'p', target)
  msg = str(e.value)
  assert 'missing keys' in msg and 'params/Dense_1/kernel' in msg
  assert 'unexpected keys' in msg and 'params/Einsum_0/scale' in msg
  assert 'params/Dense_0/kernel: checkpoint int4[64, 32], model int4[64, 16]' in msg

"""Tests for QuantizationMethod.NF4 in peft.quantization (quantize /
dequantize / simulate_quantize), against bitsandbytes' golden files and the
`peft.nf4` codec."""

import os

from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import nf4
from peft import quantization as quant
from peft.quantization import QuantizationMethod as QM

_GOLDEN = np.load(os.path.join(os.path.dirname(__file__), 'fixtures',
                               'nf4_golden.npz'))
# bitsandbytes cases whose rows are whole blocks of 64 (a kernel layout).
_CASES = [str(c) for c in _GOLDEN['cases']
          if f'{c}/input' in _GOLDEN and _GOLDEN[f'{c}/input'].ndim == 2
          and _GOLDEN[f'{c}/input'].shape[1] % 64 == 0]


def _bits(a):
  return np.asarray(a, np.float32).view(np.uint32)


def assert_bit_equal(actual, expected):
  np.testing.assert_array_equal(_bits(actual), _bits(expected))


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_cases_cover_edge_blocks():
  assert {'normal_128x256', 'outlier_16x64', 'ties_4x64',
          'all_zero_2x64'} <= set(_CASES)


@pytest.mark.parametrize('tag', ['plain', 'dq'])
@pytest.mark.parametrize('case', _CASES)
def test_nf4_method_matches_bitsandbytes(case, tag):
  """A JAX [in, out] kernel = bitsandbytes' PyTorch [out, in] weight, transposed."""
  weight = _GOLDEN[f'{case}/input']  # [out, in]
  kernel = jnp.asarray(weight.T)
  qa = quant.quantize(kernel, QM.NF4, double_quant=(tag == 'dq'))
  codes = np.asarray(qa.values).T.reshape(-1)  # back to bnb's [out, in/2]
  np.testing.assert_array_equal(codes, _GOLDEN[f'{case}/{tag}/codes'])
  if tag == 'plain':
    assert_bit_equal(np.asarray(qa.scale).T.reshape(-1),
                     _GOLDEN[f'{case}/plain/absmax'])
  else:
    np.testing.assert_array_equal(np.asarray(qa.scale).T.reshape(-1),
                                  _GOLDEN[f'{case}/dq/absmax_codes'])
    assert_bit_equal(qa.stats[1:], _GOLDEN[f'{case}/dq/absmax_scale'])
  expected = _GOLDEN[f'{case}/{tag}/dequantized'].T
  assert_bit_equal(quant.dequantize(qa), expected)
  assert_bit_equal(quant.simulate_quantize(kernel, 'nf4',
                                           double_quant=(tag == 'dq')),
                   expected)


@pytest.mark.parametrize('dq', [False, True])
def test_multi_axis_and_group_size_equal_the_codec(dq):
  """Contracted axes (0, 1) of an Einsum kernel: bnb order is (out, h, d)."""
  w = jnp.asarray(_rng(1).standard_t(3, (4, 64, 6)), jnp.float32)
  qa = quant.quantize(w, 'nf4', axis_to_reduce=(0, 1), group_size=128,
                      double_quant=dq)
  assert qa.values.shape == (4, 32, 6) and qa.scale.shape == (2, 1, 6)
  rows = jnp.transpose(w, (2, 0, 1)).reshape(6, 256)
  ref = nf4.dequantize_nf4(nf4.quantize_nf4(rows, block_size=128,
                                            double_quant=dq))
  expected = jnp.transpose(ref.reshape(6, 4, 64), (1, 2, 0))
  assert_bit_equal(quant.dequantize(qa), expected)
  assert_bit_equal(quant.simulate_quantize(w, 'nf4', (0, 1), group_size=128,
                                           double_quant=dq), expected)


def test_scale_shape_storage_and_bits_per_weight():
  w = jnp.asarray(_rng(2).standard_normal((1024, 256)), jnp.float32)
  plain = quant.quantize(w, 'nf4')
  dq = quant.quantize(w, 'nf4', double_quant=True)
  assert quant.scale_shape(w.shape, 'nf4') == (16, 256) == plain.scale.shape
  assert plain.values.dtype == jnp.uint8 and plain.values.shape == (512, 256)
  assert plain.nbytes * 8 / w.size == 4.5
  assert dq.nbytes * 8 / w.size == nf4.nf4_bits_per_weight(
      double_quant=True, size=w.size)  # 4.127: codes, 8-bit absmax, stats
  assert len(jax.tree.leaves(plain)) == 2 and len(jax.tree.leaves(dq)) == 3


@pytest.mark.parametrize('dq', [False, True])
def test_straight_through_and_jit(dq):
  x = jnp.asarray(_rng(3).standard_normal((128, 8)), jnp.float32)
  t = jnp.asarray(_rng(4).standard_normal((128, 8)), jnp.float32)
  f = lambda x: quant.simulate_quantize(x, 'nf4', double_quant=dq)
  assert_bit_equal(jax.grad(lambda x: jnp.sum(f(x) * t))(x), t)
  assert_bit_equal(jax.jvp(f, (x,), (t,))[1], t)
  qa = jax.jit(lambda x: quant.quantize(x, 'nf4', double_quant=dq))(x)
  assert_bit_equal(jax.jit(quant.dequantize)(qa), f(x))


def test_special_values_pass_through_simulate_and_are_rejected_by_quantize():
  x = _rng(5).standard_normal((128, 4)).astype(np.float32)
  x[3, 1], x[70, 2] = np.nan, np.inf
  out = np.asarray(quant.simulate_quantize(x, 'nf4'))
  assert np.isnan(out[3, 1]) and out[70, 2] == np.inf
  finite = np.where(np.isfinite(x), x, 0.0)
  expected = np.asarray(quant.simulate_quantize(finite, 'nf4'))
  mask = np.isfinite(x)
  assert_bit_equal(out[mask], expected[mask])
  with pytest.raises(ValueError, match='non-finite'):
    quant.quantize(x, 'nf4')


def test_bad_arguments():
  with pytest.raises(ValueError, match='group_size'):
    quant.quantize(jnp.ones((96, 4)), 'nf4')  # 96 not a multiple of 64
  with pytest.raises(ValueError, match='odd length'):
    quant.quantize(jnp.ones((64, 3)), 'nf4', axis_to_reduce=(1,),
                   group_size=3)
  with pytest.raises(ValueError, match='NF4 only'):
    quant.quantize(jnp.ones((64, 4)), 'int4', double_quant=True)
  with pytest.raises(ValueError, match='NF4'):
    quant.simulate_quantize(jnp.ones((64, 4)), 'int8', double_quant=True)
  with pytest.raises(TypeError, match='double_quant'):
    quant.quantize(jnp.ones((64, 4)), 'nf4', double_quant='yes')
  assert quant.quantize(jnp.ones((0, 4)), 'nf4', group_size=2).nbytes >= 0


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_round_trip_error_bound(blocks, out, dq, seed):
  """Each value is within half the widest codebook gap of its block absmax."""
  x = _rng(seed).standard_normal((64 * blocks, out)).astype(np.float32)
  y = np.asarray(quant.dequantize(quant.quantize(x, 'nf4', double_quant=dq)))
  absmax = np.abs(x.reshape(blocks, 64, out)).max(axis=1, keepdims=True)
  gap = np.diff(nf4.NF4_CODEBOOK).max() / 2
  err = np.abs(y - x).reshape(blocks, 64, out)
  tol = gap * absmax * (1.02 if dq else 1.0001) + 1e-6
  assert (err <= tol).all()

"""Tests for peft.nf4: the NF4 block codec against real bitsandbytes.

The golden file `fixtures/nf4_golden.npz` is written by
`fixtures/make_nf4.py` with bitsandbytes 0.50.2 / torch 2.13.0 on CPU (see its
docstring); the properties use numpy transcriptions of bitsandbytes' rules and
bounds computed from the codebook stored in that file.
"""

import os

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import nf4

_GOLDEN = np.load(os.path.join(os.path.dirname(__file__), 'fixtures',
                               'nf4_golden.npz'))
CASES = [str(c) for c in _GOLDEN['cases']]
BNB_CODE = _GOLDEN['nf4_code']
BNB_DYNAMIC_CODE = _GOLDEN['dynamic_code']


def _bits(a) -> np.ndarray:
  """float32 bit patterns, so that comparisons see -0.0 exactly."""
  return np.asarray(a, np.float32).view(np.uint32)


def assert_bit_equal(actual, expected):
  np.testing.assert_array_equal(_bits(actual), _bits(expected))


def _golden(name, tag, key):
  return _GOLDEN[f'{name}/{tag}/{key}']


def _expected_dequantized(name, tag):
  """bitsandbytes' dequantization (its generic path where its C kernel errs)."""
  key = f'{name}/{tag}/dequantized_generic'
  if key in _GOLDEN:
    return _GOLDEN[key]
  return _golden(name, tag, 'dequantized')


_QUANTIZE_JIT = {
    dq: jax.jit(lambda x, dq=dq: nf4.quantize_nf4(x, double_quant=dq))
    for dq in (False, True)
}
_DEQUANTIZE_JIT = jax.jit(nf4.dequantize_nf4)


# ----------------------------------------------------------------------------
# Golden files made by bitsandbytes.


def test_golden_file_metadata():
  versions = [str(v) for v in _GOLDEN['versions']]
  assert 'bitsandbytes==0.50.2' in versions
  assert any(v.startswith('torch==2.13.0') for v in versions)
  assert os.path.getsize(os.path.join(os.path.dirname(__file__), 'fixtures',
                                      'nf4_golden.npz')) < 1_000_000
  assert len(CASES) >= 10


def test_codebook_is_bitsandbytes():
  assert_bit_equal(nf4.NF4_CODEBOOK, BNB_CODE)
  assert nf4.NF4_CODEBOOK.dtype == np.float32
  assert nf4.NF4_CODEBOOK[7] == 0.0 and (np.diff(nf4.NF4_CODEBOOK) > 0).all()


def test_dynamic_map_is_bitsandbytes():
  assert_bit_equal(nf4._DYNAMIC_CODE, BNB_DYNAMIC_CODE)


@pytest.mark.parametrize('name', CASES)
def test_codes_and_absmax_equal_bitsandbytes(name):
  x = _GOLDEN[f'{name}/input']
  q = _QUANTIZE_JIT[False](x)
  np.testing.assert_array_equal(np.asarray(q.codes),
                                _golden(name, 'plain', 'codes'))
  assert q.codes.dtype == jnp.uint8
  assert_bit_equal(q.absmax, _golden(name, 'plain', 'absmax'))
  assert_bit_equal(_DEQUANTIZE_JIT(q), _expected_dequantized(name, 'plain'))


@pytest.mark.parametrize('name', CASES)
def test_double_quant_equals_bitsandbytes(name):
  x = _GOLDEN[f'{name}/input']
  q = _QUANTIZE_JIT[True](x)
  np.testing.assert_array_equal(np.asarray(q.codes), _golden(name, 'dq', 'codes'))
  np.testing.assert_array_equal(np.asarray(q.absmax),
                                _golden(name, 'dq', 'absmax_codes'))
  assert q.absmax.dtype == jnp.uint8
  assert_bit_equal(q.absmax_scale, _golden(name, 'dq', 'absmax_scale'))
  assert_bit_equal(q.offset, _golden(name, 'dq', 'offset'))
  assert_bit_equal(_DEQUANTIZE_JIT(q), _expected_dequantized(name, 'dq'))


@pytest.mark.parametrize('name', ['normal_3x96', 'ties_4x64', 'normal_5x13'])
@pytest.mark.parametrize('double_quant', [False, True])
def test_eager_equals_bitsandbytes(name, double_quant):
  tag = 'dq' if double_quant else 'plain'
  x = _GOLDEN[f'{name}/input']
  q = nf4.quantize_nf4(x, double_quant=double_quant)
  np.testing.assert_array_equal(np.asarray(q.codes), _golden(name, tag, 'codes'))
  assert_bit_equal(nf4.dequantize_nf4(q), _expected_dequantized(name, tag))
  assert_bit_equal(nf4.simulate_nf4(x, double_quant=double_quant),
                   _expected_dequantized(name, tag))


@pytest.mark.parametrize('name', ['normal_128x256', 'normal_130x256',
                                  'normal_5x13', 'zero_ragged_1x96'])
@pytest.mark.parametrize('double_quant', [False, True])
def test_dequantize_bitsandbytes_storage(name, double_quant):
  """Dequantizing the pieces bitsandbytes stored gives its output."""
  tag = 'dq' if double_quant else 'plain'
  shape = _GOLDEN[f'{name}/input'].shape
  if double_quant:
    q = nf4.NF4Array(
        codes=jnp.asarray(_golden(name, tag, 'codes')),
        absmax=jnp.asarray(_golden(name, tag, 'absmax_codes')),
        absmax_scale=jnp.asarray(_golden(name, tag, 'absmax_scale')),
        offset=jnp.asarray(_golden(name, tag, 'offset')),
        shape=shape, block_size=64, axis=len(shape) - 1)
  else:
    q = nf4.NF4Array(
        codes=jnp.asarray(_golden(name, tag, 'codes')),
        absmax=jnp.asarray(_golden(name, tag, 'absmax')),
        absmax_scale=None, offset=None,
        shape=shape, block_size=64, axis=len(shape) - 1)
  assert_bit_equal(_DEQUANTIZE_JIT(q), _expected_dequantized(name, tag))


def test_bitsandbytes_c_kernel_row_blocks():
  """Documents bitsandbytes' CPU kernel on rows that are not whole blocks.

  For [3, 96] its C dequantization uses block row * (96 // 64) + col // 64
  instead of the flat index its quantization used; we follow the flat index
  (its generic torch path), so that dequantize(quantize(x)) is close to x.
  """
  name = 'normal_3x96'
  x = _GOLDEN[f'{name}/input']
  q = nf4.quantize_nf4(x)
  codes = np.asarray(nf4._unpack(q.codes, x.size)).reshape(x.shape)
  absmax = np.asarray(q.absmax)
  rows, cols = np.indices(x.shape)
  c_kernel = BNB_CODE[codes] * absmax[rows * (96 // 64) + cols // 64]
  assert_bit_equal(c_kernel, _golden(name, 'plain', 'dequantized'))
  flat = BNB_CODE[codes] * absmax[(rows * 96 + cols) // 64]
  assert_bit_equal(flat, _golden(name, 'plain', 'dequantized_generic'))
  assert np.abs(nf4.dequantize_nf4(q) - x).max() < 0.2 * np.abs(x).max()


def test_8bit_absmax_quantization_equals_bitsandbytes():
  """The double quantization's 8-bit step against `quantize_blockwise`."""
  values = _GOLDEN['dynamic8/input']
  codes, scale = jax.jit(nf4._quantize_dynamic)(values)
  np.testing.assert_array_equal(np.asarray(codes), _GOLDEN['dynamic8/codes'])
  assert_bit_equal(scale, _GOLDEN['dynamic8/absmax'])
  # The fixture exercises bitsandbytes' rules: its codes are not simply the
  # nearest map value, and the fused multiply-add rounding of its lookup-grid
  # position matters (flooring the exact position gives other codes).
  blocks = _blocks_np(values, 256)
  absmax = np.abs(blocks).max(axis=1)
  inv = np.float32(1) / np.where(absmax > 0, absmax, np.float32(1))
  y = np.clip(blocks * inv[:, None], -1, 1).reshape(-1)[:values.size]
  nearest = np.abs(y[:, None].astype(np.float64)
                   - BNB_DYNAMIC_CODE[None, :]).argmin(axis=1)
  assert (nearest != _GOLDEN['dynamic8/codes']).sum() > 0
  t = ((y + np.float32(1)) * np.float32(0.5)).astype(np.float64)
  exact_pos = np.floor(t * 65535 + 0.5).astype(np.int64)
  fma_pos = np.floor((t * 65535 + 0.5).astype(np.float32)).astype(np.int64)
  mid = (BNB_DYNAMIC_CODE[:-1] + BNB_DYNAMIC_CODE[1:]) * np.float32(0.5)
  grid = np.arange(65536, dtype=np.float32)
  table = np.searchsorted(mid, (grid + grid) / np.float32(65535) - 1, 'left')
  nonzero = np.repeat(absmax > 0, 256)[:values.size]
  golden = _GOLDEN['dynamic8/codes'][nonzero]
  np.testing.assert_array_equal(table[fma_pos][nonzero], golden)
  assert (table[exact_pos][nonzero] != golden).sum() > 10


def _mean_input(n):
  """The formula of make_nf4.mean_input: 0.5 + 3 * frac(i * golden ratio)."""
  i = np.arange(n, dtype=np.float64)
  return (0.5 + 3.0 * np.modf(i * 0.6180339887498949)[0]).astype(np.float32)


@pytest.mark.parametrize('index', range(len(_GOLDEN['torch_mean/sizes'])))
def test_offset_is_torch_float32_mean(index):
  n = int(_GOLDEN['torch_mean/sizes'][index])
  values = _mean_input(n)
  total = jax.jit(nf4._torch_sum)(values)
  mean = np.float32(np.asarray(total)) / np.float32(n)
  assert_bit_equal(mean, _GOLDEN['torch_mean/values'][index])


def test_offset_order_matters():
  """Neither an in-order nor a correctly rounded float32 sum gives torch's mean."""
  wrong_naive = wrong_exact = 0
  for n, expected in zip(_GOLDEN['torch_mean/sizes'], _GOLDEN['torch_mean/values']):
    values = _mean_input(int(n))
    naive = np.cumsum(values, dtype=np.float32)[-1] / np.float32(n)
    exact = np.float32(np.sum(values, dtype=np.float64) / n)
    wrong_naive += int(naive != expected)
    wrong_exact += int(exact != expected)
  assert wrong_naive >= 5 and wrong_exact >= 3


def test_nibble_order_high_first():
  x = np.zeros(64, np.float32)
  x[0], x[1], x[2] = 1.0, -1.0, 0.0  # codes 15, 0, 7
  q = nf4.quantize_nf4(x)
  assert int(q.codes[0]) == 0xF0 and int(q.codes[1]) == 0x77


# ----------------------------------------------------------------------------
# JAX layout: blocks along the contracted axis of an [in, out] kernel.


@pytest.mark.parametrize('name', ['normal_128x256', 'normal_3x96', 'normal_5x13'])
@pytest.mark.parametrize('double_quant', [False, True])
def test_jax_kernel_layout(name, double_quant):
  tag = 'dq' if double_quant else 'plain'
  w = _GOLDEN[f'{name}/input']  # PyTorch [out, in]
  kernel = jnp.asarray(w.T)  # JAX [in, out]
  q = jax.jit(lambda k: nf4.quantize_nf4(k, double_quant=double_quant,
                                         axis=0))(kernel)
  np.testing.assert_array_equal(np.asarray(q.codes), _golden(name, tag, 'codes'))
  assert q.shape == kernel.shape and q.axis == 0
  out = _DEQUANTIZE_JIT(q)
  assert out.shape == kernel.shape
  assert_bit_equal(out, _expected_dequantized(name, tag).T)


def test_axis_of_a_3d_kernel():
  x = jax.random.normal(jax.random.key(1), (3, 128, 5))
  q = nf4.quantize_nf4(x, axis=1)
  ref = nf4.quantize_nf4(jnp.moveaxis(x, 1, -1))
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
  np.testing.assert_array_equal(
      np.asarray(nf4.dequantize_nf4(q)),
      np.moveaxis(np.asarray(nf4.dequantize_nf4(ref)), -1, 1))
  assert nf4.quantize_nf4(x, axis=-2).axis == 1


# ----------------------------------------------------------------------------
# Storage: bits per weight.


@pytest.mark.parametrize('double_quant,expected', [(False, 4.5),
                                                   (True, 4.127)])
def test_bits_per_weight_from_array_sizes(double_quant, expected):
  shape = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
  q = jax.eval_shape(
      lambda x: nf4.quantize_nf4(x, double_quant=double_quant), shape)
  bits = 8 * sum(a.size * a.dtype.itemsize for a in
                 (q.codes, q.absmax, q.absmax_scale, q.offset)
                 if a is not None) / (4096 * 4096)
  assert bits == pytest.approx(expected, abs=5e-4)
  assert nf4.nf4_bits_per_weight(64, double_quant, size=4096 * 4096) == bits
  assert nf4.nf4_bits_per_weight(64, double_quant) == pytest.approx(bits,
                                                                    abs=1e-5)


def test_bits_per_weight_small_tensor_counts_everything():
  q = nf4.quantize_nf4(np.ones(129, np.float32), double_quant=True)
  assert q.nbytes == 65 + 3 + 4 + 4
  assert nf4.nf4_bits_per_weight(64, True, size=129) == 8 * q.nbytes / 129
  q = nf4.quantize_nf4(np.ones(129, np.float32))
  assert nf4.nf4_bits_per_weight(size=129) == 8 * q.nbytes / 129


# ----------------------------------------------------------------------------
# Properties (hypothesis) and numpy transcriptions of bitsandbytes' rules.

_FLOATS = st.floats(min_value=-1e6, max_value=1e6, width=32,
                    allow_subnormal=False)
_SHAPES = [(4, 64), (2, 96), (129,), (3, 5)]


def _arrays():
  return st.sampled_from(_SHAPES).flatmap(
      lambda shape: hnp.arrays(np.float32, shape, elements=_FLOATS))


def _no_tiny(x):
  """Zeroes |x| < 1e-30: XLA on CPU flushes float32 subnormals to zero."""
  return np.where(np.abs(x) < 1e-30, np.float32(0), x).astype(np.float32)


def _blocks_np(x, block_size):
  flat = x.reshape(-1)
  n_blocks = -(-flat.size // block_size)
  return np.pad(flat, (0, n_blocks * block_size - flat.size)).reshape(
      n_blocks, block_size)


def _codes_np(x, block_size):
  """bitsandbytes' rule: scaled = x * (1 / absmax) (x / absmax in a short last
  block), code = number of float32 codebook midpoints strictly below it."""
  blocks = _blocks_np(x, block_size)
  absmax = np.abs(blocks).max(axis=1)
  safe = np.maximum(absmax, np.float32(1e-38))
  scaled = blocks * (np.float32(1) / safe)[:, None]
  if x.size % block_size:
    scaled[-1] = blocks[-1] / safe[-1]
  mid = (BNB_CODE[:-1] + BNB_CODE[1:]) / np.float32(2)
  codes = np.searchsorted(mid, np.clip(scaled, -1, 1), side='left')
  return codes.reshape(-1)[:x.size], absmax


@settings(max_examples=25, deadline=None)
@given(x=_arrays(), block_size=st.sampled_from([4, 16, 64]))
def test_property_codes_and_error_bound(x, block_size):
  x = _no_tiny(x)
  q = nf4.quantize_nf4(x, block_size=block_size)
  codes, absmax = _codes_np(x, block_size)
  np.testing.assert_array_equal(
      np.asarray(nf4._unpack(q.codes, x.size)), codes)
  out = np.asarray(nf4.dequantize_nf4(q))
  assert out.shape == x.shape and np.isfinite(out).all()
  # Nearest codebook value: at most half the largest gap times the absmax.
  half_gap = np.diff(BNB_CODE.astype(np.float64)).max() / 2
  bound = np.repeat(absmax.astype(np.float64), block_size)[:x.size]
  err = np.abs(out.astype(np.float64) - x.astype(np.float64)).reshape(-1)
  assert (err <= bound * (half_gap + 1e-6)).all()
  assert_bit_equal(out[x == 0], np.zeros_like(x[x == 0]))


@settings(max_examples=15, deadline=None)
@given(x=_arrays())
def test_property_double_quant_error_bound(x):
  x = _no_tiny(x)
  q = nf4.quantize_nf4(x, double_quant=True)
  plain = nf4.quantize_nf4(x)
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(plain.codes))
  out = np.asarray(nf4.dequantize_nf4(q), np.float64)
  assert np.isfinite(out).all()
  absmax = np.asarray(plain.absmax, np.float64)
  # |absmax - its reconstruction| <= scale * (half the largest gap of the
  # dynamic map + the 2 / 65535 step of bitsandbytes' lookup grid).
  dyn_half_gap = np.diff(BNB_DYNAMIC_CODE.astype(np.float64)).max() / 2
  scale = np.repeat(np.asarray(q.absmax_scale, np.float64), 256)
  absmax_err = scale[:absmax.size] * (dyn_half_gap + 2 / 65535 + 1e-6)
  half_gap = np.diff(BNB_CODE.astype(np.float64)).max() / 2
  bound = np.repeat(absmax * half_gap + absmax_err + 1e-6 * absmax, 64)
  err = np.abs(out - x.astype(np.float64)).reshape(-1)
  assert (err <= bound[:x.size] * (1 + 1e-6)).all()


@settings(max_examples=15, deadline=None)
@given(x=_arrays())
def test_property_simulate_is_idempotent(x):
  x = _no_tiny(x)
  once = nf4.simulate_nf4(x)
  assert_bit_equal(nf4.simulate_nf4(once), once)


def test_zeros_give_zeros_and_no_nan():
  for dq in (False, True):
    for x in (np.zeros((3, 64), np.float32), np.full(65, -0.0, np.float32)):
      out = np.asarray(nf4.simulate_nf4(x, double_quant=dq))
      assert_bit_equal(np.abs(out), np.zeros_like(x))
  x = np.array([1e30, -3e30, 1e-30, 0.0] * 16, np.float32)
  for dq in (False, True):
    assert np.isfinite(np.asarray(nf4.simulate_nf4(x, double_quant=dq))).all()


# ----------------------------------------------------------------------------
# jit, dtypes, inputs.


def test_jit_equals_eager_and_is_a_pytree():
  x = jax.random.normal(jax.random.key(0), (6, 200))
  for dq in (False, True):
    eager = nf4.quantize_nf4(x, double_quant=dq)
    jitted = jax.jit(lambda x: nf4.quantize_nf4(x, double_quant=dq))(x)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    assert_bit_equal(jax.jit(nf4.dequantize_nf4)(jitted), nf4.dequantize_nf4(eager))
    assert_bit_equal(jax.jit(lambda x: nf4.simulate_nf4(x, double_quant=dq))(x),
                     nf4.dequantize_nf4(eager))


def test_low_precision_inputs_are_upcast():
  x = jax.random.normal(jax.random.key(2), (2, 64), jnp.bfloat16)
  q = nf4.quantize_nf4(x)
  ref = nf4.quantize_nf4(x.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
  out = nf4.simulate_nf4(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(out), np.asarray(nf4.dequantize_nf4(ref).astype(jnp.bfloat16)))
  assert nf4.dequantize_nf4(q, jnp.float16).dtype == jnp.float16


def test_input_is_not_mutated():
  x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
  before = x.copy()
  nf4.quantize_nf4(x, double_quant=True)
  np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize('bad,error,match', [
    (np.arange(64), TypeError, 'floating dtype'),
    ('weights', TypeError, 'array of floats'),
    (np.ones(0, np.float32), ValueError, 'non-empty'),
    (np.float32(1.0), ValueError, 'at least one axis'),
    (np.array([1.0, np.nan] * 32, np.float32), ValueError, 'NaN or inf'),
    (np.array([1.0, np.inf] * 32, np.float32), ValueError, 'NaN or inf'),
])
def test_bad_inputs(bad, error, match):
  with pytest.raises(error, match=match):
    nf4.quantize_nf4(bad)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(block_size=0), ValueError, 'block_size must be positive'),
    (dict(block_size=64.0), TypeError, 'block_size must be an int'),
    (dict(block_size=True), TypeError, 'block_size must be an int'),
    (dict(double_quant=1), TypeError, 'double_quant must be a bool'),
    (dict(axis=2), ValueError, 'axis 2 is out of range'),
    (dict(axis='in'), TypeError, 'axis must be an int'),
])
def test_bad_options(kwargs, error, match):
  with pytest.raises(error, match=match):
    nf4.quantize_nf4(np.ones((2, 64), np.float32), **kwargs)


def test_bad_dequantize_inputs():
  with pytest.raises(TypeError, match='NF4Array'):
    nf4.dequantize_nf4(np.ones(4, np.uint8))
  q = nf4.quantize_nf4(np.ones((2, 64), np.float32))
  broken = nf4.NF4Array(q.codes[:10], q.absmax, None, None, q.shape, 64, 1)
  with pytest.raises(ValueError, match='codes has shape'):
    nf4.dequantize_nf4(broken)
  with pytest.raises(ValueError, match='size must be positive'):
    nf4.nf4_bits_per_weight(size=0)
  with pytest.raises(TypeError, match='size must be an int'):
    nf4.nf4_bits_per_weight(size=1.5)

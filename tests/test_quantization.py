"""Tests for peft.quantization.

References are independent of the code under test: the `gguf` package
(llama.cpp's own Python port of ggml's Q4_0) and numpy transcriptions of the
formulas in DESIGN.md ("Numerics").
"""

import gguf
from gguf import quants as gguf_quants
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from peft import quantization as quant
from peft.quantization import QArray
from peft.quantization import QuantizationMethod as QM

Q4_0 = gguf.GGMLQuantizationType.Q4_0
REAL_METHODS = [QM.INT4, QM.INT8, QM.Q4_0, QM.Q4_0_TRANSPOSE, QM.FP8]
# NF4 (blocks of 64 along the contracted axes) has its own tests in
# test_qmethods.py.
ALL_METHODS = [m for m in QM if m is not QM.NF4]


def _bits(a) -> np.ndarray:
  """float32 bit patterns, so that comparisons see -0.0 and NaN exactly."""
  return np.asarray(a, np.float32).view(np.uint32)


def assert_bit_equal(actual, expected):
  np.testing.assert_array_equal(_bits(actual), _bits(expected))


def _rng(seed=0):
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------
# Independent references.


def ref_q4_0(x: np.ndarray) -> np.ndarray:
  """gguf's quantize + dequantize (float32), blocks along the last axis."""
  x = np.asarray(x, np.float32)
  return gguf_quants.dequantize(gguf_quants.quantize(x, Q4_0), Q4_0).reshape(
      x.shape
  )


def ref_int(x: np.ndarray, bits: int, axes) -> np.ndarray:
  """DESIGN.md: scale = (2^(b-1)-1)/max|w|, q = clip(round(w*scale)), q/scale.

  The division by the per-channel scale is a multiplication by its float32
  reciprocal, as XLA compiles `q / broadcast(scale)` (see `_reciprocal`).
  """
  x = np.asarray(x, np.float32)
  qmax = 2 ** (bits - 1) - 1
  amax = np.max(np.abs(x), axis=axes, keepdims=True)
  with np.errstate(divide='ignore'):
    scale = np.float32(qmax) / amax
  scale = np.where(amax == 0, np.float32(1), scale).astype(np.float32)
  q = np.clip(np.round(x * scale), -qmax - 1, qmax) + np.float32(0)  # no -0.0
  return (q * (np.float32(1) / scale)).astype(np.float32)


def ref_sfp8(x: np.ndarray, axes) -> np.ndarray:
  """DESIGN.md's SFP8, written from the text in float64.

  Per channel, scale so that max|w| maps to 1.875; keep 3 mantissa bits
  (step 2^floor(log2|y|) / 8, doubled when 2^floor(log2|y|) <= 1/256);
  below 1.4901161193847656e-07 snap to that value, below
  1.1175882588358173e-07 to zero; then unscale.
  """
  x = np.asarray(x, np.float32)
  amax = np.max(np.abs(x), axis=axes, keepdims=True)
  with np.errstate(divide='ignore'):
    scale = np.float32(1.875) / amax
  scale = np.where(amax == 0, np.float32(1), scale).astype(np.float32)
  y = (np.abs(x) * scale).astype(np.float64)  # the float32 product, exactly
  _, exponent = np.frexp(y)  # y = f * 2**exponent with f in [0.5, 1)
  power = np.ldexp(1.0, exponent - 1)  # 2**floor(log2 y)
  step = np.where(power <= 1 / 256, 2.0, 1.0) * power / 8
  with np.errstate(invalid='ignore', divide='ignore'):
    y_q = np.round(y / step) * step  # ties to even
  y_q = np.where(y < 1.4901161193847656e-07, 1.4901161193847656e-07, y_q)
  y_q = np.where(y < 1.1175882588358173e-07, 0.0, y_q)
  y_q = np.copysign(y_q, x).astype(np.float32)
  return (y_q * (np.float32(1) / scale)).astype(np.float32)  # unscale


def ref_fp8(x: np.ndarray, axes) -> np.ndarray:
  """FP8 from its formula: scale = 448 / max|w| (float32), e4m3fn codes of
  clip(w * scale, -448, 448) rounded by ml_dtypes, times float32(1 / scale)."""
  x = np.asarray(x, np.float32)
  amax = np.max(np.abs(x), axis=axes, keepdims=True)
  with np.errstate(divide='ignore'):
    scale = np.float32(448) / amax
  scale = np.where(np.isfinite(scale), scale, np.float32(1)).astype(np.float32)
  y = np.clip(x * scale, np.float32(-448), np.float32(448))
  codes = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  return (codes * (np.float32(1) / scale)).astype(np.float32)


def ref_grouped(x: np.ndarray, method, axes, group_size) -> np.ndarray:
  """Group-wise reference: move the contracted `axes` to the front, flatten
  them, cut them into rows of `group_size` and apply the per-channel
  reference with the max over each row."""
  x = np.asarray(x, np.float32)
  axes = tuple(sorted(a % x.ndim for a in axes))
  rest = [a for a in range(x.ndim) if a not in axes]
  moved = np.transpose(x, (*axes, *rest))
  rest_shape = moved.shape[len(axes):]
  flat = moved.reshape(-1, group_size, *rest_shape)  # (groups, g, *rest)
  out = _REFS[QM(method)](flat, (1,))
  out = out.reshape(moved.shape)
  return np.transpose(out, np.argsort((*axes, *rest)))


_REFS = {
    QM.INT4: lambda x, axes: ref_int(x, 4, axes),
    QM.INT8: lambda x, axes: ref_int(x, 8, axes),
    QM.SFP8: lambda x, axes: ref_sfp8(x, axes),
    QM.FP8: lambda x, axes: ref_fp8(x, axes),
}


def _default_axes(ndim):
  return tuple(range(ndim - 1))


def _simulate_np(x, method, axis_to_reduce=None):
  out = quant.simulate_quantize(jnp.asarray(x), method, axis_to_reduce)
  return np.asarray(out)


# ----------------------------------------------------------------------------
# QuantizationMethod.


def test_method_from_strings_case_insensitive():
  assert QM('int4') is QM.INT4
  assert QM('INT4') is QM.INT4
  assert QM('Q4_0_Transpose') is QM.Q4_0_TRANSPOSE
  assert QM.SFP8 == 'sfp8' and isinstance(QM.SFP8, str)
  assert [m.value for m in QM] == [
      'none', 'int4', 'int8', 'q4_0', 'q4_0_transpose', 'sfp8', 'fp8', 'nf4'
  ]


def test_unknown_method_lists_valid_names():
  with pytest.raises(ValueError) as err:
    QM('int3')
  for m in QM:
    assert repr(m.value) in str(err.value)
  with pytest.raises(ValueError, match='int4'):
    quant.simulate_quantize(jnp.ones((32, 2)), 'fp4')
  with pytest.raises(ValueError, match='int4'):
    quant.quantize(jnp.ones((32, 2)), 'fp4')


# ----------------------------------------------------------------------------
# Q4_0 against gguf, bit for bit.


@pytest.mark.parametrize('scale', [1e-5, 3e-3, 1.0, 250.0])
@pytest.mark.parametrize('shape', [(4, 64), (2, 3, 96)])
def test_q4_0_matches_gguf_random(shape, scale):
  x = (_rng(1).standard_normal(shape) * scale).astype(np.float32)
  assert_bit_equal(_simulate_np(x, QM.Q4_0), ref_q4_0(x))
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(quant.quantize(x, QM.Q4_0)),
      gguf_quants.quantize(x, Q4_0),
  )


def test_q4_0_matches_gguf_many_blocks():
  x = _rng(2).standard_normal((256, 1024)).astype(np.float32) ** 3
  assert_bit_equal(_simulate_np(x, QM.Q4_0), ref_q4_0(x))
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(quant.quantize(x, QM.Q4_0)),
      gguf_quants.quantize(x, Q4_0),
  )


def _fma_sensitive_blocks(n_blocks=128, seed=3):
  """Blocks where rounding x * (1/d) before adding 8.5 changes codes.

  ggml computes trunc(fl(fl(x * id) + 8.5)); a compiler contracting that into
  one fused multiply-add (a single rounding) gets other codes for these
  values, so they pin the two-rounding semantics.
  """
  rng = _rng(seed)
  m = rng.uniform(1.0, 2.0, (n_blocks, 1)).astype(np.float32)
  inv_d = np.float32(1) / (m / np.float32(-8))
  # Aim at products p that put p + 8.5 on a rounding tie just below an
  # integer k (k minus half an ulp), then look a few ulps of x around it.
  k = np.arange(1, 17, dtype=np.float32)
  half_ulp = (k - np.nextafter(k, np.float32(0))).astype(np.float64) / 2
  target = k.astype(np.float64) - 8.5 - half_ulp
  x0 = (target / inv_d.astype(np.float64)).astype(np.float32)  # (n, 16)
  offsets = np.arange(-64, 65, dtype=np.float32)
  x = x0[..., None] + offsets * np.spacing(x0)[..., None]
  x = x.astype(np.float32).reshape(n_blocks, -1)
  two_roundings = np.minimum(np.trunc((x * inv_d) + np.float32(8.5)), 15)
  one_rounding = np.minimum(
      np.trunc(
          (x.astype(np.float64) * inv_d.astype(np.float64) + 8.5).astype(
              np.float32
          )
      ),
      15,
  )
  sensitive = two_roundings != one_rounding
  blocks = np.zeros((n_blocks, 32), np.float32)
  blocks[:, :1] = m
  for b in range(n_blocks):  # test-data construction only
    values = np.unique(x[b][sensitive[b]])[:31]
    blocks[b, 1 : 1 + values.size] = values
  assert sensitive.any(axis=1).sum() > n_blocks // 2
  return blocks


def test_q4_0_two_roundings_not_fused_multiply_add():
  x = _fma_sensitive_blocks()
  expected = gguf_quants.quantize(x, Q4_0)
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(jax.jit(quant.quantize, static_argnums=1)(x, 'q4_0')),
      expected,
  )
  assert_bit_equal(
      jax.jit(quant.simulate_quantize, static_argnums=1)(x, 'q4_0'),
      ref_q4_0(x),
  )


def test_q4_0_all_zero_blocks_give_zeros_and_ggml_bytes():
  x = np.zeros((3, 64), np.float32)
  x[1, :32] = -0.0  # the sign of the first zero is the sign ggml stores in d
  x[2, 0] = -0.0
  x[2, 40:] = -0.0
  out = _simulate_np(x, QM.Q4_0)
  assert not np.isnan(out).any() and (out == 0).all()
  assert_bit_equal(out, ref_q4_0(x))
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(quant.quantize(x, QM.Q4_0)),
      gguf_quants.quantize(x, Q4_0),
  )


def test_q4_0_one_outlier_per_block():
  rng = _rng(4)
  x = (rng.standard_normal((4, 128)) * 0.01).astype(np.float32)
  x[0, 5] = 40.0
  x[1, 37] = -1e3
  x[2, 64] = 7.0
  x[3, 127] = -3.0
  assert_bit_equal(_simulate_np(x, QM.Q4_0), ref_q4_0(x))
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(quant.quantize(x, QM.Q4_0)),
      gguf_quants.quantize(x, Q4_0),
  )


def test_q4_0_ties_in_magnitude_take_the_first():
  rng = _rng(5)
  x = (rng.uniform(-1, 1, (6, 32))).astype(np.float32)
  x[0, 3], x[0, 20] = 2.0, -2.0  # + first
  x[1, 3], x[1, 20] = -2.0, 2.0  # - first
  x[2, 0], x[2, 31] = -2.0, 2.0
  x[3, 30], x[3, 31] = 2.0, -2.0
  x[4, [1, 2, 9]] = [-2.0, 2.0, -2.0]
  x[5, [7, 8]] = [2.0, 2.0]  # same sign: no tie to break
  expected = gguf_quants.quantize(x, Q4_0)
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(quant.quantize(x, QM.Q4_0)), expected
  )
  assert_bit_equal(_simulate_np(x, QM.Q4_0), ref_q4_0(x))
  # Same blocks in the transposed layout.
  xt = np.ascontiguousarray(x.T)
  assert_bit_equal(_simulate_np(xt, QM.Q4_0_TRANSPOSE), ref_q4_0(x).T)


def test_q4_0_facts_example_block():
  # /work/shared/FACTS.md, "ggml Q4_0": scale -0.65625.
  x = np.arange(32, dtype=np.float32) * 0.25 - 2.5
  expected = bytes.fromhex('40b96c5b5b5b4a4a3a393928282817170606')
  assert gguf_quants.quantize(x, Q4_0).tobytes() == expected
  qa = quant.quantize(x, QM.Q4_0)
  assert quant.to_ggml_bytes(qa).tobytes() == expected
  assert float(qa.scale[0]) == -0.65625


def test_q4_0_transpose_is_q4_0_of_the_swapped_axes():
  x = _rng(6).standard_normal((2, 64, 5)).astype(np.float32)
  swapped = np.ascontiguousarray(np.swapaxes(x, -1, -2))
  out = _simulate_np(x, QM.Q4_0_TRANSPOSE)
  assert out.shape == x.shape
  assert_bit_equal(np.swapaxes(out, -1, -2), ref_q4_0(swapped))
  qa = quant.quantize(x, QM.Q4_0_TRANSPOSE)
  assert qa.values.shape == (2, 5, 2, 16) and qa.values.dtype == jnp.uint8
  assert qa.scale.shape == (2, 5, 2) and qa.scale.dtype == jnp.float16
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(qa), gguf_quants.quantize(swapped, Q4_0)
  )


def test_q4_0_layout():
  x = _rng(7).standard_normal((3, 2, 64)).astype(np.float32)
  qa = quant.quantize(x, QM.Q4_0)
  assert qa.values.shape == (3, 2, 2, 16) and qa.values.dtype == jnp.uint8
  assert qa.scale.shape == (3, 2, 2) and qa.scale.dtype == jnp.float16
  raw = gguf_quants.quantize(x, Q4_0).reshape(3, 2, 2, 18)
  np.testing.assert_array_equal(raw[..., 2:], np.asarray(qa.values))
  np.testing.assert_array_equal(
      raw[..., :2].copy().view('<f2')[..., 0], np.asarray(qa.scale)
  )


def test_pack_unpack_nibble_layout():
  codes = _rng(8).integers(0, 16, (5, 32)).astype(np.uint8)
  packed = np.asarray(quant.pack_q4_0(codes))
  np.testing.assert_array_equal(packed, codes[:, :16] | (codes[:, 16:] << 4))
  np.testing.assert_array_equal(np.asarray(quant.unpack_q4_0(packed)), codes)
  with pytest.raises(ValueError, match='32'):
    quant.pack_q4_0(np.zeros((4, 30), np.uint8))
  with pytest.raises(ValueError, match='16'):
    quant.unpack_q4_0(np.zeros((4, 18), np.uint8))


# ----------------------------------------------------------------------------
# INT4 / INT8 / SFP8 against numpy transcriptions of the formulas.


@pytest.mark.parametrize('method,bits', [(QM.INT4, 4), (QM.INT8, 8)])
@pytest.mark.parametrize(
    'shape,axis_to_reduce',
    [((16, 8), None), ((4, 6, 5), None), ((4, 6, 5), 1), ((4, 6, 5), (0, 2)),
     ((4, 6, 5), -1), ((7,), None)],
)
def test_int_matches_formula(method, bits, shape, axis_to_reduce):
  x = _rng(9).standard_normal(shape).astype(np.float32)
  axes = (
      _default_axes(len(shape)) if axis_to_reduce is None
      else tuple(np.atleast_1d(axis_to_reduce))
  )
  out = _simulate_np(x, method, axis_to_reduce)
  assert_bit_equal(out, ref_int(x, bits, axes))


def test_int_scale_layout_and_rule():
  x = _rng(10).standard_normal((3, 4, 6)).astype(np.float32)
  for method, dtype in [(QM.INT4, jnp.int4), (QM.INT8, jnp.int8)]:
    qa = quant.quantize(x, method)
    assert qa.values.dtype == dtype and qa.values.shape == x.shape
    assert qa.scale.dtype == jnp.float32 and qa.scale.shape == (1, 1, 6)
    bits = 4 if method == QM.INT4 else 8
    np.testing.assert_array_equal(
        np.asarray(qa.scale),
        np.float32(2 ** (bits - 1) - 1) / np.abs(x).max((0, 1), keepdims=True),
    )
    # dequantized = values / scale (the document's rule), as XLA computes
    # it: times the reciprocal of the scale.
    values = np.asarray(qa.values).astype(np.float32)
    assert_bit_equal(
        quant.dequantize(qa), values * (np.float32(1) / np.asarray(qa.scale))
    )
    np.testing.assert_allclose(
        quant.dequantize(qa), values / np.asarray(qa.scale), rtol=2.5e-7
    )


def test_sfp8_matches_formula():
  rng = _rng(11)
  # Magnitudes spread over many binades, so that scaled values fall above
  # and below 1/256 and near the snapping thresholds.
  x = (rng.choice([-1, 1], (64, 6)) * 10.0 ** rng.uniform(-9, 0, (64, 6)))
  x[0] = 1.0
  x = x.astype(np.float32)
  assert_bit_equal(_simulate_np(x, QM.SFP8), ref_sfp8(x, (0,)))
  assert_bit_equal(_simulate_np(x, QM.SFP8, 1), ref_sfp8(x, (1,)))


def test_sfp8_edges():
  # Every column holds 1.875, so the scale is exactly 1 and row 1 holds the
  # values that get rounded.
  smallest = np.float32(1.4901161193847656e-07)
  below_zero_threshold = np.float32(1.1175882588358173e-07)  # < the constant
  above_zero_threshold = np.nextafter(below_zero_threshold, np.float32(1))
  cases = [  # (value, expected result)
      (1.875, 1.875),
      (1.0, 1.0),
      (1.0625, 1.0),  # tie between 1 and 1.125: even
      (1.0625 + 2**-20, 1.125),  # 3 mantissa bits: step 1/8
      (0.99, 1.0),
      (2**-7, 2**-7),
      (2**-7 - 2**-30, 2**-7),
      (2**-8 + 2**-11, 2**-8),  # at 1/256 the step doubles to 2**-10: tie, even
      (2**-8 + 2**-11 + 2**-30, 2**-8 + 2**-10),
      (2**-9 + 2**-12, 2**-9),  # step 2**-11: tie, even -> down
      (2**-9 + 2**-11 + 2**-12, 2**-9 + 2**-10),  # tie, odd -> up
      (2**-22, 2**-22),
      (float(smallest), float(smallest)),
      (float(smallest) - 2**-40, float(smallest)),  # snaps up
      (1.3e-07, float(smallest)),
      (float(above_zero_threshold), float(smallest)),
      (float(below_zero_threshold), 0.0),
      (1.0e-07, 0.0),
      (0.0, 0.0),
      (-0.0, -0.0),
      (-2**-23, -float(smallest)),
      (-0.3, -0.3125),
  ]
  values = np.array([v for v, _ in cases], np.float32)
  x = np.stack([np.full_like(values, 1.875), values])
  out = _simulate_np(x, QM.SFP8)
  assert_bit_equal(out, ref_sfp8(x, (0,)))
  assert_bit_equal(out[1], np.array([e for _, e in cases], np.float32))


# ----------------------------------------------------------------------------
# Zero channels, dtypes, STE, round trips, jit, pytree.


@pytest.mark.parametrize('method', [m for m in ALL_METHODS if m != QM.NONE])
def test_zero_channel_or_block_gives_zeros(method):
  x = _rng(12).standard_normal((64, 4)).astype(np.float32)
  x[:, 1] = 0.0  # zero channel (INT/SFP8) and zero Q4_0_TRANSPOSE blocks
  x[:32, 3] = 0.0
  if method == QM.Q4_0:
    x = np.ascontiguousarray(x.T)
  out = _simulate_np(x, method)
  assert np.isfinite(out).all()
  zero = x == 0
  assert (out[zero] == 0).all()
  if method in REAL_METHODS:
    deq = np.asarray(quant.dequantize(quant.quantize(x, method)))
    assert np.isfinite(deq).all() and (deq[zero] == 0).all()


@pytest.mark.parametrize('method', ALL_METHODS)
def test_straight_through_gradient_is_identity(method):
  rng = _rng(13)
  x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(quant.simulate_quantize(x, method) * w))(x)
  assert_bit_equal(grad, w)
  grad_jit = jax.jit(
      jax.grad(lambda x: jnp.sum(quant.simulate_quantize(x, method) * w))
  )(x)
  assert_bit_equal(grad_jit, w)


@pytest.mark.parametrize('method', REAL_METHODS)
def test_dequantize_quantize_equals_simulate(method):
  x = _rng(14).standard_normal((2, 64, 64)).astype(np.float32) ** 3
  x[0, :32, :32] = 0.0
  assert_bit_equal(
      quant.dequantize(quant.quantize(x, method)),
      quant.simulate_quantize(x, method),
  )


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('method', ALL_METHODS)
def test_low_precision_inputs_compute_in_float32(method, dtype):
  x = jnp.asarray(_rng(15).standard_normal((64, 32)), dtype)
  out = quant.simulate_quantize(x, method)
  assert out.dtype == dtype and out.shape == x.shape
  expected = quant.simulate_quantize(x.astype(jnp.float32), method)
  expected = expected.astype(dtype)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
  if method in REAL_METHODS:
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize(quant.quantize(x, method), dtype)),
        np.asarray(out),
    )


def test_jit_and_pytree():
  x = _rng(16).standard_normal((64, 32)).astype(np.float32)
  sim = jax.jit(quant.simulate_quantize, static_argnums=(1, 2))
  for method in ALL_METHODS:
    assert_bit_equal(sim(x, method, None), quant.simulate_quantize(x, method))
  qa = jax.jit(quant.quantize, static_argnums=1)(x, QM.Q4_0_TRANSPOSE)
  assert isinstance(qa, QArray) and qa.method is QM.Q4_0_TRANSPOSE
  assert qa.shape == (64, 32)
  assert len(jax.tree.leaves(qa)) == 2
  doubled = jax.tree.map(lambda a: a, qa)
  assert doubled.method is qa.method and doubled.shape == qa.shape
  assert_bit_equal(
      jax.jit(quant.dequantize)(qa),
      quant.simulate_quantize(x, 'q4_0_transpose'),
  )


def test_nbytes():
  x = jnp.ones((64, 8), jnp.float32)
  assert quant.quantize(x, QM.INT4).nbytes == 64 * 8 // 2 + 8 * 4
  assert quant.quantize(x, QM.INT8).nbytes == 64 * 8 + 8 * 4
  # Q4_0: exactly 18 bytes per 32 weights.
  assert quant.quantize(x.T, QM.Q4_0).nbytes == 64 * 8 // 32 * 18
  assert quant.quantize(x, QM.Q4_0_TRANSPOSE).nbytes == 64 * 8 // 32 * 18
  big = jnp.ones((4, 256, 96), jnp.float32)
  assert quant.quantize(big, QM.Q4_0_TRANSPOSE).nbytes * 32 == big.size * 18


# ----------------------------------------------------------------------------
# Errors.


def test_q4_0_block_axis_not_multiple_of_32():
  with pytest.raises(ValueError, match=r'axis -1.*length 40'):
    quant.simulate_quantize(jnp.ones((64, 40)), QM.Q4_0)
  with pytest.raises(ValueError, match=r'axis -2.*length 40'):
    quant.simulate_quantize(jnp.ones((40, 64)), QM.Q4_0_TRANSPOSE)
  with pytest.raises(ValueError, match=r'axis -1.*length 40'):
    quant.quantize(jnp.ones((2, 40)), 'q4_0')
  with pytest.raises(ValueError, match='at least 2'):
    quant.quantize(jnp.ones((64,)), 'q4_0_transpose')


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.int8, jnp.bool_, jnp.uint8])
def test_non_float_input(dtype):
  x = jnp.ones((64, 32), dtype)
  with pytest.raises(TypeError, match=r'`x`.*float'):
    quant.simulate_quantize(x, QM.INT4)
  with pytest.raises(TypeError, match=r'`x`.*float'):
    quant.quantize(x, QM.Q4_0)


def test_axis_to_reduce_validation():
  x = jnp.ones((4, 5, 6))
  with pytest.raises(ValueError, match=r'axis_to_reduce.*3.*\[-3, 2\]'):
    quant.simulate_quantize(x, QM.INT8, axis_to_reduce=3)
  with pytest.raises(ValueError, match='axis_to_reduce'):
    quant.simulate_quantize(x, QM.SFP8, axis_to_reduce=(0, -4))
  with pytest.raises(ValueError, match='twice'):
    quant.quantize(x, QM.INT4, axis_to_reduce=(1, -2))
  with pytest.raises(TypeError, match='axis_to_reduce'):
    quant.simulate_quantize(x, QM.INT4, axis_to_reduce='rows')


@pytest.mark.parametrize('method', [QM.SFP8, QM.NONE, 'sfp8'])
def test_quantize_rejects_simulation_only_methods(method):
  with pytest.raises(
      ValueError, match='int4, int8, fp8, q4_0 and q4_0_transpose'
  ):
    quant.quantize(jnp.ones((32, 4)), method)


def test_to_ggml_bytes_needs_q4_0():
  with pytest.raises(ValueError, match='Q4_0'):
    quant.to_ggml_bytes(quant.quantize(jnp.ones((32, 4)), QM.INT4))


# ----------------------------------------------------------------------------
# Properties (hypothesis).

_FLOATS = st.floats(
    min_value=-1e4, max_value=1e4, width=32, allow_subnormal=False
)


def _no_tiny(x):
  """Zeroes |x| < 1e-30: XLA on CPU flushes float32 subnormals to zero, so
  scales or products below ~1e-38 would differ from numpy's."""
  return np.where(np.abs(x) < 1e-30, np.float32(0), x).astype(np.float32)


def _arrays(shapes):
  return st.sampled_from(shapes).flatmap(
      lambda shape: hnp.arrays(np.float32, shape, elements=_FLOATS)
  )


@settings(max_examples=25, deadline=None)
@given(
    x=_arrays([(8, 4), (3, 5, 2), (16,)]),
    method=st.sampled_from([QM.INT4, QM.INT8]),
)
def test_property_int_error_bound(x, method):
  x = _no_tiny(x)
  bits = 4 if method == QM.INT4 else 8
  out = _simulate_np(x, method)
  axes = _default_axes(x.ndim)
  amax = np.abs(x).max(axis=axes, keepdims=True).astype(np.float64)
  safe_amax = np.where(amax == 0, 1.0, amax)
  scale = np.where(amax == 0, 1.0, (2 ** (bits - 1) - 1) / safe_amax)
  err = np.abs(x.astype(np.float64) - out.astype(np.float64))
  # Half a step, plus float32 rounding of w * scale and q / scale.
  assert (err <= 0.5 / scale * (1 + 1e-6) + 1e-6 * np.abs(x)).all()
  assert_bit_equal(out, ref_int(x, bits, axes))
  assert_bit_equal(quant.dequantize(quant.quantize(x, method)), out)


@settings(max_examples=25, deadline=None)
@given(x=_arrays([(2, 32), (1, 64), (3, 2, 32)]))
def test_property_q4_0_error_bound_and_round_trip(x):
  x = _no_tiny(x)
  out = _simulate_np(x, QM.Q4_0)
  blocks = x.reshape(-1, 32).astype(np.float64)
  m = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(-1)][:, None]
  d = m / -8
  d16 = d.astype(np.float16).astype(np.float64)
  err = np.abs(blocks - out.reshape(-1, 32))
  with np.errstate(divide='ignore', invalid='ignore'):
    inside = np.where(d != 0, blocks / d, 0) <= 7.5  # codes 0..15 reach 7.5 d
  bound = np.abs(d) / 2 * (1 + 1e-6) + 8 * np.abs(d - d16)
  bound = np.broadcast_to(bound, err.shape)
  assert (err[inside] <= bound[inside]).all()
  assert_bit_equal(out, ref_q4_0(x))
  qa = quant.quantize(x, QM.Q4_0)
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(qa), gguf_quants.quantize(x, Q4_0)
  )
  assert_bit_equal(quant.dequantize(qa), out)


@settings(max_examples=25, deadline=None)
@given(x=_arrays([(64, 2), (32, 3)]))
def test_property_q4_0_transpose_round_trip(x):
  x = _no_tiny(x)
  qa = quant.quantize(x, QM.Q4_0_TRANSPOSE)
  assert qa.nbytes == x.size // 32 * 18
  assert_bit_equal(quant.dequantize(qa), _simulate_np(x, QM.Q4_0_TRANSPOSE))
  assert_bit_equal(
      np.asarray(quant.dequantize(qa)).T, ref_q4_0(np.ascontiguousarray(x.T))
  )


@settings(max_examples=25, deadline=None)
@given(x=_arrays([(8, 3), (4, 2, 2)]))
def test_property_sfp8(x):
  x = _no_tiny(x)
  out = _simulate_np(x, QM.SFP8)
  assert_bit_equal(out, ref_sfp8(x, _default_axes(x.ndim)))
  assert np.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(codes=hnp.arrays(np.uint8, (3, 32), elements=st.integers(0, 15)))
def test_property_nibble_round_trip(codes):
  np.testing.assert_array_equal(
      np.asarray(quant.unpack_q4_0(quant.pack_q4_0(codes))), codes
  )


def test_vmap_matches_per_slice():
  x = _rng(17).standard_normal((3, 64, 32)).astype(np.float32)
  x[1, 0, 3], x[1, 0, 9] = 5.0, -5.0  # a tie: the batched cond becomes a select
  for method in [QM.INT4, QM.Q4_0, QM.Q4_0_TRANSPOSE, QM.SFP8]:
    batched = jax.vmap(lambda a, m=method: quant.simulate_quantize(a, m))(x)
    for i in range(3):
      assert_bit_equal(batched[i], quant.simulate_quantize(x[i], method))


# ----------------------------------------------------------------------------
# Special values: NaN, +-inf, tiny channels, Q4_0's float16 scale limit.
# References: the numpy / gguf references above applied to `x` with its
# non-finite values replaced by 0, then (simulate) those values put back.

_SPECIAL_SHAPES = [(32, 32), (64, 4), (64, 64), (3, 64)]


def _methods_for(shape):
  out = [QM.INT4, QM.INT8, QM.SFP8, QM.FP8]
  if shape[-1] % 32 == 0:
    out.append(QM.Q4_0)
  if len(shape) >= 2 and shape[-2] % 32 == 0:
    out.append(QM.Q4_0_TRANSPOSE)
  return out


def _ref(x32: np.ndarray, method) -> np.ndarray:
  """Reference of `method` on a finite float32 array (default axes)."""
  axes = _default_axes(x32.ndim)
  if method == QM.INT4:
    return ref_int(x32, 4, axes)
  if method == QM.INT8:
    return ref_int(x32, 8, axes)
  if method == QM.SFP8:
    return ref_sfp8(x32, axes)
  if method == QM.FP8:
    return ref_fp8(x32, axes)
  if method == QM.Q4_0:
    return ref_q4_0(x32)
  return ref_q4_0(np.ascontiguousarray(x32.T)).T  # Q4_0_TRANSPOSE, 2-D


def _with_special_values(shape, seed=20):
  """Normal weights with NaN, +inf and -inf at several places.

  Among them: a block / channel start, a NaN next to a magnitude tie, a
  channel that is NaN except for zeros and one that is entirely NaN.
  """
  x = _rng(seed).standard_normal(shape).astype(np.float32)
  rows, cols = shape
  x[0, 0] = np.nan
  x[rows - 1, cols - 1] = np.inf
  x[rows // 2, cols // 2] = -np.inf
  x[1 % rows, 3 % cols] = np.nan
  if cols >= 4 and rows >= 3:
    x[:, 2] = 0.0  # a channel of zeros and one NaN
    x[2, 2] = np.nan
  if cols >= 4:
    x[:, cols - 2] = np.nan  # an all-NaN channel
  return x


def _special_ref(x32, method):
  finite = np.isfinite(x32)
  ref = _ref(np.where(finite, x32, np.float32(0)), method)
  return np.where(finite, ref, x32).astype(np.float32)


@pytest.mark.parametrize('shape', _SPECIAL_SHAPES)
def test_simulate_keeps_nan_and_inf_and_ignores_them_in_scales(shape):
  x = _with_special_values(shape)
  for method in _methods_for(shape):
    assert_bit_equal(_simulate_np(x, method), _special_ref(x, method))


@pytest.mark.parametrize('method', [QM.INT4, QM.INT8, QM.SFP8, QM.Q4_0])
def test_simulate_single_nan_anywhere_in_channel(method):
  # One NaN per row at a different column: every channel / block has one.
  x = _rng(21).standard_normal((64, 64)).astype(np.float32)
  x[np.arange(64), (np.arange(64) * 7) % 64] = np.nan
  assert_bit_equal(_simulate_np(x, method), _special_ref(x, method))


@pytest.mark.parametrize('method', ALL_METHODS)
def test_simulate_special_values_bfloat16(method):
  x = jnp.asarray(_with_special_values((64, 64), seed=22), jnp.bfloat16)
  out = quant.simulate_quantize(x, method)
  assert out.dtype == jnp.bfloat16
  x32 = np.asarray(x.astype(jnp.float32))
  if method == QM.NONE:
    expected = x32
  else:
    expected = _special_ref(x32, method)
  expected = np.asarray(jnp.asarray(expected).astype(jnp.bfloat16))
  assert_bit_equal(
      np.asarray(out.astype(jnp.float32)),
      np.asarray(jnp.asarray(expected).astype(jnp.float32)),
  )


@pytest.mark.parametrize('method', [QM.INT4, QM.INT8, QM.SFP8, QM.FP8])
def test_tiny_or_zero_channel_gives_zeros_never_nan(method):
  x = _rng(23).standard_normal((16, 4)).astype(np.float32)
  x[:, 0] = 0.0
  x[:, 1] = np.float32(1e-38)  # the integer scale would overflow to inf
  x[3, 1] = np.float32(-3e-39)
  x[:, 2] = 0.0
  x[5, 2] = np.nan  # zeros and a NaN: the finite max is 0
  out = _simulate_np(x, method)
  np.testing.assert_array_equal(out[:, :2], 0.0)
  assert np.isnan(out[5, 2]) and (np.delete(out[:, 2], 5) == 0).all()
  assert np.isfinite(out[:, 3]).all()


@pytest.mark.parametrize('method', [QM.INT4, QM.INT8, QM.SFP8, QM.FP8])
def test_huge_channel_stays_finite(method):
  # Near float32's max: the SFP8 scale 1.875 / max|w| would be subnormal.
  x = np.ones((8, 3), np.float32)
  x[:, 0] = np.float32(3.0e38) * np.linspace(0.1, 1.0, 8, dtype=np.float32)
  x[:, 1] = np.float32(1.6e38)
  x[3, 1] = 1.0
  x[:, 2] *= np.float32(1e30)
  out = _simulate_np(x, method)
  assert np.isfinite(out).all()
  x64, out64 = x.astype(np.float64), out.astype(np.float64)
  amax = np.abs(x64).max(axis=0, keepdims=True)
  step = amax / {QM.INT4: 7, QM.INT8: 127, QM.SFP8: 8, QM.FP8: 16}[method]
  assert (np.abs(out64 - x64) <= step).all()


@pytest.mark.parametrize('shape', _SPECIAL_SHAPES)
def test_quantize_rejects_non_finite_concrete_input(shape):
  x = _with_special_values(shape)
  n_bad = int((~np.isfinite(x)).sum())
  first = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
  # INT8 shares INT4's code path: one of them is enough here.
  for method in _methods_for(shape):
    if method in (QM.SFP8, QM.INT8):
      continue
    with pytest.raises(ValueError) as err:
      quant.quantize(x, method)
    message = str(err.value)
    assert '`x`' in message and f'{n_bad} non-finite' in message
    assert str(first) in message, message
  with pytest.raises(ValueError, match=rf'`x` contains {n_bad} non-finite'):
    quant.quantize(jnp.asarray(x, jnp.bfloat16), QM.INT4)
  # One inf alone is enough.
  y = np.ones(shape, np.float32)
  y[-1, -1] = -np.inf
  with pytest.raises(ValueError, match=r'`x` contains 1 non-finite'):
    quant.quantize(y, QM.INT8)


@pytest.mark.parametrize('shape', _SPECIAL_SHAPES)
def test_quantize_under_jit_stores_non_finite_as_zero(shape):
  x = _with_special_values(shape)
  x0 = np.where(np.isfinite(x), x, np.float32(0))
  quantize_jit = jax.jit(quant.quantize, static_argnums=1)
  for method in _methods_for(shape):
    if method == QM.SFP8:
      continue
    qa = quantize_jit(x, method)
    assert_bit_equal(quant.dequantize(qa), _ref(x0, method))
    if method == QM.Q4_0:
      np.testing.assert_array_equal(
          quant.to_ggml_bytes(qa), gguf_quants.quantize(x0, Q4_0)
      )
  # A constant under jit cannot be checked either (its statistics are
  # tracers); XLA folds the constant, so compare loosely.
  qa_const = jax.jit(lambda: quant.quantize(x, QM.INT8))()
  np.testing.assert_allclose(
      quant.dequantize(qa_const), _ref(x0, QM.INT8), rtol=1e-6, atol=1e-6
  )


@pytest.mark.filterwarnings('ignore::RuntimeWarning')  # gguf's own overflow
def test_q4_0_float16_scale_limit():
  limit = np.float32(8 * 65520)  # d = limit / -8 rounds to float16 -inf
  below = np.nextafter(limit, np.float32(0))
  x = _rng(24).standard_normal((4, 64)).astype(np.float32)
  x[0, 5] = below  # block (0, 0): d = -65504 in float16, finite
  x[2, 40] = -below
  expected = gguf_quants.quantize(x, Q4_0)
  np.testing.assert_array_equal(
      quant.to_ggml_bytes(quant.quantize(x, QM.Q4_0)), expected
  )
  scale = np.asarray(quant.quantize(x, QM.Q4_0).scale, np.float32)
  assert np.isfinite(scale).all() and np.abs(scale).max() == 65504

  x[1, 33] = limit
  x[3, 0] = -2 * limit
  with pytest.raises(ValueError) as err:
    quant.quantize(x, QM.Q4_0)
  message = str(err.value)
  assert '`x`' in message and '2 value(s)' in message and '(1, 33)' in message
  assert 'float16' in message
  with pytest.raises(ValueError, match='float16'):
    quant.quantize(np.ascontiguousarray(x.T), QM.Q4_0_TRANSPOSE)
  # INT4 / INT8 have float32 scales: fine.
  quant.quantize(x, QM.INT8)

  # Bit-compatible with ggml where no check can run (tracing) and in the
  # simulation: d = +-inf, values +-inf, NaN at code 8 (0 * inf).
  expected = gguf_quants.quantize(x, Q4_0)
  qa = jax.jit(quant.quantize, static_argnums=1)(x, QM.Q4_0)
  np.testing.assert_array_equal(quant.to_ggml_bytes(qa), expected)
  ref = ref_q4_0(x)
  assert np.isinf(ref[1, 32:]).any() and np.isnan(ref[1, 32:]).any()
  assert_bit_equal(_simulate_np(x, QM.Q4_0), ref)
  assert_bit_equal(quant.dequantize(qa), ref)
  assert np.isfinite(ref[[0, 2]]).all() and np.isfinite(ref[1, :32]).all()


# ----------------------------------------------------------------------------
# FP8 (float8_e4m3fn storage).

_F32_MAX = np.finfo(np.float32).max


@pytest.mark.parametrize(
    'shape,axis_to_reduce',
    [((64, 8), None), ((4, 6, 5), (0, 2)), ((4, 6, 5), 1), ((7,), None)],
)
def test_fp8_matches_formula(shape, axis_to_reduce):
  rng = _rng(30)
  # Magnitudes over many binades, so that scaled values reach e4m3fn's
  # subnormals (below 2**-6) and its rounding to zero (below 2**-10).
  x = rng.choice([-1, 1], shape) * 10.0 ** rng.uniform(-6, 1, shape)
  x = x.astype(np.float32)
  axes = (
      _default_axes(len(shape)) if axis_to_reduce is None
      else tuple(np.atleast_1d(axis_to_reduce))
  )
  out = _simulate_np(x, QM.FP8, axis_to_reduce)
  assert_bit_equal(out, ref_fp8(x, axes))
  qa = quant.quantize(x, QM.FP8, axis_to_reduce)
  assert qa.values.dtype == jnp.float8_e4m3fn and qa.values.shape == x.shape
  assert qa.scale.dtype == jnp.float32
  assert_bit_equal(quant.dequantize(qa), out)


def test_fp8_rounds_to_nearest_even_and_saturates():
  # Channel max 448: scale exactly 1, so the values below are the codes.
  cases = [  # (value, expected)
      (448.0, 448.0),
      (1.0 + 2**-4, 1.0),  # tie between 1 and 1.125: even
      (1.0 + 3 * 2**-4, 1.25),  # tie between 1.125 and 1.25: even
      (1.0 + 2**-4 + 2**-20, 1.125),
      (2**-7, 2**-7),  # subnormal e4m3fn: step 2**-9
      (2**-9, 2**-9),
      (2**-10, 0.0),  # tie between 0 and 2**-9: even (0)
      (2**-10 + 2**-20, 2**-9),
      (-3 * 2**-10, -2 * 2**-9),  # tie between 2**-9 and 2**-8: even
      (-0.0, -0.0),
      (240.0 + 8.0, 256.0),  # tie between 240 and 256: even mantissa
      (300.0, 288.0),
  ]
  values = np.array([v for v, _ in cases], np.float32)
  x = np.stack([np.full_like(values, 448.0), values])
  out = _simulate_np(x, QM.FP8)
  assert_bit_equal(out[1], np.array([e for _, e in cases], np.float32))
  assert_bit_equal(out, ref_fp8(x, (0,)))


def test_fp8_nbytes_one_byte_per_weight():
  x = jnp.ones((256, 64), jnp.float32)
  assert quant.quantize(x, QM.FP8).nbytes == 256 * 64 + 64 * 4
  assert quant.quantize(x, QM.FP8, group_size=128).nbytes == (
      256 * 64 + 2 * 64 * 4
  )


@settings(max_examples=25, deadline=None)
@given(x=_arrays([(8, 4), (3, 5, 2), (16,)]))
def test_property_fp8_error_bound_and_round_trip(x):
  x = _no_tiny(x)
  out = _simulate_np(x, QM.FP8)
  axes = _default_axes(x.ndim)
  amax = np.abs(x).max(axis=axes, keepdims=True).astype(np.float64)
  scale = np.where(amax == 0, 1.0, 448.0 / np.where(amax == 0, 1.0, amax))
  x64 = x.astype(np.float64)
  # e4m3fn keeps 3 mantissa bits: half an ulp is 2**-4 of the magnitude in
  # its normal range (>= 2**-6 after scaling), 2**-10 / scale below it; plus
  # the float32 roundings of w * scale and code / scale.
  bound = np.maximum(np.abs(x64) * 2.0**-4, 2.0**-10 / scale)
  err = np.abs(out.astype(np.float64) - x64)
  assert (err <= bound * (1 + 1e-6) + 1e-6 * np.abs(x64)).all()
  assert np.isfinite(out).all()
  assert_bit_equal(out, ref_fp8(x, axes))
  assert_bit_equal(quant.dequantize(quant.quantize(x, QM.FP8)), out)


# ----------------------------------------------------------------------------
# Group-wise scales.

_GROUP_METHODS = [QM.INT4, QM.INT8, QM.FP8, QM.SFP8]


@pytest.mark.parametrize('method', _GROUP_METHODS)
@pytest.mark.parametrize(
    'shape,axis_to_reduce,group_size,expected_scale_shape',
    [
        ((256, 8), None, 32, (8, 8)),
        ((256, 8), 0, 128, (2, 8)),
        ((4, 64, 6), (0, 1), 128, (2, 1, 6)),  # a group spans 2 rows of 64
        ((4, 64, 6), (0, 1), 32, (4, 2, 6)),
        ((4, 6, 64), 2, 32, (4, 6, 2)),  # contracted axis last
        ((8, 3, 32), (0, 2), 64, (4, 3, 1)),  # contracted axes not adjacent
        ((64, 8), None, 64, (1, 8)),  # one group = per channel
    ],
)
def test_group_matches_reference(
    method, shape, axis_to_reduce, group_size, expected_scale_shape
):
  x = (_rng(31).standard_normal(shape) ** 3).astype(np.float32)
  axes = (
      _default_axes(len(shape)) if axis_to_reduce is None
      else tuple(np.atleast_1d(axis_to_reduce))
  )
  out = np.asarray(quant.simulate_quantize(
      x, method, axis_to_reduce, group_size=group_size))
  assert_bit_equal(out, ref_grouped(x, method, axes, group_size))
  assert quant.scale_shape(
      shape, QM.INT8, axis_to_reduce, group_size=group_size
  ) == expected_scale_shape
  if method in REAL_METHODS:
    qa = quant.quantize(x, method, axis_to_reduce, group_size=group_size)
    assert qa.group_size == group_size
    assert qa.scale.shape == expected_scale_shape
    assert_bit_equal(quant.dequantize(qa), out)


def test_group_of_whole_contracted_axis_equals_per_channel():
  x = _rng(32).standard_normal((4, 32, 8)).astype(np.float32)
  for method in _GROUP_METHODS:
    assert_bit_equal(
        quant.simulate_quantize(x, method, (0, 1), group_size=128),
        quant.simulate_quantize(x, method, (0, 1)),
    )


def test_group_scale_layout_and_values():
  # [K, N] kernel: scale (K // g, N); scale i covers rows [i*g, (i+1)*g).
  x = _rng(33).standard_normal((128, 4)).astype(np.float32)
  qa = quant.quantize(x, 'int8', group_size=32)
  expected = np.float32(127) / np.abs(x.reshape(4, 32, 4)).max(axis=1)
  np.testing.assert_array_equal(np.asarray(qa.scale), expected)
  values = np.asarray(qa.values).astype(np.float32).reshape(4, 32, 4)
  assert_bit_equal(
      np.asarray(quant.dequantize(qa)).reshape(4, 32, 4),
      values * (np.float32(1) / expected)[:, None, :],
  )
  # Storage: int4 values plus one float32 per group and channel.
  assert quant.quantize(x, 'int4', group_size=32).nbytes == 128 * 4 // 2 + 64


def test_group_errors():
  x = jnp.ones((96, 4))
  with pytest.raises(ValueError, match=r'group_size.*64.*96'):
    quant.simulate_quantize(x, 'int4', group_size=64)
  with pytest.raises(ValueError, match=r'group_size.*straddle.*axis 1'):
    quant.quantize(jnp.ones((4, 48, 2)), 'int8', (0, 1), group_size=64)
  with pytest.raises(ValueError, match=r'group_size.*Q4_0'):
    quant.simulate_quantize(jnp.ones((4, 64)), 'q4_0', group_size=32)
  with pytest.raises(ValueError, match='group_size'):
    quant.quantize(x, 'int8', group_size=0)
  with pytest.raises(TypeError, match='group_size'):
    quant.quantize(x, 'int8', group_size=32.0)
  with pytest.raises(TypeError, match='group_size'):
    quant.simulate_quantize(x, 'int8', group_size=True)


@settings(max_examples=25, deadline=None)
@given(
    x=_arrays([(64, 3), (2, 32, 2), (128, 1)]),
    method=st.sampled_from([QM.INT4, QM.INT8]),
    group_size=st.sampled_from([32, 64]),
)
def test_property_group_error_bound(x, method, group_size):
  x = _no_tiny(x)
  axes = _default_axes(x.ndim)
  if np.prod([x.shape[a] for a in axes]) % group_size:
    group_size = 32
  qmax = 7 if method == QM.INT4 else 127
  out = np.asarray(quant.simulate_quantize(x, method, group_size=group_size))
  # Per group of `group_size` consecutive contracted values of a channel
  # (both shapes contract leading axes), the error is at most half a step,
  # max|w| / qmax / 2, of its own group.
  n = x.shape[-1]
  groups = x.reshape(-1, group_size, n).astype(np.float64)
  err = np.abs(out.reshape(groups.shape).astype(np.float64) - groups)
  half_step = np.abs(groups).max(axis=1, keepdims=True) / qmax / 2
  assert (err <= half_step * (1 + 1e-6) + 1e-6 * np.abs(groups)).all()
  qa = quant.quantize(x, method, group_size=group_size)
  assert_bit_equal(quant.dequantize(qa), out)


def _relative_rms_error(w, w_q):
  w, w_q = np.asarray(w, np.float64), np.asarray(w_q, np.float64)
  return np.sqrt(np.mean((w_q - w) ** 2) / np.mean(w ** 2))


def test_group_quality_on_heavy_tailed_weights():
  # Student-t with 3 degrees of freedom: outliers make per-channel scales
  # coarse; groups of 32 confine each outlier to its group.
  w = np.random.default_rng(0).standard_t(3, (1024, 1024)).astype(np.float32)
  per_channel = _relative_rms_error(w, quant.simulate_quantize(w, 'int4'))
  errors = {
      g: _relative_rms_error(
          w, quant.dequantize(quant.quantize(w, 'int4', group_size=g)))
      for g in (32, 64, 128)
  }
  assert errors[32] <= 0.7 * per_channel, (errors, per_channel)
  assert errors[32] < errors[64] < errors[128] < per_channel


def test_group_storage_names():
  names = ('embed', 'mlp')
  assert quant.storage_names(
      'int4', names, (0,), group_size=32, shape=(256, 64)
  ) == (names, names)
  assert quant.storage_names(
      'fp8', names, (0,), group_size=256, shape=(256, 64)
  ) == (names, (None, 'mlp'))
  # (heads, head_dim, embed) contracting heads and head_dim, groups of 128:
  # a group covers all of head_dim (size-1 scales there) and 2 heads.
  assert quant.storage_names(
      'int8', ('heads', 'kv', 'embed'), (0, 1), group_size=128,
      shape=(8, 64, 512),
  ) == (('heads', 'kv', 'embed'), ('heads', None, 'embed'))
  with pytest.raises(ValueError, match='shape'):
    quant.storage_names('int4', names, (0,), group_size=32)


# ----------------------------------------------------------------------------
# Huge finite inputs give finite results (issue 11, item 9).


@pytest.mark.parametrize('method', [QM.INT4, QM.INT8, QM.FP8, QM.SFP8])
@pytest.mark.parametrize('group_size', [None, 32])
def test_huge_finite_inputs_give_finite_results(method, group_size):
  x = _rng(34).standard_normal((64, 6)).astype(np.float32)
  x[5, 0] = _F32_MAX
  x[9, 1] = -_F32_MAX
  x[:, 2] = np.float32(3.3e38) * np.sign(x[:, 2])
  x[7, 3] = np.nextafter(_F32_MAX, np.float32(0))
  x[:, 4] = np.float32(1.7e38)
  out = np.asarray(quant.simulate_quantize(x, method, group_size=group_size))
  assert np.isfinite(out).all()
  # Within a step of the value: max|group| / qmax (SFP8: 3 mantissa bits).
  qmax = {QM.INT4: 7, QM.INT8: 127, QM.FP8: 16, QM.SFP8: 8}[method]
  g = group_size or 64
  groups = x.reshape(-1, g, 6).astype(np.float64)
  step = np.abs(groups).max(axis=1, keepdims=True) / qmax
  assert (np.abs(out.reshape(groups.shape) - groups) <= step).all()
  # The ordinary channel is untouched by the overflow handling.
  ref = ref_grouped(x[:, 5:], method, (0,), g)
  assert_bit_equal(out[:, 5:], ref)
  if method in REAL_METHODS:
    qa = quant.quantize(x, method, group_size=group_size)  # no error
    assert_bit_equal(quant.dequantize(qa), out)


def test_float32_max_examples_from_the_issue():
  for method, value in [('int8', _F32_MAX), ('int4', -_F32_MAX),
                        ('sfp8', 3.3e38), ('fp8', _F32_MAX)]:
    x = jnp.array([[value], [1.0]], jnp.float32)
    out = quant.simulate_quantize(x, method)
    assert np.isfinite(np.asarray(out)).all(), (method, out)
    np.testing.assert_allclose(out[0, 0], value, rtol=0.07)
    if method != 'sfp8':
      deq = quant.dequantize(quant.quantize(x, method))
      assert np.isfinite(np.asarray(deq)).all()


# ----------------------------------------------------------------------------
# Straight-through estimator in forward and reverse mode (issue 11, item 13).


@pytest.mark.parametrize('method', ALL_METHODS)
def test_straight_through_forward_and_reverse_modes(method):
  rng = _rng(35)
  shape = (2, 32) if method == QM.Q4_0 else (32, 2)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  f = lambda x: quant.simulate_quantize(x, method)
  primal, tangent = jax.jvp(f, (x,), (t,))
  assert_bit_equal(primal, f(x))
  assert_bit_equal(tangent, t)
  assert_bit_equal(jax.jit(lambda x, t: jax.jvp(f, (x,), (t,))[1])(x, t), t)
  eye = np.eye(x.size, dtype=np.float32).reshape(*x.shape, *x.shape)
  assert_bit_equal(jax.jacfwd(f)(x), eye)
  assert_bit_equal(jax.jacrev(f)(x), eye)
  y, f_lin = jax.linearize(f, x)
  assert_bit_equal(y, f(x))
  assert_bit_equal(f_lin(t), t)
  _, f_vjp = jax.vjp(f, x)
  assert_bit_equal(f_vjp(t)[0], t)
  assert_bit_equal(jax.grad(lambda x: jnp.sum(f(x) * t))(x), t)
  # vmap over a batch of kernels, both modes, under jit.
  xb = jnp.stack([x, 2 * x, -x])
  tb = jnp.stack([t, t, 3 * t])
  batched_jvp = jax.jit(jax.vmap(lambda x, t: jax.jvp(f, (x,), (t,))[1]))
  assert_bit_equal(batched_jvp(xb, tb), tb)
  batched_grad = jax.jit(jax.vmap(jax.grad(lambda x, t: jnp.sum(f(x) * t))))
  assert_bit_equal(batched_grad(xb, tb), tb)


def test_straight_through_with_groups_and_bfloat16():
  x = jnp.asarray(_rng(36).standard_normal((64, 4)), jnp.bfloat16)
  t = jnp.ones_like(x) * 3
  f = lambda x: quant.simulate_quantize(x, 'int4', group_size=32)
  _, tangent = jax.jvp(f, (x,), (t,))
  assert tangent.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(tangent, np.float32), 3.0)
  g = jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32)))(x)
  np.testing.assert_array_equal(np.asarray(g, np.float32), 1.0)


# ----------------------------------------------------------------------------
# Zero-size arrays (issue 11, item 11).


@pytest.mark.parametrize(
    'shape,method,group_size',
    [((0, 32), 'int4', None), ((32, 0), 'int8', None), ((0, 32), 'fp8', 32),
     ((0, 64), 'q4_0', None), ((64, 0), 'q4_0_transpose', None),
     ((32, 0), 'q4_0', None), ((0, 0), 'sfp8', None), ((0,), 'int4', None)],
)
def test_zero_size_gives_empty_results(shape, method, group_size):
  x = jnp.ones(shape, jnp.float32)
  out = quant.simulate_quantize(x, method, group_size=group_size)
  assert out.shape == shape and out.dtype == jnp.float32
  assert jax.jit(lambda x: quant.simulate_quantize(
      x, method, group_size=group_size))(x).shape == shape
  assert jax.grad(lambda x: quant.simulate_quantize(
      x, method, group_size=group_size).sum())(x).shape == shape
  if method == 'sfp8':
    return
  quant.check_quantizable(x, method, group_size=group_size)
  qa = quant.quantize(x, method, group_size=group_size)
  if method in ('int4', 'int8', 'fp8'):
    assert qa.values.shape == shape
    assert qa.scale.shape == quant.scale_shape(
        shape, method, group_size=group_size)
  assert quant.dequantize(qa).shape == shape
  jitted = jax.jit(lambda x: quant.quantize(x, method, group_size=group_size))
  assert quant.dequantize(jitted(x)).shape == shape


# ----------------------------------------------------------------------------
# check_quantizable (issue 11, item 1): eager checks before a jitted quantize.


def test_check_quantizable_raises_what_eager_quantize_raises():
  x = _rng(37).standard_normal((64, 32)).astype(np.float32)
  x[3, 5] = np.nan
  for method in ['int4', 'int8', 'fp8', 'q4_0', 'q4_0_transpose']:
    with pytest.raises(ValueError) as from_quantize:
      quant.quantize(x, method)
    with pytest.raises(ValueError) as from_check:
      quant.check_quantizable(x, method)
    assert str(from_check.value) == str(from_quantize.value)
    with pytest.raises(ValueError, match=r'`kernel` contains 1 non-finite'):
      quant.check_quantizable(x, method, name='kernel')
  big = np.ones((2, 64), np.float32)
  big[1, 40] = 1e30
  with pytest.raises(ValueError, match=r'`kernel`.*float16'):
    quant.check_quantizable(big, 'q4_0', name='kernel')
  quant.check_quantizable(big, 'int8')  # float32 scales: fine
  with pytest.raises(ValueError, match='group_size'):
    quant.check_quantizable(np.ones((48, 2), np.float32), 'int4',
                            group_size=32)


def test_check_quantizable_is_silent_for_tracers_and_clean_arrays():
  x = _rng(38).standard_normal((64, 32)).astype(np.float32)
  assert quant.check_quantizable(x, 'int4', group_size=32) is None
  bad = x.copy()
  bad[0, 0] = np.inf
  # Under jit the values are unknown: no error, as quantize.
  jax.jit(lambda v: quant.check_quantizable(v, 'int4'))(bad)
  jax.jit(lambda: quant.check_quantizable(bad, 'q4_0'))()  # a constant


# ----------------------------------------------------------------------------
# Wrong types (issue 11, item 12).


@pytest.mark.parametrize('bad', [None, 'abc', [1.0, 'a'], object(), {1: 2}])
def test_wrong_type_for_x_is_a_type_error(bad):
  with pytest.raises(TypeError, match=r'`x` must be a floating-point array'):
    quant.simulate_quantize(bad, 'int4')
  with pytest.raises(TypeError, match=r'`x` must be a floating-point array'):
    quant.quantize(bad, 'int8')
  with pytest.raises(TypeError, match=r'`w` must be a floating-point array'):
    quant.check_quantizable(bad, 'int8', name='w')


@pytest.mark.parametrize('bad', [None, 4, 4.0, QM])
def test_wrong_type_for_method_is_a_type_error(bad):
  with pytest.raises(TypeError, match='`method`'):
    quant.simulate_quantize(jnp.ones((4, 2)), bad)


def test_dequantize_checks_dtype_and_layout():
  qa = quant.quantize(jnp.ones((64, 4)), 'int8', group_size=32)
  with pytest.raises(TypeError, match='`dtype`'):
    quant.dequantize(qa, jnp.int32)
  with pytest.raises(TypeError, match='`dtype`'):
    quant.dequantize(qa, 'not-a-dtype')
  broken = QArray(values=qa.values, scale=jnp.ones((3, 4)), method='int8',
                  shape=(64, 4))
  with pytest.raises(ValueError, match='inconsistent'):
    quant.dequantize(broken)

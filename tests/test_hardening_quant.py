"""Bad input to `peft.quantization`: a table of calls, each a clear error.

Every row raises a `TypeError` (wrong type) or `ValueError` (wrong value)
whose message names the offending argument (the style of the `Bad` table in
`tests/test_hardening.py`). Below the table: inputs that used to fail with a
raw numpy / jax error or return silent garbage and now have defined results
(zero-size arrays, huge finite values), and the check that runs before a
jitted `quantize`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import quantization as pq
from _bad import Bad
from _bad import check_bad


_X = jnp.ones((64, 4), jnp.float32)
_NAN = _X.at[3, 1].set(jnp.nan)
_INF = _X.at[60, 2].set(-jnp.inf)
_HUGE = jnp.ones((4, 64), jnp.float32).at[2, 40].set(1e30)
_T = (TypeError,)
_V = (ValueError,)

_BAD = [
    # --- wrong types: TypeError naming the argument and what it accepts
    Bad('x_none_simulate', lambda: pq.simulate_quantize(None, 'int4'),
        ('`x`', 'floating-point array'), _T),
    Bad('x_none_quantize', lambda: pq.quantize(None, 'int8'),
        ('`x`', 'floating-point array'), _T),
    Bad('x_string', lambda: pq.simulate_quantize('abc', 'int4'),
        ('`x`', 'floating-point array'), _T),
    Bad('x_ragged_list', lambda: pq.quantize([[1.0], [1.0, 2.0]], 'int4'),
        ('`x`', 'floating-point array'), _T),
    Bad('x_dict', lambda: pq.simulate_quantize({'w': _X}, 'int4'),
        ('`x`',), _T),
    Bad('x_int_dtype', lambda: pq.quantize(jnp.ones((4, 4), jnp.int8), 'fp8'),
        ('`x`', 'float'), _T),
    Bad('method_none', lambda: pq.simulate_quantize(_X, None), ('`method`',),
        _T),
    Bad('method_int', lambda: pq.quantize(_X, 4), ('`method`',), _T),
    Bad('method_enum_from_int', lambda: pq.QuantizationMethod(8),
        ('`method`',), _T),
    Bad('group_size_float', lambda: pq.quantize(_X, 'int4', group_size=32.0),
        ('`group_size`',), _T),
    Bad('group_size_string',
        lambda: pq.simulate_quantize(_X, 'int8', group_size='32'),
        ('`group_size`',), _T),
    Bad('group_size_bool',
        lambda: pq.simulate_quantize(_X, 'int8', group_size=True),
        ('`group_size`',), _T),
    Bad('dequantize_dtype_int',
        lambda: pq.dequantize(pq.quantize(_X, 'int8'), jnp.int32),
        ('`dtype`',), _T),
    Bad('dequantize_dtype_garbage',
        lambda: pq.dequantize(pq.quantize(_X, 'int8'), 'float33'),
        ('`dtype`',), _T),
    Bad('check_x_none', lambda: pq.check_quantizable(None, 'int4',
                                                     name='kernel'),
        ('`kernel`',), _T),
    Bad('scale_shape_not_ints', lambda: pq.scale_shape('64x4', 'int4'),
        ('`shape`',), _T),
    # --- wrong values: ValueError naming the argument and the fix
    Bad('group_size_zero', lambda: pq.quantize(_X, 'int4', group_size=0),
        ('`group_size`', 'positive'), _V),
    Bad('group_size_negative',
        lambda: pq.simulate_quantize(_X, 'fp8', group_size=-32),
        ('`group_size`',), _V),
    Bad('group_size_not_dividing',
        lambda: pq.quantize(jnp.ones((96, 4)), 'int4', group_size=64),
        ('`group_size`', '96'), _V),
    Bad('group_size_straddles_axes',
        lambda: pq.simulate_quantize(jnp.ones((4, 48, 2)), 'int8', (0, 1),
                                     group_size=64),
        ('`group_size`', 'straddle', '48'), _V),
    Bad('group_size_with_q4_0',
        lambda: pq.quantize(jnp.ones((4, 64)), 'q4_0', group_size=32),
        ('`group_size`', 'Q4_0'), _V),
    Bad('group_size_1d_no_contracted_axis',
        lambda: pq.quantize(jnp.ones((64,)), 'int8', group_size=32),
        ('`group_size`',), _V),
    Bad('fp8_nan', lambda: pq.quantize(_NAN, 'fp8'),
        ('`x`', 'non-finite', '(3, 1)'), _V),
    Bad('check_nan', lambda: pq.check_quantizable(_NAN, 'int4', name='kernel'),
        ('`kernel`', '1 non-finite', '(3, 1)'), _V),
    Bad('check_inf_q4_0_transpose',
        lambda: pq.check_quantizable(_INF, 'q4_0_transpose', name='kernel'),
        ('`kernel`', '(60, 2)'), _V),
    Bad('check_q4_0_huge',
        lambda: pq.check_quantizable(_HUGE, 'q4_0', name='kernel'),
        ('`kernel`', 'float16'), _V),
    Bad('check_sfp8_no_storage', lambda: pq.check_quantizable(_X, 'sfp8'),
        ('SFP8', '`method`'), _V),
    Bad('check_group_not_dividing',
        lambda: pq.check_quantizable(jnp.ones((48, 2)), 'int4', group_size=32,
                                     name='kernel'),
        ('`group_size`', '`kernel`'), _V),
    Bad('storage_names_group_without_shape',
        lambda: pq.storage_names('int4', ('a', 'b'), (0,), group_size=32),
        ('`shape`',), _V),
    Bad('dequantize_inconsistent_scale',
        lambda: pq.dequantize(pq.QArray(
            values=jnp.zeros((64, 4), jnp.int8), scale=jnp.ones((3, 4)),
            method='int8', shape=(64, 4))),
        ('`q`', 'inconsistent'), _V),
    Bad('qarray_group_size_for_q4_0',
        lambda: pq.QArray(values=jnp.zeros((1, 2, 16), jnp.uint8),
                          scale=jnp.ones((1, 2), jnp.float16), method='q4_0',
                          shape=(1, 64), group_size=32),
        ('`group_size`',), _V),
]


def test_bad_table_ids_are_unique():
  ids = [c.id for c in _BAD]
  assert len(ids) == len(set(ids))


@pytest.mark.parametrize('case', _BAD, ids=[c.id for c in _BAD])
def test_bad_input_raises_clear_error(case):
  check_bad(case)


# ---------------------------------------------------------------------------
# Inputs with defined results instead of raw errors.


@pytest.mark.parametrize('method', ['int4', 'int8', 'fp8', 'sfp8', 'q4_0'])
def test_zero_length_axes_give_empty_results(method):
  for shape in [(0, 32), (32, 0)]:
    x = jnp.ones(shape)
    assert pq.simulate_quantize(x, method).shape == shape
    if method != 'sfp8':
      assert pq.dequantize(pq.quantize(x, method)).shape == shape


def test_issue_examples_of_huge_values_are_finite():
  f32_max = float(np.finfo(np.float32).max)
  x = jnp.array([[f32_max, 3.3e38], [1.0, -1.0]], jnp.float32)
  for method in ['int4', 'int8', 'fp8', 'sfp8']:
    assert bool(jnp.isfinite(pq.simulate_quantize(x, method)).all()), method
    if method != 'sfp8':
      deq = pq.dequantize(pq.quantize(x, method))
      assert bool(jnp.isfinite(deq).all()), method


def test_check_quantizable_before_a_jitted_quantize():
  """The pattern for layers: check the concrete kernel, then jit."""
  quantize_jit = jax.jit(pq.quantize, static_argnames=('method',))
  with pytest.raises(ValueError, match='`kernel` contains 1 non-finite'):
    pq.check_quantizable(_NAN, 'int4', name='kernel')
  # Without the check the jitted quantize silently stores the NaN as 0.
  deq = pq.dequantize(quantize_jit(_NAN, method='int4'))
  assert float(deq[3, 1]) == 0.0
  pq.check_quantizable(_X, 'int4', name='kernel')  # clean: no error


def test_bad_inputs_are_not_mutated():
  w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  before = w.copy()
  for method in ['int4', 'int8', 'fp8']:
    pq.check_quantizable(w, method, group_size=32)
    pq.dequantize(pq.quantize(w, method, group_size=32))
    pq.simulate_quantize(w, method, group_size=32)
  np.testing.assert_array_equal(w, before)

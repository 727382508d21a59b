"""Tests of peft/kernels.py: both strategies against a float64 dense einsum.

The reference dequantizes with `peft.quantization.dequantize` (tested on its
own against the formulas and ggml in test_quantization.py) and contracts in
numpy float64, so a wrong chunking, unpacking, scale or axis order shows.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import kernels
from peft.geometry import Geometry
from peft.quantization import dequantize
from peft.quantization import quantize

HI = jax.lax.Precision.HIGHEST

# name: (geometry, input shape); every kernel axis a multiple of 32 where
# Q4_0 needs it.
_CASES = {
    'linear': (Geometry.linear(64, 96), (3, 5, 64)),
    'linear_odd_out': (Geometry.linear(64, 33), (4, 64)),
    'einsum_heads': (Geometry.from_einsum('btd,dnh->btnh', (64, 2, 32)),
                     (2, 3, 64)),
    'einsum_moe': (Geometry.from_einsum('ebd,edf->ebf', (2, 64, 32)),
                   (2, 5, 64)),
    'einsum_permuted_out': (Geometry.from_einsum('...d,df->f...', (64, 32)),
                            (3, 4, 64)),
    'einsum_kernel_transposed': (Geometry.from_einsum('bd,fd->bf', (64, 64)),
                                 (3, 64)),
    'linear_general_axes': (Geometry.linear_general((2, 64), 32, axis=(1, -1)),
                            (3, 2, 5, 64)),
    'linear_general_batch': (Geometry.linear_general(64, 32, batch_axis={0: 2}),
                             (2, 3, 64)),
}
_METHODS = ('int4', 'int8', 'q4_0', 'q4_0_transpose')


def _fits(method, shape):
  if method == 'q4_0':
    return shape[-1] % 32 == 0
  if method == 'q4_0_transpose':
    return shape[-2] % 32 == 0
  return True


def _reference(x, q, geometry):
  w = np.asarray(dequantize(q), np.float64)
  return np.einsum(geometry.call_einsum_str(x.ndim), np.asarray(x, np.float64),
                   w)


def _quantized(geometry, method, seed=0):
  w = jax.random.normal(jax.random.key(seed), geometry.kernel_shape)
  return quantize(w, method, axis_to_reduce=geometry.contracted_axes)


@pytest.mark.parametrize('name', sorted(_CASES))
@pytest.mark.parametrize('method', _METHODS)
@pytest.mark.parametrize('chunk', [None, 7 * 32 * 3])
def test_strategies_match_dense_reference(name, method, chunk, monkeypatch):
  geometry, xshape = _CASES[name]
  if not _fits(method, geometry.kernel_shape):
    pytest.skip('the Q4_0 block axis is not a multiple of 32 here')
  if chunk is not None:  # many loop steps and a tail chunk
    monkeypatch.setattr(kernels, '_CHUNK_ELEMENTS', chunk)
  q = _quantized(geometry, method)
  x = jax.random.normal(jax.random.key(1), xshape)
  want = _reference(x, q, geometry)
  outs = {}
  for strategy in ('blockwise', 'fused'):
    f = jax.jit(lambda x, q, s=strategy: kernels.quantized_einsum(
        x, q, geometry, precision=HI, strategy=s))
    outs[strategy] = np.asarray(f(x, q))
    assert outs[strategy].shape == want.shape
    np.testing.assert_allclose(outs[strategy], want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(outs['blockwise'], outs['fused'], rtol=2e-5,
                             atol=2e-5)


def _has_loop(fn, *args):
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  return 'while' in jaxpr or 'scan' in jaxpr


def test_auto_is_blockwise_on_cpu_and_fused_has_no_loop(monkeypatch):
  monkeypatch.setattr(kernels, '_CHUNK_ELEMENTS', 64 * 32)
  geometry = Geometry.linear(256, 64)
  q = _quantized(geometry, 'int4')
  x = jnp.ones((2, 256))
  run = lambda s: (lambda x, q: kernels.quantized_einsum(x, q, geometry,
                                                         strategy=s))
  assert jax.default_backend() == 'cpu'
  assert kernels.choose_strategy('auto', x) == 'blockwise'
  assert _has_loop(run('auto'), x, q) and _has_loop(run('blockwise'), x, q)
  assert not _has_loop(run('fused'), x, q)


def test_gradients_agree():
  geometry, xshape = _CASES['einsum_moe']
  x = jax.random.normal(jax.random.key(2), xshape)
  ct = jax.random.normal(jax.random.key(3), (2, 5, 32))
  for method in _METHODS:
    q = _quantized(geometry, method)
    grads = [
        jax.grad(lambda x, s=s: jnp.sum(kernels.quantized_einsum(
            x, q, geometry, precision=HI, strategy=s) * ct))(x)
        for s in ('blockwise', 'fused')]
    w = np.asarray(dequantize(q), np.float64)
    want = np.einsum('ebf,edf->ebd', np.asarray(ct, np.float64), w)
    for g in grads:
      np.testing.assert_allclose(g, want, rtol=2e-5, atol=2e-5)


def test_scales_over_other_axes_are_read_as_stored():
  # quantize_checkpoint's default: scales over all but the last axis, which
  # are not the per-channel scales of 'bi,imn->bmn' (contracted: axis 0).
  geometry = Geometry.from_einsum('bi,imn->bmn', (64, 2, 32))
  w = jax.random.normal(jax.random.key(4), (64, 2, 32))
  q = quantize(w, 'int4')
  assert q.scale.shape == (1, 1, 32)
  x = jax.random.normal(jax.random.key(5), (3, 64))
  for strategy in ('blockwise', 'fused'):
    y = kernels.quantized_einsum(x, q, geometry, precision=HI,
                                 strategy=strategy)
    np.testing.assert_allclose(y, _reference(x, q, geometry), rtol=2e-5,
                               atol=2e-5)


def test_dtypes():
  geometry = Geometry.linear(64, 32)
  q = _quantized(geometry, 'q4_0')
  x = jnp.ones((2, 64), jnp.bfloat16)
  for strategy in ('blockwise', 'fused'):
    y = kernels.quantized_einsum(x, q, geometry, strategy=strategy)
    assert y.dtype == jnp.bfloat16
    y = kernels.quantized_einsum(x, q, geometry, strategy=strategy,
                                 preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, _reference(x, q, geometry), rtol=2e-2,
                               atol=2e-2)


def test_empty_output_axis():
  geometry = Geometry.linear(64, 0)
  # (jitted: eager `quantize` checks values, and there are none)
  q = jax.jit(quantize, static_argnums=1)(jnp.ones((64, 0)), 'int8')
  for strategy in ('blockwise', 'fused'):
    y = kernels.quantized_einsum(jnp.ones((3, 64)), q, geometry,
                                 strategy=strategy)
    assert y.shape == (3, 0)


def test_errors():
  geometry = Geometry.linear(64, 32)
  with pytest.raises(ValueError, match="strategy='gpu'.*'auto'"):
    kernels.choose_strategy('gpu')
  stacked = quantize(jnp.ones((3, 64, 32)), 'int4', axis_to_reduce=(1,))
  with pytest.raises(ValueError, match='nnx.vmap'):
    kernels.quantized_einsum(jnp.ones((2, 64)), stacked, geometry)
  q = quantize(jnp.ones((64, 32)), 'int4')
  with pytest.raises(ValueError, match='rank 2'):
    kernels.quantized_einsum(jnp.ones((2, 3, 64)), q,
                             Geometry.from_einsum('bd,df->bf', (64, 32)))


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
    m=st.integers(1, 5), k=st.sampled_from([32, 64, 96]),
    n=st.sampled_from([1, 2, 31, 32, 64]),
    method=st.sampled_from(_METHODS), seed=st.integers(0, 2**16))
def test_strategies_agree_on_random_linear_layers(m, k, n, method, seed):
  geometry = Geometry.linear(k, n)
  hypothesis.assume(_fits(method, (k, n)))
  q = _quantized(geometry, method, seed)
  x = jax.random.normal(jax.random.key(seed + 1), (m, k))
  want = _reference(x, q, geometry)
  for strategy in ('blockwise', 'fused'):
    y = kernels.quantized_einsum(x, q, geometry, precision=HI,
                                 strategy=strategy)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)

"""QDoRA and the stored base norms: DoRA on quantized / simulated bases.

Reference: DoRA computed here on the dequantized (or fake-quantized) kernel of
the base, `W'_j = m_j (W_j + sΔW_j) / ||W_j + sΔW_j||` with the norm constant
in the gradient; output `x @ W' + bias`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft.nnx as pnnx
from peft.nnx import dora
from peft.quantization import simulate_quantize

_HI = jax.lax.Precision.HIGHEST
_METHODS = ('int4', 'int8', 'q4_0', 'q4_0_transpose')


def _float_layer(shape=(64, 32)):
  return nnx.Linear(*shape, rngs=nnx.Rngs(0), precision=_HI,
                    bias_init=nnx.initializers.normal(1.0))


def _reference(w, bias, a, b, s, m, x):
  """DoRA output with the norm constant in the gradient (float32)."""
  w_new = w + s * a @ b
  n = jax.lax.stop_gradient(jnp.linalg.norm(w_new, axis=0))
  return jnp.dot(x, w_new * (m / n), precision=_HI) + bias


def _check_against_reference(layer, w, bias):
  ad = layer.lora
  ad.magnitude[...] = ad.magnitude[...] * jnp.linspace(0.5, 1.5,
                                                       ad.magnitude.size)
  x = jax.random.normal(jax.random.key(3), (5, w.shape[0]))
  s = ad.scale[...]
  gdef, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)
  loss = lambda p: jnp.sum(jnp.sin(nnx.merge(gdef, p, rest)(x)))
  ref = lambda a, b, m: jnp.sum(jnp.sin(_reference(w, bias, a, b, s, m, x)))
  np.testing.assert_allclose(
      layer(x), _reference(w, bias, ad.a[...], ad.b[...], s,
                           ad.magnitude[...], x), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss)(lora)
  want = jax.grad(ref, argnums=(0, 1, 2))(ad.a[...], ad.b[...],
                                          ad.magnitude[...])
  for name, exp in zip(('a', 'b', 'magnitude'), want):
    np.testing.assert_allclose(got['lora'][name][...], exp, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize('method', _METHODS)
def test_qdora_output_and_grads_equal_dora_on_the_dequantized_kernel(method):
  base = _float_layer()
  q = pnnx.QuantizedLayer.from_float(base, method=method)
  layer = pnnx.LoRA(q, rank=3, alpha=6.0, dora=True,
                    b_init=nnx.initializers.normal(0.3), rngs=nnx.Rngs(1))
  w = q.dequantized_kernel()
  np.testing.assert_allclose(layer.lora.base_norm_sq[...],
                             jnp.sum(w * w, axis=0), rtol=1e-5)
  _check_against_reference(layer, w, base.bias[...])


def test_dora_on_a_simulated_base_uses_the_fake_quantized_kernel():
  base = _float_layer()
  layer = pnnx.LoRA(pnnx.SimulateQuantized(base, method='int4'), rank=3,
                    dora=True, b_init=nnx.initializers.normal(0.3),
                    rngs=nnx.Rngs(1))
  w = simulate_quantize(base.kernel[...], 'int4', axis_to_reduce=(0,))
  _check_against_reference(layer, w, base.bias[...])


def test_base_norm_is_stored_frozen_and_outside_the_lora_state():
  model = nnx.Sequential(_float_layer())
  pnnx.apply_lora(model, rank=2, dora=True, rngs=nnx.Rngs(1))
  layer = model.layers[0]
  var = layer.lora.base_norm_sq
  assert isinstance(var, pnnx.DoRABaseNorm)
  assert not isinstance(var, nnx.Param)
  w = layer.wrapped.kernel[...]
  np.testing.assert_allclose(var[...], jnp.sum(w * w, axis=0), rtol=1e-6)
  names = {p[-1] for p, _ in nnx.to_flat_state(pnnx.lora_state(model))}
  assert names == {'a', 'b', 'magnitude'}
  # the trainable state of an optimizer over LoRAParam leaves it out
  _, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  assert 'base_norm_sq' not in str(jax.tree_util.tree_structure(lora))
  assert any(p[-1] == 'base_norm_sq' for p, _ in nnx.to_flat_state(rest))


def test_the_step_reads_the_stored_norm():
  """A stale stored norm changes the output; refresh_base_norms fixes it."""
  base = _float_layer()
  model = nnx.Sequential(pnnx.LoRA(base, rank=2, dora=True,
                                   b_init=nnx.initializers.normal(0.3),
                                   rngs=nnx.Rngs(1)))
  layer = model.layers[0]
  x = jax.random.normal(jax.random.key(0), (4, 64))
  base.kernel[...] = base.kernel[...] * 3.0
  ad = layer.lora
  want = _reference(base.kernel[...], base.bias[...], ad.a[...], ad.b[...],
                    ad.scale[...], ad.magnitude[...], x)
  assert not np.allclose(layer(x), want, rtol=1e-3)
  assert pnnx.refresh_base_norms(model) == 1
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_quantize_after_dora_refreshes_the_stored_norm():
  model = nnx.Sequential(_float_layer())
  pnnx.apply_lora(model, rank=2, dora=True, rngs=nnx.Rngs(1))
  pnnx.quantize(model, method='int4')
  layer = model.layers[0]
  assert isinstance(layer.wrapped, pnnx.QuantizedLayer)
  w = layer.wrapped.dequantized_kernel()
  np.testing.assert_allclose(layer.lora.base_norm_sq[...],
                             jnp.sum(w * w, axis=0), rtol=1e-5)


def test_pissa_dora_stores_the_norm_of_the_residual_kernel():
  base = _float_layer()
  layer = pnnx.LoRA(base, rank=2, dora=True, init='pissa', rngs=nnx.Rngs(1))
  w = base.kernel[...]  # the residual PiSSA wrote
  np.testing.assert_allclose(layer.lora.base_norm_sq[...],
                             jnp.sum(w * w, axis=0), rtol=1e-5)


@pytest.mark.parametrize('method', _METHODS)
def test_quantized_norm_is_blockwise(method):
  """||W_j||² from the storage without a float32 kernel-sized temporary."""
  base = nnx.Linear(2048, 1024, rngs=nnx.Rngs(0))
  q = pnnx.QuantizedLayer.from_float(base, method=method)
  g = q.geometry
  compiled = jax.jit(dora._quantized_sq_norm, static_argnums=(1, 2)).lower(
      q.qarray, g, 0).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  # 1 MiB float32 blocks (+ XLA unpacks int4 to 1 byte per element) vs the
  # 8 MiB float32 kernel
  assert temp <= 0.5 * 2048 * 1024 * 4, temp
  w = q.dequantized_kernel()
  np.testing.assert_allclose(dora._quantized_sq_norm(q.qarray, g, 0),
                             jnp.sum(w * w, axis=0), rtol=1e-5)


@pytest.mark.parametrize('method,group_size,extra', [
    ('int4', 32, {}), ('int8', 128, {}), ('fp8', None, {}), ('fp8', 128, {}),
    ('nf4', None, {}), ('nf4', None, {'double_quant': True})])
def test_quantized_norm_of_other_storages(method, group_size, extra):
  """Group-wise scales and FP8 go through the same storage slicing."""
  from peft.geometry import Geometry  # pylint: disable=g-import-not-at-top
  from peft.quantization import dequantize, quantize  # pylint: disable=g-import-not-at-top
  w = jax.random.normal(jax.random.key(0), (2048, 1024))
  q = quantize(w, method, axis_to_reduce=(0,), group_size=group_size, **extra)
  g = Geometry.linear(2048, 1024)
  got = dora._quantized_sq_norm(q, g, 0)
  d = dequantize(q)
  np.testing.assert_allclose(got, jnp.sum(d * d, axis=0), rtol=1e-5)
  compiled = jax.jit(dora._quantized_sq_norm, static_argnums=(1, 2)).lower(
      q, g, 0).compile()
  if extra.get('double_quant'):
    return  # stats of the whole kernel: one dequantization, at wrap time only
  # XLA on CPU widens int4 / fp8 storage before slicing it; still well
  # below the 8 MiB float32 kernel
  assert compiled.memory_analysis().temp_size_in_bytes <= 0.7 * 8 * 2**20


def test_qdora_step_does_not_dequantize_the_kernel():
  """The compiled QDoRA train step holds no float32 copy of the kernel.

  The base matmul dequantizes 4 MiB chunks (peft.kernels); the DoRA cross
  term goes through the same kernel, so QDoRA's temporaries stay within
  1 MiB of QLoRA's, far below the 16 MiB float32 kernel.
  """
  def temp(dora_):
    model = nnx.Sequential(nnx.Linear(2048, 2048, rngs=nnx.Rngs(0)))
    pnnx.quantize(model, method='int4')
    pnnx.apply_lora(model, rank=8, dora=dora_, rngs=nnx.Rngs(1))
    gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    x = jnp.ones((8, 2048))

    def step(lora, rest):
      loss = lambda p: jnp.sum(jnp.sin(nnx.merge(gdef, p, rest)(x)))
      return jax.grad(loss)(lora)

    c = jax.jit(step).lower(lora, rest).compile()
    return c.memory_analysis().temp_size_in_bytes

  qdora, qlora = temp(True), temp(False)
  assert qdora <= qlora + 2**20, (qdora, qlora)
  assert qdora < 8 * 2**20, qdora  # half the float32 kernel


@pytest.mark.parametrize('method', [None, 'int4', 'q4_0'])
def test_stacked_dora_matches_the_per_slice_reference(method):
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(64, 64, rngs=nnx.Rngs(key), precision=_HI)

  model = nnx.Sequential(make(jax.random.split(jax.random.key(0), 3)))
  if method:
    pnnx.quantize(model, method=method)
  pnnx.apply_lora(model, rank=2, dora=True,
                  b_init=nnx.initializers.normal(0.3), rngs=nnx.Rngs(1))
  layer = model.layers[0]
  ad = layer.lora
  assert ad.base_norm_sq.shape == ad.magnitude.shape == (3, 64)

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def run(layer, x):
    return layer(x)

  x = jax.random.normal(jax.random.key(2), (4, 64))
  w = (layer.wrapped.dequantized_kernel() if method
       else layer.wrapped.kernel[...])
  want = x
  for i in range(3):
    want = _reference(w[i], layer.wrapped.bias[...][i], ad.a[...][i],
                      ad.b[...][i], ad.scale[...][i], ad.magnitude[...][i],
                      want)
  np.testing.assert_allclose(run(layer, x), want, rtol=1e-5, atol=1e-5)


def test_summary_and_treescope_show_dora():
  import treescope  # pylint: disable=g-import-not-at-top
  model = nnx.Sequential(_float_layer())
  pnnx.quantize(model, method='int4')
  pnnx.apply_lora(model, rank=2, dora=True, rngs=nnx.Rngs(1))
  s = pnnx.summary(model)
  assert s.layers == {'LoRALinear(Int4Linear, dora)': 1}
  assert s.trainable == 64 * 2 + 2 * 32 + 32  # a, b and the magnitude
  text = treescope.render_to_text(model.layers[0])
  assert 'DoRA magnitude 32 (base norms stored)' in text


@pytest.mark.parametrize('quantized', [False, True])
def test_stored_norm_is_sharded_like_the_magnitude(quantized):
  mesh = jax.make_mesh((1, 1), ('embed', 'mlp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    base = nnx.Linear(64, 32, rngs=nnx.Rngs(0), kernel_init=(
        nnx.with_partitioning(nnx.initializers.lecun_normal(),
                              ('embed', 'mlp'))))
    if quantized:
      base = pnnx.QuantizedLayer.from_float(base)
    layer = pnnx.LoRA(base, rank=2, dora=True, rngs=nnx.Rngs(1))
  ad = layer.lora
  for var in (ad.magnitude, ad.base_norm_sq):
    assert tuple(var.get_metadata()['out_sharding']) == ('mlp',)
    assert var.get_value().sharding.spec == jax.sharding.PartitionSpec('mlp')

"""NF4, FP8 and group-wise INT4 / INT8 / FP8 in the real and simulated layers
(NNX and linen), surgery, `quantize_checkpoint` and QLoRA."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft
from peft import kernels
from peft.geometry import Geometry
from peft.nnx import quantized as nq
from peft.nnx import surgery
from peft.quantization import dequantize
from peft.quantization import quantize

# (method, quantize options)
CONFIGS = [
    ('nf4', {}),
    ('nf4', {'double_quant': True}),
    ('nf4', {'group_size': 128}),
    ('fp8', {}),
    ('fp8', {'group_size': 128}),
    ('int4', {'group_size': 128}),
    ('int4', {'group_size': 32}),
    ('int8', {'group_size': 64}),
]
IDS = [m + ''.join(f'-{k}={v}' for k, v in o.items()) for m, o in CONFIGS]


def _layers():
  """(name, float layer, input, dense reference einsum, contracted axes)."""
  rngs = nnx.Rngs(0)
  return [
      ('linear', nnx.Linear(256, 48, rngs=rngs), (3, 256), '...i,io->...o',
       (0,)),
      ('linear_general', nnx.LinearGeneral((2, 128), 16, axis=(-2, -1),
                                           rngs=rngs),
       (3, 2, 128), 'bhd,hdo->bo', (0, 1)),
      ('einsum', nnx.Einsum('bd,dnh->bnh', (256, 2, 8), (2, 8), rngs=rngs),
       (3, 256), 'bd,dnh->bnh', (0,)),
  ]


def _dense_reference(layer, x, eq, axes, method, opts):
  kernel = layer.kernel[...]
  w = dequantize(quantize(kernel, method, axes, **opts))
  y = jnp.einsum(eq, x, w)
  if layer.bias is not None and layer.bias[...] is not None:
    y = y + layer.bias[...]
  return y


@pytest.mark.parametrize('method,opts', CONFIGS, ids=IDS)
def test_real_layers_equal_dense_reference(method, opts):
  for name, layer, x_shape, eq, axes in _layers():
    x = jax.random.normal(jax.random.key(1), x_shape)
    ref = _dense_reference(layer, x, eq, axes, method, opts)
    outs = {}
    for strategy in ('blockwise', 'fused'):
      q = nq.QuantizedLayer.from_float(layer, method=method, strategy=strategy,
                                       **opts)
      outs[strategy] = q(x)
      np.testing.assert_allclose(outs[strategy], ref, atol=2e-5, rtol=1e-5,
                                 err_msg=f'{name} {strategy}')
      assert isinstance(q.values, nq.QuantizedWeight)
      assert q.qarray.method.value == method
    np.testing.assert_allclose(outs['blockwise'], outs['fused'], atol=2e-5,
                               rtol=1e-5, err_msg=name)
    sim = nq.SimulateQuantized(layer, method=method, **opts)
    np.testing.assert_allclose(sim(x), ref, atol=1e-5, rtol=1e-5,
                               err_msg=name)


@pytest.mark.parametrize('method,opts', CONFIGS[:6], ids=IDS[:6])
def test_blockwise_kernel_over_many_chunks(method, opts, monkeypatch):
  """Small chunks: the loop runs many steps over whole groups / blocks."""
  monkeypatch.setattr(kernels, '_CHUNK_ELEMENTS', 128 * 48)
  g = Geometry.linear(1024, 48)
  w = jnp.asarray(np.random.default_rng(0).standard_t(3, (1024, 48)),
                  jnp.float32)
  x = jax.random.normal(jax.random.key(2), (5, 1024))
  q = quantize(w, method, **opts)
  y = jax.jit(lambda x: kernels.quantized_einsum(
      x, q, g, strategy='blockwise'))(x)
  np.testing.assert_allclose(y, x @ dequantize(q), atol=1e-4, rtol=1e-5)


def test_shape_constructors_and_storage():
  lin = nq.Int4Linear(256, 32, method='nf4', double_quant=True)
  assert lin.values.shape == (128, 32) and lin.scale.dtype == jnp.uint8
  assert lin.stats.shape == (2,)
  np.testing.assert_array_equal(lin(jnp.ones((2, 256))), 0.0)
  grp = nq.Int4Linear(256, 32, method='int4', group_size=64)
  assert grp.scale.shape == (4, 32) and grp.values.dtype == jnp.int4
  ein = nq.Int4Einsum('bd,dnh->bnh', (256, 2, 8), method='fp8',
                      group_size=128)
  assert ein.scale.shape == (2, 2, 8)
  assert ein.values.dtype == jnp.float8_e4m3fn
  gen = nq.Int4LinearGeneral((2, 128), 16, axis=(-2, -1), method='nf4')
  assert gen.values.shape == (2, 64, 16) and gen.scale.shape == (2, 2, 16)
  with pytest.raises(ValueError, match='group_size'):
    nq.Int4Linear(96, 32, method='nf4')  # 96 is not a multiple of 64
  with pytest.raises(ValueError, match='group_size'):
    nq.Int4Linear(64, 32, method='q4_0', group_size=32)
  with pytest.raises(ValueError, match='NF4'):
    nq.Int4Linear(64, 32, method='int4', double_quant=True)


def test_storage_is_sharded_like_the_kernel():
  mesh = jax.make_mesh((1, 1), ('embed', 'mlp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    layer = nnx.Linear(256, 32, rngs=nnx.Rngs(0),
                       kernel_init=nnx.with_partitioning(
                           nnx.initializers.lecun_normal(), ('embed', 'mlp')))
  for method, opts in [('nf4', {}), ('int4', {'group_size': 64})]:
    q = nq.Int4Linear.from_float(layer, method=method, **opts)
    assert q.values.get_metadata()['out_sharding'] == ('embed', 'mlp')
    assert q.scale.get_metadata()['out_sharding'] == ('embed', 'mlp')
    specs = q.storage_partition_specs()
    assert tuple(specs.scale) == ('embed', 'mlp')


@pytest.mark.parametrize('method,opts', [('nf4', {}), ('int4', {'group_size': 64}),
                                         ('fp8', {})])
def test_surgery_quantize_and_qlora_trains_only_lora(method, opts):
  model = nnx.Sequential(nnx.Linear(128, 64, rngs=nnx.Rngs(0)), jax.nn.relu,
                         nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(3), (16, 128))
  y = jax.random.normal(jax.random.key(4), (16, 8))
  ref = model.layers[0]
  ref_out = _dense_reference(ref, x, '...i,io->...o', (0,), method, opts)
  surgery.quantize(model, method=method, **opts)
  assert isinstance(model.layers[0], nq.Int4Linear)
  assert model.layers[0].method.value == method
  np.testing.assert_allclose(model.layers[0](x), ref_out, atol=2e-5)
  frozen = jax.tree.map(np.asarray, nnx.state(model, nq.QuantizedWeight))
  surgery.apply_lora(model, rank=4, rngs=nnx.Rngs(5))
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  tx = optax.adam(1e-2)

  def loss_fn(lora, rest):
    return jnp.mean((nnx.merge(gdef, lora, rest)(x) - y) ** 2)

  @jax.jit
  def step(lora, rest, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(lora, rest)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(lora, updates), opt_state, loss

  # Gradients reach the LoRA factors only: the quantized storage is not a
  # Param and gets none (and has an integer / uint8 dtype).
  assert all(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(
      lora, is_leaf=lambda v: isinstance(v, nnx.Variable)))
  storage = jax.tree.leaves(nnx.state(model, nq.QuantizedWeight),
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert storage and not any(isinstance(v, nnx.Param) for v in storage)
  opt_state = tx.init(lora)
  losses = []
  for _ in range(15):
    lora, opt_state, loss = step(lora, rest, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0]
  nnx.update(model, lora)
  after = jax.tree.map(np.asarray, nnx.state(model, nq.QuantizedWeight))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(after),
                  strict=True):
    np.testing.assert_array_equal(a, b)  # the quantized base is frozen


def test_simulate_quantization_surgery_passes_group_size():
  model = nnx.Sequential(nnx.Linear(128, 16, rngs=nnx.Rngs(0)))
  surgery.simulate_quantization(model, method='int4', group_size=32)
  layer = model.layers[0]
  assert layer.group_size == 32
  x = jnp.ones((2, 128))
  w = layer.wrapped.kernel[...]
  ref = x @ peft.simulate_quantize(w, 'int4', group_size=32) + (
      layer.wrapped.bias[...])
  np.testing.assert_allclose(layer(x), ref, atol=1e-6)
  # Real quantization of the simulated layer keeps its options.
  q = nq.Int4Linear.from_float(layer)
  assert q.group_size == 32 and q.scale.shape == (4, 16)


@pytest.mark.parametrize('method,opts', CONFIGS, ids=IDS)
def test_linen_checkpoint_and_layers(method, opts):
  x = jax.random.normal(jax.random.key(1), (3, 256))
  params = nn.Dense(48).init(jax.random.key(0), x)['params']
  qp = peft.quantize_checkpoint(params, method=method, **opts)
  assert ('stats' in qp) == bool(opts.get('double_quant'))
  layer = peft.Int4Dense(wrapped=nn.Dense(48), method=method, **opts)
  ref = x @ dequantize(quantize(params['kernel'], method, **opts)) + (
      params['bias'])
  np.testing.assert_allclose(layer.apply({'params': qp}, x), ref, atol=2e-5)
  init = layer.init(jax.random.key(0), x)['params']
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, qp)
  sim = peft.SimulateQuantizedDense(wrapped=nn.Dense(48), method=method,
                                    **opts)
  np.testing.assert_allclose(sim.apply({'params': params}, x), ref,
                             atol=1e-5)
  if method == 'int4':  # a mismatching group_size is caught
    other = peft.Int4Dense(wrapped=nn.Dense(48), method=method)
    with pytest.raises(ValueError, match='group_size'):
      other.apply({'params': qp}, x)


def test_linen_einsum_nf4():
  x = jax.random.normal(jax.random.key(1), (3, 128))
  einsum = nn.Einsum((128, 2, 8), 'bd,dnh->bnh')
  params = einsum.init(jax.random.key(0), x)['params']
  qp = peft.quantize_checkpoint(params, method='nf4')
  layer = peft.Int4Einsum(wrapped=nn.Einsum((128, 2, 8), 'bd,dnh->bnh'),
                          method='nf4')
  w = dequantize(quantize(params['kernel'], 'nf4'))
  ref = jnp.einsum('bd,dnh->bnh', x, w) + params['bias']
  np.testing.assert_allclose(layer.apply({'params': qp}, x), ref, atol=2e-5)

"""Tests of peft/linen/quantized.py against numpy references and the codec."""

import flax.linen as nn
from flax.core import FrozenDict
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft.linen.interceptor import ModuleInterceptor
from peft.linen.lora import LoRADense
from peft.linen.quantized import (
    Int4Dense,
    Int4Einsum,
    SimulateQuantizedDense,
    SimulateQuantizedEinsum,
    quantize_checkpoint,
)
from peft.params import split_params
from peft.quantization import QuantizationMethod, simulate_quantize

_X = jax.random.normal(jax.random.key(1), (3, 64))
_XM = _X[:, :32]


def _np_int(w, bits):
  """DESIGN.md per-channel INT formula in numpy (reduced over axis 0)."""
  w = np.asarray(w, np.float32)
  hi = 2 ** (bits - 1) - 1
  m = np.max(np.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True)
  scale = np.float32(hi) / m
  q = np.clip(np.round(w * scale), -hi - 1, hi)
  return q / scale, q, scale


class _MLP(nn.Module):
  """Dense called twice, a gating Dense and an output Dense."""

  @nn.compact
  def __call__(self, x):
    d = nn.Dense(32)
    x = nn.gelu(d(x))
    x = nn.gelu(d(x))
    x = nn.gelu(nn.Dense(32, name='gating')(x))
    return nn.Dense(32)(x)


def _wrap(cls, method_for):
  def fn(module):
    if isinstance(module, nn.Dense):
      return cls(wrapped=module, method=method_for(module))
    return module
  return fn


def test_quantize_checkpoint_int4_layout_and_values():
  params = nn.Dense(32).init(jax.random.key(0), _X)['params']
  q = quantize_checkpoint(params)  # default INT4
  assert set(q) == {'kernel', 'scale', 'bias'}
  assert q['kernel'].dtype == jnp.int4 and q['kernel'].shape == (64, 32)
  assert q['scale'].shape == (1, 32) and q['scale'].dtype == jnp.float32
  np.testing.assert_array_equal(q['bias'], params['bias'])
  deq, codes, scale = _np_int(params['kernel'], 4)
  np.testing.assert_array_equal(np.asarray(q['kernel'], np.int8), codes)
  np.testing.assert_allclose(q['scale'], scale, rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(q['kernel'], np.float32) / np.asarray(q['scale']), deq,
      rtol=1e-6)
  assert 'scale' not in params  # input untouched


@pytest.mark.parametrize('method,values_shape,scale_shape', [
    ('q4_0', (64, 1, 16), (64, 1)),
    ('q4_0_transpose', (32, 2, 16), (32, 2)),
])
def test_quantize_checkpoint_q4_0_bits_per_weight(method, values_shape,
                                                 scale_shape):
  params = nn.Dense(32).init(jax.random.key(0), _X)['params']
  q = quantize_checkpoint(params, method=QuantizationMethod(method))
  assert q['kernel'].dtype == jnp.uint8 and q['kernel'].shape == values_shape
  assert q['scale'].dtype == jnp.float16 and q['scale'].shape == scale_shape
  bits = 8 * (q['kernel'].size + 2 * q['scale'].size) / params['kernel'].size
  assert bits == 4.5


def test_quantize_checkpoint_tree_kinds_and_errors():
  params = FrozenDict({'a': {'kernel': jnp.ones((32, 32)), 'bias': jnp.ones(
      32)}, 'norm': {'scale': jnp.ones(32)}, 'x': {'lora': {'a': jnp.ones(
          (32, 2)), 'b': jnp.ones((2, 32))}, 'kernel': jnp.ones((32, 32))}})
  q = quantize_checkpoint(params, 'int8')
  assert isinstance(q, FrozenDict)
  assert q['x']['kernel'].dtype == jnp.int8
  assert q['x']['lora']['a'].dtype == jnp.float32  # LoRA untouched
  np.testing.assert_array_equal(q['norm']['scale'], params['norm']['scale'])
  with pytest.raises(ValueError, match='quantized already'):
    quantize_checkpoint(q)
  with pytest.raises(ValueError, match="'d/kernel'.*32"):
    quantize_checkpoint({'d': {'kernel': jnp.ones((8, 10))}}, 'q4_0')
  with pytest.raises(ValueError, match='no packed storage'):
    quantize_checkpoint(params, 'sfp8')
  with pytest.raises(ValueError, match='int4'):
    quantize_checkpoint(params, 'int3')
  with pytest.raises(TypeError, match='nested mapping'):
    quantize_checkpoint([1, 2])


@pytest.mark.parametrize('method', ['int4', 'q4_0_transpose', 'sfp8'])
def test_simulate_dense_params_and_output(method):
  dense = nn.Dense(32)
  plain = dense.init(jax.random.key(0), _X)
  layer = SimulateQuantizedDense(wrapped=nn.Dense(32), method=method)
  variables = layer.init(jax.random.key(0), _X)
  # Same params as the wrapped layer, initialised identically.
  jax.tree.map(np.testing.assert_array_equal, variables, plain)
  p = variables['params']
  y = layer.apply(variables, _X)
  if method in ('int4', 'int8'):
    w = _np_int(p['kernel'], 4 if method == 'int4' else 8)[0]
  else:  # Q4_0 & co: the codec is tested in test_quantization.py
    w = np.asarray(simulate_quantize(p['kernel'], method))
  ref = np.asarray(_X) @ w + np.asarray(p['bias'])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # Straight-through: gradient as for the plain layer with the fake kernel.
  g = jax.grad(lambda p: layer.apply({'params': p}, _X).sum())(p)
  np.testing.assert_allclose(g['kernel'], np.asarray(_X).sum(0)[:, None]
                             * np.ones((1, 32)), rtol=1e-5)


def test_simulate_einsum_per_channel_over_contracted_axes():
  einsum = nn.Einsum(shape=(64, 2, 32), einsum_str='bi,imn->bmn')
  layer = SimulateQuantizedEinsum(wrapped=einsum, method='int4')
  variables = layer.init(jax.random.key(0), _X)
  assert jax.tree.map(jnp.shape, variables['params']) == {
      'kernel': (64, 2, 32), 'bias': (2, 32)}
  p = jax.tree.map(np.asarray, variables['params'])
  y = layer.apply(variables, _X)
  k = p['kernel']
  m = np.max(np.abs(k), axis=0, keepdims=True)  # reduce over 'i' only
  w = np.clip(np.round(k * (7 / m)), -8, 7) / (7 / m)
  ref = np.einsum('bi,imn->bmn', np.asarray(_X), w) + p['bias']
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', ['int4', 'q4_0'])
def test_int4_dense_in_model_matches_simulate(method):
  def method_for(module):
    if method == 'q4_0' and module.name == 'gating':
      return 'q4_0_transpose'  # the document's FFN note
    return method

  with ModuleInterceptor(_wrap(SimulateQuantizedDense, method_for)):
    variables = _MLP().init(jax.random.key(0), _XM)
    y_sim = _MLP().apply(variables, _XM)
  plain = _MLP().init(jax.random.key(0), _XM)
  jax.tree.map(np.testing.assert_array_equal, variables, plain)
  params_q = {
      k: quantize_checkpoint(v, method_for(nn.Dense(1, name=k)))
      for k, v in variables['params'].items()
  }
  with ModuleInterceptor(_wrap(Int4Dense, method_for)):
    y_int = jax.jit(lambda p: _MLP().apply({'params': p}, _XM))(params_q)
    init_q = _MLP().init(jax.random.key(0), _XM)['params']
  np.testing.assert_allclose(y_int, y_sim, rtol=1e-5, atol=1e-5)
  # Int4Dense.init == quantize_checkpoint(wrapped layer's init).
  jax.tree.map(np.testing.assert_array_equal, init_q, params_q)


@pytest.mark.parametrize('method', ['int4', 'q4_0'])
def test_int4_einsum_matches_simulate(method):
  einsum = nn.Einsum(shape=(64, 32), einsum_str='bd,df->bf')
  params = einsum.init(jax.random.key(0), _X)['params']
  y_sim = SimulateQuantizedEinsum(wrapped=einsum, method=method).apply(
      {'params': params}, _X)
  y_int = Int4Einsum(wrapped=einsum, method=method).apply(
      {'params': quantize_checkpoint(params, method)}, _X)
  np.testing.assert_allclose(y_int, y_sim, rtol=1e-5, atol=1e-5)


def test_int4_einsum_multi_output_axes_dequantizes_as_stored():
  einsum = nn.Einsum(shape=(64, 2, 32), einsum_str='bi,imn->bmn')
  p = einsum.init(jax.random.key(0), _X)['params']
  q = quantize_checkpoint(p)  # scale (1, 1, 32): over all axes but the last
  y = Int4Einsum(wrapped=einsum).apply({'params': q}, _X)
  w = np.asarray(q['kernel'], np.float32) / np.asarray(q['scale'])
  ref = np.einsum('bi,imn->bmn', np.asarray(_X), w) + np.asarray(p['bias'])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_qlora_lora_over_int4_dense():
  def fn(module):
    if isinstance(module, nn.Dense):
      return LoRADense(rank=2, wrapped=Int4Dense(wrapped=module))
    return module

  model = nn.Sequential([nn.Dense(32)])
  with ModuleInterceptor(fn):
    params = model.init(jax.random.key(0), _X)['params']['layers_0']
  assert jax.tree.map(lambda a: (a.shape, str(a.dtype)), params) == {
      'kernel': ((64, 32), 'int4'), 'scale': ((1, 32), 'float32'),
      'bias': ((32,), 'float32'),
      'lora': {'a': ((64, 2), 'float32'), 'b': ((2, 32), 'float32')},
  }
  _, lora = split_params(params)
  lora = jax.tree.map(lambda a: a + 0.1, lora)
  original, _ = split_params(params)
  with ModuleInterceptor(fn):
    y = model.apply(
        {'params': {'layers_0': {**original, 'lora': lora['lora']}}}, _X)
  w = np.asarray(params['kernel'], np.float32) / np.asarray(params['scale'])
  ref = (np.asarray(_X) @ w + np.asarray(params['bias'])
         + np.asarray(_X) @ np.asarray(lora['lora']['a'])
         @ np.asarray(lora['lora']['b']))
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_errors():
  x = jnp.ones((2, 8))
  with pytest.raises(TypeError, match='`wrapped` must be an nn.Dense'):
    SimulateQuantizedDense(wrapped=nn.Einsum(shape=(8, 3),
                                             einsum_str='bi,io->bo'))
  with pytest.raises(TypeError, match='`wrapped` must be an nn.Einsum'):
    Int4Einsum(wrapped=nn.Dense(3))
  with pytest.raises(ValueError, match='no packed storage'):
    Int4Dense(wrapped=nn.Dense(32), method='sfp8')
  with pytest.raises(ValueError, match='int4'):
    SimulateQuantizedDense(wrapped=nn.Dense(32), method='int5')
  # The document's `Int4Dense(wrapped=nn.Dense(10), method=Q4_0)`: Q4_0
  # blocks run along the 10 output features, which is not a multiple of 32.
  with pytest.raises(ValueError, match='multiple of 32|divisible by 32'):
    Int4Dense(wrapped=nn.Dense(10), method='q4_0').init(jax.random.key(0), x)
  float_params = nn.Dense(32).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='quantize_checkpoint'):
    Int4Dense(wrapped=nn.Dense(32)).apply(float_params, x)
  with pytest.raises(ValueError, match="no 'kernel'"):
    Int4Dense(wrapped=nn.Dense(32)).apply({'params': {}}, x)
  q8 = quantize_checkpoint(float_params['params'], 'int8')
  with pytest.raises(ValueError, match='int4'):
    Int4Dense(wrapped=nn.Dense(32)).apply({'params': q8}, x)


# ---------------------------------------------------------------------------
# Partitioning metadata: boxed kernels give boxed storage. Expected names are
# written out by hand from the storage layouts of peft.quantization.


def _boxed_dense_params(names=('data', 'model'), shape=(64, 64), mesh=None):
  w = jax.random.normal(jax.random.key(3), shape)
  return {'kernel': nn.Partitioned(w, names, mesh=mesh),
          'bias': jnp.zeros(shape[-1])}


def _names(tree):
  return jax.tree.map(
      lambda b: tuple(b.names) if isinstance(b, nn.Partitioned) else None,
      tree, is_leaf=lambda b: isinstance(b, nn.Partitioned))


@pytest.mark.parametrize('method,kernel_names,scale_names', [
    ('int4', ('data', 'model'), (None, 'model')),
    ('int8', ('data', 'model'), (None, 'model')),
    # values (K, N // 32, 16), scale (K, N // 32)
    ('q4_0', ('data', 'model', None), ('data', 'model')),
    # values (N, K // 32, 16), scale (N, K // 32)
    ('q4_0_transpose', ('model', 'data', None), ('model', 'data')),
])
def test_quantize_checkpoint_boxes_storage_like_kernel(method, kernel_names,
                                                       scale_names):
  params = _boxed_dense_params()
  q = quantize_checkpoint({'layer': params}, method=method)
  marker = {method: None} if method.startswith('q4_0') else {}
  assert _names(q) == {'layer': {'kernel': kernel_names, 'scale': scale_names,
                                 'bias': None, **marker}}
  specs = nn.get_partition_spec(q)['layer']
  assert tuple(specs['kernel']) == kernel_names
  assert tuple(specs['scale']) == scale_names
  # Same arrays as quantizing the plain kernel; the input is not modified.
  plain = quantize_checkpoint({'layer': nn.unbox(params)}, method=method)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(q), plain)
  assert isinstance(params['kernel'], nn.Partitioned)
  assert 'scale' not in params


def test_quantize_checkpoint_stacked_kernel_and_box_class():
  rules = (('layers', None), ('embed', 'data'), ('mlp', 'model'))
  w = jax.random.normal(jax.random.key(3), (2, 64, 64))
  box = nn.LogicallyPartitioned(w, ('layers', 'embed', 'mlp'), rules=rules)
  for method, want_k, want_s in [
      ('int4', ('layers', 'embed', 'mlp'), (None, None, 'mlp')),
      ('q4_0', ('layers', 'embed', 'mlp', None), ('layers', 'embed', 'mlp')),
  ]:
    q = quantize_checkpoint({'kernel': box}, method=method)
    assert type(q['kernel']) is nn.LogicallyPartitioned
    assert q['scale'].rules == rules
    marker = {method: None} if method == 'q4_0' else {}
    assert _names(q) == {'kernel': want_k, 'scale': want_s, **marker}


@pytest.mark.parametrize('model_size,block_name', [(2, 'model'), (4, None)])
def test_q4_0_block_axis_named_only_when_mesh_divides_blocks(model_size,
                                                             block_name):
  # (64, 64) kernel: 64 // 32 = 2 blocks along the output axis; a 'model'
  # axis of 4 devices cannot split 2 blocks, one of 2 devices can.
  mesh = jax.sharding.AbstractMesh((1, model_size), ('data', 'model'))
  q = quantize_checkpoint(_boxed_dense_params(mesh=mesh), method='q4_0')
  assert _names(q)['kernel'] == ('data', block_name, None)
  assert _names(q)['scale'] == ('data', block_name)
  assert q['kernel'].mesh is mesh


def test_unboxed_checkpoint_stays_unboxed():
  params = nn.unbox(_boxed_dense_params())
  q = quantize_checkpoint(params, method='q4_0')
  assert not any(isinstance(l, nn.meta.AxisMetadata) for l in jax.tree.leaves(
      q, is_leaf=lambda l: isinstance(l, nn.meta.AxisMetadata)))


@pytest.mark.parametrize('method', ['int4', 'q4_0'])
def test_int4_dense_init_boxes_and_reads_boxed_storage(method):
  layer = Int4Dense(method=method, wrapped=nn.Dense(
      64, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                           ('data', 'model'))))
  variables = layer.init(jax.random.key(0), _X)
  want = {'int4': (('data', 'model'), (None, 'model')),
          'q4_0': (('data', 'model', None), ('data', 'model'))}[method]
  names = _names(variables['params'])
  assert (names['kernel'], names['scale']) == want
  # Boxed and unboxed params give the same output, equal to a numpy
  # dequantization of the stored arrays (int4: values / scale).
  y_boxed = layer.apply(variables, _X)
  y_plain = layer.apply(nn.unbox(variables), _X)
  np.testing.assert_array_equal(y_boxed, y_plain)
  p = nn.unbox(variables['params'])
  if method == 'int4':
    w = np.asarray(p['kernel'], np.float32) / np.asarray(p['scale'])
    ref = np.asarray(_X) @ w + np.asarray(p['bias'])
    np.testing.assert_allclose(y_boxed, ref, rtol=1e-5, atol=1e-5)


def test_int4_einsum_reads_boxed_checkpoint():
  einsum = nn.Einsum(shape=(64, 32), einsum_str='bd,df->bf', use_bias=False,
                     kernel_init=nn.with_partitioning(
                         nn.initializers.lecun_normal(), ('data', 'model')))
  boxed = einsum.init(jax.random.key(0), _X)['params']
  q = quantize_checkpoint(boxed, method='int8')
  y = Int4Einsum(wrapped=einsum, method='int8').apply({'params': q}, _X)
  _, values, scale = _np_int(nn.unbox(boxed)['kernel'], 8)
  np.testing.assert_array_equal(np.asarray(nn.unbox(q)['kernel']), values)
  ref = np.asarray(_X) @ (values / scale)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Q4_0 vs Q4_0_TRANSPOSE: same shapes for a square kernel; the marker leaf
# written by quantize_checkpoint tells them apart.


@pytest.mark.parametrize('stored,read', [('q4_0', 'q4_0_transpose'),
                                         ('q4_0_transpose', 'q4_0')])
def test_square_q4_0_layout_mismatch_is_an_error(stored, read):
  params = nn.Dense(64).init(jax.random.key(0), _X)['params']  # (64, 64)
  q = quantize_checkpoint(params, stored)
  assert q[stored].shape == (1,) and read not in q
  layer = Int4Dense(wrapped=nn.Dense(64), method=read)
  with pytest.raises(ValueError, match=f"{stored} storage.*method='{stored}'"):
    layer.apply({'params': q}, _X)
  with pytest.raises(ValueError, match='marker'):  # also at trace time
    jax.jit(lambda p: layer.apply({'params': p}, _X))(q)
  right = Int4Dense(wrapped=nn.Dense(64), method=stored)
  y_sim = SimulateQuantizedDense(wrapped=nn.Dense(64), method=stored).apply(
      {'params': params}, _X)
  np.testing.assert_allclose(right.apply({'params': q}, _X), y_sim,
                             rtol=1e-5, atol=1e-5)
  # Without the marker a square kernel's layout cannot be told: an error.
  unmarked = {k: v for k, v in q.items() if k != stored}
  with pytest.raises(ValueError, match='no .* marker.*quantize_checkpoint'):
    right.apply({'params': unmarked}, _X)
  # Int4Dense.init writes the marker, as quantize_checkpoint does.
  assert stored in right.init(jax.random.key(0), _X)['params']


def test_unmarked_non_square_q4_0_checkpoint_still_reads():
  params = nn.Dense(32).init(jax.random.key(0), _X)['params']  # (64, 32)
  q = quantize_checkpoint(params, 'q4_0')
  unmarked = {k: v for k, v in q.items() if k != 'q4_0'}
  layer = Int4Dense(wrapped=nn.Dense(32), method='q4_0')
  np.testing.assert_array_equal(layer.apply({'params': unmarked}, _X),
                                layer.apply({'params': q}, _X))

"""Tests of peft/linen/lora.py: layouts, outputs vs dense references, training."""

import re
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft.linen.interceptor import ModuleInterceptor
from peft.linen.lora import (
    LoRADense,
    LoRADenseAdapter,
    LoRADenseGeneral,
    LoRADenseGeneralAdapter,
    LoRAEinsum,
    LoRAEinsumAdapter,
)
from peft.params import fuse_params, merge_params, split_params


class _Model(nn.Module):
  """One Dense called twice, a second Dense, an Einsum and a DenseGeneral."""

  @nn.compact
  def __call__(self, x):
    d = nn.Dense(4)
    x = jnp.tanh(d(x))
    x = jnp.tanh(d(x))
    x = nn.Dense(4)(x)
    e = nn.Einsum(shape=(4, 2, 3), einsum_str='bi,imn->bmn')(x)
    g = nn.DenseGeneral(features=(2, 3))(x)
    return e + g


def _to_lora(rank=2, alpha=None, dtype=jnp.float32):
  def fn(module):
    kw = dict(rank=rank, alpha=alpha, dtype=dtype, wrapped=module)
    if isinstance(module, nn.Dense):
      return LoRADense(**kw)
    if isinstance(module, nn.Einsum):
      return LoRAEinsum(**kw)
    if isinstance(module, nn.DenseGeneral):
      return LoRADenseGeneral(**kw)
    return module
  return fn


_X = jax.random.normal(jax.random.key(1), (5, 4))


def _init(rank=2, alpha=None, dtype=jnp.float32):
  with ModuleInterceptor(_to_lora(rank, alpha, dtype)):
    return _Model().init(jax.random.key(0), _X)


def _apply(variables, x=_X, **kw):
  with ModuleInterceptor(_to_lora(**kw)):
    return _Model().apply(variables, x)


def _randomize(tree, seed=2):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      (0.5 * jax.random.normal(k, l.shape)).astype(l.dtype)
      for k, l in zip(keys, leaves)
  ])


def _reference(p, x, scale=1.0):
  """The model in numpy, LoRA written as kernel + scale * (a @ b)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)

  def w_dense(layer):
    return layer['kernel'] + scale * layer['lora']['a'] @ layer['lora']['b']

  d0, d1 = p['Dense_0'], p['Dense_1']
  h = np.tanh(x @ w_dense(d0) + d0['bias'])
  h = np.tanh(h @ w_dense(d0) + d0['bias'])
  h = h @ w_dense(d1) + d1['bias']
  e = p['Einsum_0']
  we = e['kernel'] + scale * np.einsum('ir,rmn->imn', e['lora']['a'],
                                       e['lora']['b'])
  y_e = np.einsum('bi,imn->bmn', h, we) + e['bias']
  g = p['DenseGeneral_0']
  wg = g['kernel'] + scale * np.einsum('ir,rmn->imn', g['lora']['a'],
                                       g['lora']['b'])
  y_g = np.einsum('bi,imn->bmn', h, wg) + g['bias']
  return y_e + y_g


def test_param_tree_paths_shapes_dtypes():
  variables = _init(rank=3)
  assert list(variables) == ['params']
  got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), variables['params'])
  f32 = 'float32'
  assert got == {
      'Dense_0': {
          'kernel': ((4, 4), f32), 'bias': ((4,), f32),
          'lora': {'a': ((4, 3), f32), 'b': ((3, 4), f32)},
      },
      'Dense_1': {
          'kernel': ((4, 4), f32), 'bias': ((4,), f32),
          'lora': {'a': ((4, 3), f32), 'b': ((3, 4), f32)},
      },
      'Einsum_0': {
          'kernel': ((4, 2, 3), f32), 'bias': ((2, 3), f32),
          'lora': {'a': ((4, 3), f32), 'b': ((3, 2, 3), f32)},
      },
      'DenseGeneral_0': {
          'kernel': ((4, 2, 3), f32), 'bias': ((2, 3), f32),
          'lora': {'a': ((4, 3), f32), 'b': ((3, 2, 3), f32)},
      },
  }


def test_lora_dtype():
  variables = _init(dtype=jnp.bfloat16)
  _, lora = split_params(variables['params'])
  assert {str(l.dtype) for l in jax.tree.leaves(lora)} == {'bfloat16'}


def test_fresh_wrapper_is_identity_and_base_params_unchanged():
  variables = _init()
  plain = _Model().init(jax.random.key(0), _X)
  original, lora = split_params(variables['params'])
  # b starts at zero; a is not zero.
  for layer in lora.values():
    assert not np.any(np.asarray(layer['lora']['b']))
    assert np.any(np.asarray(layer['lora']['a']))
  # The base layers' params are exactly what the plain model initialises.
  jax.tree.map(np.testing.assert_array_equal, original, plain['params'])
  np.testing.assert_allclose(
      _apply(variables), _Model().apply(plain, _X), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize('alpha', [None, 6.0])
def test_outputs_with_nonzero_b_match_reference(alpha):
  rank = 3
  params = _randomize(_init(rank=rank, alpha=alpha)['params'])
  y = _apply({'params': params}, rank=rank, alpha=alpha)
  scale = 1.0 if alpha is None else alpha / rank
  np.testing.assert_allclose(
      np.asarray(y), _reference(params, _X, scale), rtol=2e-5, atol=2e-5
  )
  y_jit = jax.jit(lambda p: _apply({'params': p}, rank=rank, alpha=alpha))(
      params)
  np.testing.assert_allclose(y_jit, y, rtol=1e-6, atol=1e-6)


def test_params_only_apply_and_missing_lora_error():
  variables = _init()
  # `init(...)['params']` alone is enough: the scale is not a variable.
  _apply({'params': variables['params']})
  original, _ = split_params(variables['params'])
  with pytest.raises(ValueError, match='LoRA params.*missing'):
    _apply({'params': original})


def test_lora_only_training_lowers_loss():
  params = _init(rank=2)['params']
  original, lora = split_params(params)
  target = jnp.sin(jnp.arange(30.0).reshape(5, 2, 3))

  def loss_fn(lora):
    y = _apply({'params': merge_params(original, lora)})
    return jnp.mean((y - target) ** 2)

  tx = optax.adam(3e-2)
  opt_state = tx.init(lora)

  @jax.jit
  def step(lora, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  losses = []
  for _ in range(30):
    lora, opt_state, loss = step(lora, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  assert jax.tree.structure(lora) == jax.tree.structure(
      split_params(params)[1])


def test_fuse_params_gives_same_output():
  params = _randomize(_init()['params'])
  y = _apply({'params': params})
  fused = fuse_params(params)
  y_fused = _Model().apply({'params': fused}, _X)  # plain model, no LoRA
  np.testing.assert_allclose(y_fused, y, rtol=2e-5, atol=2e-5)


def test_direct_use_document_layout():

  class MyModel(nn.Module):

    @nn.compact
    def __call__(self, x):
      layer = LoRADense(rank=3, wrapped=nn.Dense(10))
      return layer(x)

  params = MyModel().init(jax.random.key(0), _X)['params']
  assert jax.tree.map(jnp.shape, params) == {
      'Dense_0': {'kernel': (4, 10), 'bias': (10,),
                  'lora': {'a': (4, 3), 'b': (3, 10)}}
  }


def test_adapters_alone():
  x = np.asarray(_X)

  class M(nn.Module):

    @nn.compact
    def __call__(self, x):
      y1 = LoRADenseAdapter(rank=2, features=3)(x)
      y2 = LoRAEinsumAdapter(rank=2, einsum_str='bi,imn->bmn',
                             shape=(4, 2, 3))(x)
      y3 = LoRADenseGeneralAdapter(rank=2, features=(2, 3), alpha=4.0)(x)
      return y1, y2, y3

  variables = M().init(jax.random.key(0), _X)
  p = _randomize(variables['params'])
  assert jax.tree.map(jnp.shape, p) == {
      'LoRADenseAdapter_0': {'a': (4, 2), 'b': (2, 3)},
      'LoRAEinsumAdapter_0': {'a': (4, 2), 'b': (2, 2, 3)},
      'LoRADenseGeneralAdapter_0': {'a': (4, 2), 'b': (2, 2, 3)},
  }
  y1, y2, y3 = M().apply({'params': p}, _X)
  q = jax.tree.map(np.asarray, p)
  np.testing.assert_allclose(
      y1, x @ q['LoRADenseAdapter_0']['a'] @ q['LoRADenseAdapter_0']['b'],
      rtol=1e-5, atol=1e-5)
  e = q['LoRAEinsumAdapter_0']
  np.testing.assert_allclose(
      y2, np.einsum('bi,ir,rmn->bmn', x, e['a'], e['b']), rtol=1e-5,
      atol=1e-5)
  g = q['LoRADenseGeneralAdapter_0']
  np.testing.assert_allclose(
      y3, 2.0 * np.einsum('bi,ir,rmn->bmn', x, g['a'], g['b']), rtol=1e-5,
      atol=1e-5)


def test_dense_general_batch_dims_and_axes():
  x = jax.random.normal(jax.random.key(3), (3, 5, 2, 4))
  layer = LoRADenseGeneral(
      rank=2,
      wrapped=nn.DenseGeneral(features=(6,), axis=(-2, -1), batch_dims=(0,)),
  )
  variables = layer.init(jax.random.key(0), x)
  p = _randomize(variables['params'])
  assert jax.tree.map(jnp.shape, p) == {
      'kernel': (3, 2, 4, 6), 'bias': (3, 6),
      'lora': {'a': (3, 2, 4, 2), 'b': (3, 2, 6)},
  }
  y = layer.apply({'params': p}, x)
  q = jax.tree.map(np.asarray, p)
  w = q['kernel'] + np.einsum('bijr,brf->bijf', q['lora']['a'],
                              q['lora']['b'])
  ref = np.einsum('btij,bijf->btf', np.asarray(x), w) + q['bias'][:, None]
  np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


def test_einsum_str_at_call_time():
  layer = LoRAEinsum(rank=2, wrapped=nn.Einsum(shape=(4, 2, 3),
                                              use_bias=False))
  v = layer.init(jax.random.key(0), _X, 'bi,imn->bmn')
  p = _randomize(v['params'])
  y = layer.apply({'params': p}, _X, 'bi,imn->bmn')
  q = jax.tree.map(np.asarray, p)
  w = q['kernel'] + np.einsum('ir,rmn->imn', q['lora']['a'], q['lora']['b'])
  np.testing.assert_allclose(y, np.einsum('bi,imn->bmn', np.asarray(_X), w),
                             rtol=2e-5, atol=2e-5)


def test_errors():
  with pytest.raises(ValueError, match='rank must be a positive int'):
    LoRADense(rank=0, wrapped=nn.Dense(3))
  with pytest.raises(TypeError, match='`wrapped` must be an nn.Dense'):
    LoRADense(rank=2, wrapped=nn.Einsum(shape=(4, 3), einsum_str='bi,io->bo'))
  with pytest.raises(TypeError, match='`wrapped` must be an nn.Einsum'):
    LoRAEinsum(rank=2, wrapped=nn.Dense(3))
  with pytest.raises(TypeError, match='`wrapped` must be an nn.DenseGeneral'):
    LoRADenseGeneral(rank=2, wrapped=nn.Dense(3))
  with pytest.raises(ValueError, match='rank must be a positive int'):
    LoRADenseAdapter(rank=-1, features=3).init(jax.random.key(0), _X)
  with pytest.raises(ValueError, match='einsum_str'):
    LoRAEinsumAdapter(rank=2, einsum_str='bi,imn', shape=(4, 2, 3)).init(
        jax.random.key(0), _X)
  with pytest.raises(TypeError):
    LoRADenseAdapter(rank=2)  # `features` is required


def test_mutable_params_apply_initialises_missing_lora():
  layer = LoRADense(rank=2, wrapped=nn.Dense(3))
  base = nn.Dense(3).init(jax.random.key(0), _X)
  _, updated = layer.apply(base, _X, mutable=['params'],
                           rngs={'params': jax.random.key(1)})
  assert jax.tree.map(jnp.shape, updated['params']['lora']) == {
      'a': (4, 2), 'b': (2, 3)}


def test_threads_match_sequential():
  """4 threads, each with its own ModuleInterceptor and model, as sequential."""

  def run(i):
    x = jax.random.normal(jax.random.key(i), (3, 4))
    with ModuleInterceptor(_to_lora(rank=i + 1)):
      variables = _Model().init(jax.random.key(i), x)
      y = _Model().apply(variables, x)
    return variables, y

  sequential = [run(i) for i in range(4)]
  threaded, errors = [None] * 4, []

  def work(i):
    try:
      threaded[i] = run(i)
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)

  threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  for (v_s, y_s), (v_t, y_t) in zip(sequential, threaded):
    assert jax.tree.structure(v_s) == jax.tree.structure(v_t)
    jax.tree.map(np.testing.assert_array_equal, v_s, v_t)
    np.testing.assert_array_equal(y_s, y_t)
  assert sequential[3][0]['params']['Dense_0']['lora']['a'].shape == (4, 4)


# ---------------------------------------------------------------------------
# Sharding metadata: a and b are boxed like the wrapped kernel. Expected
# names are written out by hand: a = input-axis names + None (rank),
# b = None (rank) + output-axis names, batch axes keep their names in both.


def _partitioned(names, logical=False):
  init = nn.initializers.lecun_normal()
  if logical:
    return nn.with_logical_partitioning(init, names)
  return nn.with_partitioning(init, names)


def _specs(variables):
  return jax.tree.map(tuple, nn.get_partition_spec(variables)['params'],
                      is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


_SHARDED_CASES = {
    'dense': (
        lambda: LoRADense(rank=2, wrapped=nn.Dense(
            6, kernel_init=_partitioned(('data', 'model')))),
        (5, 4), ('data', None), (None, 'model')),
    'einsum': (
        lambda: LoRAEinsum(rank=2, wrapped=nn.Einsum(
            shape=(4, 3, 2), einsum_str='btd,dhk->bthk', use_bias=False,
            kernel_init=_partitioned(('data', 'model', None)))),
        (5, 7, 4), ('data', None), (None, 'model', None)),
    'einsum_contract_two': (
        lambda: LoRAEinsum(rank=2, wrapped=nn.Einsum(
            shape=(3, 2, 4), einsum_str='bthk,hkd->btd', use_bias=False,
            kernel_init=_partitioned(('model', None, 'data')))),
        (5, 7, 3, 2), ('model', None, None), (None, 'data')),
    'einsum_batch_axis': (
        lambda: LoRAEinsum(rank=2, wrapped=nn.Einsum(
            shape=(3, 4, 6), einsum_str='ebd,edf->ebf', use_bias=False,
            kernel_init=_partitioned(('expert', 'data', 'model')))),
        (3, 5, 4), ('expert', 'data', None), ('expert', None, 'model')),
    'dense_general_batch_dims': (
        lambda: LoRADenseGeneral(rank=2, wrapped=nn.DenseGeneral(
            (2, 3), axis=-1, batch_dims=(0,),
            kernel_init=_partitioned(('expert', 'data', 'model', None)))),
        (3, 5, 4), ('expert', 'data', None), ('expert', None, 'model', None)),
}


@pytest.mark.parametrize('case', sorted(_SHARDED_CASES))
def test_factors_boxed_with_kernel_names(case):
  make, x_shape, a_names, b_names = _SHARDED_CASES[case]
  variables = make().init(jax.random.key(0), jnp.ones(x_shape))
  lora = variables['params']['lora']
  assert isinstance(lora['a'], nn.Partitioned)
  assert isinstance(lora['b'], nn.Partitioned)
  specs = _specs(variables)
  assert specs['lora'] == {'a': a_names, 'b': b_names}
  # Same layout as without boxes: kernel (+ bias) and lora/{a, b} side by side.
  assert 'kernel' in variables['params']


def test_unboxed_kernel_gives_plain_factors():
  variables = LoRADense(rank=2, wrapped=nn.Dense(6)).init(
      jax.random.key(0), jnp.ones((5, 4)))
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(
      x, nn.meta.AxisMetadata))
  assert not any(isinstance(l, nn.meta.AxisMetadata) for l in leaves)
  assert jax.tree.map(jnp.shape, variables['params']) == {
      'kernel': (4, 6), 'bias': (6,), 'lora': {'a': (4, 2), 'b': (2, 6)}}


def test_boxed_document_layout_in_a_model():
  class M(nn.Module):

    @nn.compact
    def __call__(self, x):
      return LoRADense(rank=3, wrapped=nn.Dense(
          5, kernel_init=_partitioned(('embed', 'mlp'))))(x)

  variables = M().init(jax.random.key(0), jnp.ones((2, 4)))
  params = nn.unbox(variables['params'])
  assert jax.tree.map(jnp.shape, params) == {'Dense_0': {
      'kernel': (4, 5), 'bias': (5,), 'lora': {'a': (4, 3), 'b': (3, 5)}}}
  assert _specs(variables)['Dense_0']['lora'] == {
      'a': ('embed', None), 'b': (None, 'mlp')}


def test_logically_partitioned_kernel_keeps_box_class_and_rules():
  rules = (('embed', 'data'), ('mlp', 'model'))
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                      ('embed', 'mlp'), rules=rules)
  layer = LoRADense(rank=2, wrapped=nn.Dense(6, kernel_init=init))
  params = layer.init(jax.random.key(0), jnp.ones((1, 4)))['params']
  for name, names in [('a', ('embed', None)), ('b', (None, 'mlp'))]:
    box = params['lora'][name]
    assert type(box) is nn.LogicallyPartitioned
    assert tuple(box.names) == names
    assert box.rules == rules


def test_boxed_params_apply_matches_reference():
  layer = LoRADense(rank=2, alpha=4.0, wrapped=nn.Dense(
      6, kernel_init=_partitioned(('data', 'model'))))
  variables = layer.init(jax.random.key(0), _X)
  # Non-zero b, still boxed.
  variables = jax.tree.map(
      lambda x: x + 0.25, variables)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64),
                   nn.unbox(variables['params']))
  x = np.asarray(_X, np.float64)
  ref = (x @ p['kernel'] + p['bias']
         + 2.0 * x @ p['lora']['a'] @ p['lora']['b'])
  np.testing.assert_allclose(layer.apply(variables, _X), ref, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(layer.apply(nn.unbox(variables), _X), ref,
                             rtol=1e-5, atol=1e-5)


def test_factors_boxed_inside_nn_scan():
  class Block(nn.Module):

    @nn.compact
    def __call__(self, x, _):
      y = LoRADense(rank=2, wrapped=nn.Dense(
          4, kernel_init=_partitioned(('data', 'model'))))(x)
      return y, None

  stack = nn.scan(Block, variable_axes={'params': 0},
                  split_rngs={'params': True}, length=3,
                  metadata_params={nn.PARTITION_NAME: 'layers'})
  variables = stack().init(jax.random.key(0), _X, None)
  specs = _specs(variables)['Dense_0']
  assert specs['lora'] == {'a': ('layers', 'data', None),
                           'b': ('layers', None, 'model')}
  assert jax.tree.map(jnp.shape, nn.unbox(variables))['params']['Dense_0'][
      'lora'] == {'a': (3, 4, 2), 'b': (3, 2, 4)}


def test_adapter_kernel_sharding_argument():
  ad = LoRADenseAdapter(rank=2, features=6, kernel_sharding=('data', 'model'))
  variables = ad.init(jax.random.key(0), _X)
  assert _specs(variables) == {'a': ('data', None), 'b': (None, 'model')}
  ad = LoRAEinsumAdapter(rank=2, einsum_str='bi,imn->bmn', shape=(4, 2, 3),
                         kernel_sharding=(None, 'model', 'data'))
  assert _specs(ad.init(jax.random.key(0), _X)) == {
      'a': (None, None), 'b': (None, 'model', 'data')}
  ad = LoRADenseGeneralAdapter(rank=2, features=(2, 3),
                               kernel_sharding=('data', None, 'model'))
  assert _specs(ad.init(jax.random.key(0), _X)) == {
      'a': ('data', None), 'b': (None, None, 'model')}
  with pytest.raises(TypeError, match='kernel_sharding'):
    LoRADenseAdapter(rank=2, features=6, kernel_sharding='data').init(
        jax.random.key(0), _X)
  with pytest.raises(ValueError, match='sharding names|kernel_sharding'):
    LoRADenseAdapter(rank=2, features=6, kernel_sharding=('data',)).init(
        jax.random.key(0), _X)


def test_qlora_factors_named_after_float_kernel():
  from peft.linen.quantized import Int4Dense  # pylint: disable=g-import-not-at-top
  for method in ('int4', 'q4_0', 'q4_0_transpose'):
    layer = LoRADense(rank=2, wrapped=Int4Dense(method=method, wrapped=nn.Dense(
        64, kernel_init=_partitioned(('data', 'model')))))
    variables = layer.init(jax.random.key(0), jnp.ones((1, 64)))
    assert _specs(variables)['lora'] == {
        'a': ('data', None), 'b': (None, 'model')}, method


@pytest.mark.parametrize('method', ['int4', 'q4_0', 'q4_0_transpose'])
@pytest.mark.parametrize('order', ['int4_outer', 'lora_outer'])
def test_qlora_factor_names_under_nested_interceptors(method, order):
  from peft.linen.quantized import Int4Dense  # pylint: disable=g-import-not-at-top

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(64, kernel_init=_partitioned(('data', 'model')))(x)

  def quantize(module):
    if isinstance(module, nn.Dense):
      return Int4Dense(method=method, wrapped=module)
    return module

  def lora(module):
    if isinstance(module, nn.Dense):
      return LoRADense(rank=2, wrapped=module)
    return module

  fns = (quantize, lora) if order == 'int4_outer' else (lora, quantize)
  with ModuleInterceptor(fns[0]), ModuleInterceptor(fns[1]):
    variables = Model().init(jax.random.key(0), jnp.ones((1, 64)))
  assert _specs(variables)['Dense_0']['lora'] == {
      'a': ('data', None), 'b': (None, 'model')}


# ---------------------------------------------------------------------------
# Params of another rank / size: a ValueError naming the param.


@pytest.mark.parametrize('factor,shape', [('a', (4, 5)), ('b', (5, 3)),
                                          ('b', (2, 7))])
def test_apply_with_wrong_factor_shape_names_param(factor, shape):
  layer = LoRADense(rank=2, wrapped=nn.Dense(3))
  params = jax.tree.map(lambda x: x, layer.init(jax.random.key(0), _X)[
      'params'])
  expected = {'a': (4, 2), 'b': (2, 3)}[factor]
  params['lora'][factor] = jnp.ones(shape)
  message = (f'lora/{factor} has shape {shape}, but this layer with rank=2'
             f' expects {expected}')
  with pytest.raises(ValueError, match=re.escape(message)):
    layer.apply({'params': params}, _X)
  with pytest.raises(ValueError, match=re.escape(message)):
    layer.apply({'params': params}, _X, mutable=['params'])


def test_einsum_apply_with_other_rank_names_param():
  with ModuleInterceptor(_to_lora(rank=3)):
    variables = _Model().init(jax.random.key(0), _X)
  with pytest.raises(ValueError,
                     match=re.escape("Dense_0/lora/a has shape (4, 3)")):
    _apply(variables, rank=2)


# ---------------------------------------------------------------------------
# Output dtype follows the wrapped layer; alpha=0 is refused.

_BF16_LAYERS = {
    'dense': lambda: (LoRADense, nn.Dense(6, dtype=jnp.bfloat16)),
    'einsum': lambda: (LoRAEinsum, nn.Einsum(
        shape=(4, 2, 3), einsum_str='bi,imn->bmn', dtype=jnp.bfloat16)),
    'dense_general': lambda: (LoRADenseGeneral, nn.DenseGeneral(
        features=(2, 3), dtype=jnp.bfloat16)),
}


@pytest.mark.parametrize('name', sorted(_BF16_LAYERS))
@pytest.mark.parametrize('lora_dtype', [jnp.float32, jnp.bfloat16])
def test_output_dtype_is_the_wrapped_layers(name, lora_dtype):
  cls, layer = _BF16_LAYERS[name]()
  plain_y, plain_v = layer.init_with_output(jax.random.key(0), _X)
  assert plain_y.dtype == jnp.bfloat16
  wrapper = cls(rank=2, wrapped=layer, dtype=lora_dtype)
  params = wrapper.init(jax.random.key(0), _X)['params']
  lora = params['lora']
  lora = {'a': lora['a'], 'b': jnp.full(lora['b'].shape, 0.5, lora['b'].dtype)}
  y = wrapper.apply({'params': {**params, 'lora': lora}}, _X)
  assert y.dtype == plain_y.dtype
  # Reference: the wrapped layer's own output + the LoRA branch, by hand.
  base = np.asarray(layer.apply(plain_v, _X), np.float32)
  a = np.asarray(lora['a'], np.float32)
  b = np.asarray(lora['b'], np.float32)
  delta = np.einsum('bi,ir,r...->b...', np.asarray(_X), a, b)
  np.testing.assert_allclose(np.asarray(y, np.float32), base + delta,
                             rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize('alpha', [0, 0.0, -0.0])
def test_alpha_zero_is_refused_everywhere(alpha):
  makers = [
      lambda: LoRADense(rank=2, alpha=alpha, wrapped=nn.Dense(3)),
      lambda: LoRAEinsum(rank=2, alpha=alpha, wrapped=nn.Einsum(
          shape=(4, 3), einsum_str='bi,io->bo')),
      lambda: LoRADenseGeneral(rank=2, alpha=alpha,
                               wrapped=nn.DenseGeneral(3)),
      lambda: LoRADenseAdapter(rank=2, alpha=alpha, features=3),
      lambda: LoRAEinsumAdapter(rank=2, alpha=alpha, einsum_str='bi,io->bo',
                                shape=(4, 3)),
      lambda: LoRADenseGeneralAdapter(rank=2, alpha=alpha, features=3),
  ]
  for make in makers:
    with pytest.raises(ValueError, match=r'alpha=0 makes the LoRA scale'
                       r'[\s\S]*alpha=None'):
      make()


def test_alpha_nonzero_negative_and_none_accepted():
  for alpha in (None, -2.0, 1, np.float32(4.0)):
    layer = LoRADense(rank=2, alpha=alpha, wrapped=nn.Dense(3))
    params = layer.init(jax.random.key(0), _X)['params']
    params = {**params, 'lora': {'a': params['lora']['a'],
                                 'b': jnp.ones_like(params['lora']['b'])}}
    y = layer.apply({'params': params}, _X)
    scale = 1.0 if alpha is None else float(alpha) / 2
    ref = (np.asarray(_X) @ np.asarray(params['kernel']) + params['bias']
           + scale * np.asarray(_X) @ np.asarray(params['lora']['a'])
           @ np.asarray(params['lora']['b']))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)

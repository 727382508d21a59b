"""Tests of peft/linen/interceptor.py with dummy wrapper modules."""

import asyncio
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft.linen.interceptor import Interceptor, ModuleInterceptor


class _SharedScale(nn.Module):
  """Dummy wrapper sharing the wrapped scope: wrapped(x * extra)."""

  wrapped: nn.Module

  def __post_init__(self):
    super().__post_init__()
    if self.scope is not None:
      nn.share_scope(self, self.wrapped)

  @nn.compact
  def __call__(self, x):
    extra = self.param('extra', nn.initializers.constant(2.0), (x.shape[-1],))
    return self.wrapped(x * extra)


class _OwnScale(nn.Module):
  """Dummy wrapper with its own scope (no share_scope)."""

  wrapped: nn.Module

  @nn.compact
  def __call__(self, x):
    extra = self.param('extra', nn.initializers.constant(2.0), (x.shape[-1],))
    return self.wrapped(x * extra)


class _Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    d = nn.Dense(4)
    x = d(x)
    x = d(x)  # same instance called twice
    return nn.Dense(3)(x)


class _Block(nn.Module):
  """A setup-style module holding a Dense."""

  def setup(self):
    self.proj = nn.Dense(3)

  def __call__(self, x):
    return self.proj(x)


class _Outer(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _Block()(x)


def _replacer(wrapper_cls, seen):
  def fn(module):
    seen.append(type(module).__name__ + ':' + str(module.name))
    if isinstance(module, nn.Dense):
      return wrapper_cls(wrapped=module)
    return module
  return fn


def _shapes(tree):
  return jax.tree.map(jnp.shape, tree)


_X = jnp.arange(8, dtype=jnp.float32).reshape(2, 4) / 10


def test_shared_scope_wrapper_layout_and_replace_once():
  seen = []
  with ModuleInterceptor(_replacer(_SharedScale, seen)):
    params = _Model().init(jax.random.key(0), _X)['params']
  assert _shapes(params) == {
      'Dense_0': {'kernel': (4, 4), 'bias': (4,), 'extra': (4,)},
      'Dense_1': {'kernel': (4, 3), 'bias': (3,), 'extra': (4,)},
  }
  # _Model once, each Dense once although Dense_0 runs twice; the wrappers'
  # own calls to the Dense are not intercepted again.
  assert seen == ['_Model:None', 'Dense:Dense_0', 'Dense:Dense_1']


def test_own_scope_wrapper_nests_under_wrapped():
  seen = []
  with ModuleInterceptor(_replacer(_OwnScale, seen)):
    params = _Model().init(jax.random.key(0), _X)['params']
  assert _shapes(params) == {
      'Dense_0': {'kernel': (4, 4), 'bias': (4,), '_OwnScale_0': {'extra': (4,)}},
      'Dense_1': {'kernel': (4, 3), 'bias': (3,), '_OwnScale_0': {'extra': (4,)}},
  }


def test_outputs_match_reference():
  with ModuleInterceptor(_replacer(_SharedScale, [])):
    variables = _Model().init(jax.random.key(0), _X)
    variables = jax.tree.map(lambda p: p + 0.25, variables)
    y = _Model().apply(variables, _X)
  p = jax.tree.map(np.asarray, variables['params'])
  d0, d1 = p['Dense_0'], p['Dense_1']
  h = np.asarray(_X) * d0['extra'] @ d0['kernel'] + d0['bias']
  h = h * d0['extra'] @ d0['kernel'] + d0['bias']
  ref = h * d1['extra'] @ d1['kernel'] + d1['bias']
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)


def test_outside_context_no_replacement():
  with ModuleInterceptor(_replacer(_SharedScale, [])):
    pass
  params = _Model().init(jax.random.key(0), _X)['params']
  assert 'extra' not in params['Dense_0']


def test_setup_style_parent():
  with ModuleInterceptor(_replacer(_SharedScale, [])):
    params = _Outer().init(jax.random.key(0), _X)['params']
  assert _shapes(params) == {
      '_Block_0': {'proj': {'kernel': (4, 3), 'bias': (3,), 'extra': (4,)}}
  }


def test_same_instance_reentered_and_nested():
  mi = ModuleInterceptor(_replacer(_SharedScale, []))
  with mi:
    with mi:
      p1 = _Model().init(jax.random.key(0), _X)['params']
  with mi:
    p2 = _Model().init(jax.random.key(0), _X)['params']
  assert _shapes(p1) == _shapes(p2)
  with pytest.raises(RuntimeError, match='without a matching'):
    mi.__exit__(None, None, None)


def test_replacement_must_be_module():
  with pytest.raises(TypeError, match='replace_module_fn must return'):
    with ModuleInterceptor(lambda m: 3):
      _Model().init(jax.random.key(0), _X)


def test_replace_module_fn_must_be_callable():
  with pytest.raises(TypeError, match='replace_module_fn must be a callable'):
    ModuleInterceptor(3)


def _run_threads(fn, n):
  results, errors = [None] * n, []

  def work(i):
    try:
      results[i] = fn(i)
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)

  threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  return results


@pytest.mark.parametrize('shared_instance', [False, True])
def test_threads_match_sequential(shared_instance):
  class Wide(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
      d = nn.Dense(self.features)
      for _ in range(3):
        x = d(x)
        x = nn.Dense(self.features)(x)
      return x

  shared = ModuleInterceptor(_replacer(_SharedScale, []))

  def run(i):
    mi = shared if shared_instance else ModuleInterceptor(
        _replacer(_SharedScale, []))
    x = jnp.ones((2, 5 + i))
    with mi:
      variables = Wide(5 + i).init(jax.random.key(i), x)
      y = Wide(5 + i).apply(variables, x)
    return variables, y

  sequential = [run(i) for i in range(4)]
  threaded = _run_threads(run, 4)
  for (v_s, y_s), (v_t, y_t) in zip(sequential, threaded):
    assert jax.tree.structure(v_s) == jax.tree.structure(v_t)
    jax.tree.map(np.testing.assert_array_equal, v_s, v_t)
    np.testing.assert_array_equal(y_s, y_t)


def test_asyncio_tasks():
  mi = ModuleInterceptor(_replacer(_SharedScale, []))

  async def run(i):
    await asyncio.sleep(0)
    with mi:
      await asyncio.sleep(0)
      return _Model().init(jax.random.key(i), _X)['params']

  async def main():
    return await asyncio.gather(*(run(i) for i in range(3)))

  for params in asyncio.run(main()):
    assert 'extra' in params['Dense_0']


def test_interceptor_base_class():
  class Names(Interceptor):

    def __init__(self):
      self.names = []

    def interceptor(self, next_fun, args, kwargs, context):
      self.names.append(context.module.name)
      return next_fun(*args, **kwargs)

  names = Names()
  with names:
    _Model().init(jax.random.key(0), _X)
  assert names.names == [None, 'Dense_0', 'Dense_0', 'Dense_1']
  with pytest.raises(TypeError):
    Interceptor()  # abstract


def test_root_module_cannot_be_replaced():
  with pytest.raises(ValueError, match='root module'):
    with ModuleInterceptor(_replacer(_SharedScale, [])):
      nn.Dense(3).init(jax.random.key(0), _X)


# ---------------------------------------------------------------------------
# Nested interceptors: a quantized base with LoRA on top, in either order.

import gc  # pylint: disable=g-import-not-at-top,wrong-import-position
import weakref  # pylint: disable=g-import-not-at-top,wrong-import-position

import peft  # pylint: disable=g-import-not-at-top,wrong-import-position

_XQ = jax.random.normal(jax.random.key(7), (3, 32))


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(32)(x))  # Dense_0
    return nn.Dense(32)(h)  # Dense_1


def _lora_fn(rank=2, alpha=None):
  def fn(module):
    if isinstance(module, nn.Dense):
      return peft.LoRADense(rank=rank, alpha=alpha, wrapped=module)
    return module
  return fn


def _quant_fn(method='int4', cls=None):
  def fn(module):
    if isinstance(module, nn.Dense):
      return (cls or peft.SimulateQuantizedDense)(wrapped=module,
                                                  method=method)
    return module
  return fn


def _random_lora(params, seed=3):
  """Every `a`/`b` replaced by random values (so `b` is non-zero)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, l.shape, l.dtype) * 0.3
      for k, l in zip(keys, leaves)
  ])


def _mlp_reference(params, x, method, scale=1.0):
  """Dense reference: fake-quantized kernels + scale * x @ a @ b, by hand."""
  h = np.asarray(x, np.float64)
  for i, name in enumerate(['Dense_0', 'Dense_1']):
    p = jax.tree.map(np.asarray, params[name])
    kernel = np.asarray(peft.simulate_quantize(jnp.asarray(p['kernel']),
                                               method), np.float64)
    h = (h @ kernel + p['bias']
         + scale * (h @ p['lora']['a'].astype(np.float64))
         @ p['lora']['b'].astype(np.float64))
    if i == 0:
      h = np.tanh(h)
  return h


@pytest.mark.parametrize('order', ['quantize_outer', 'lora_outer'])
@pytest.mark.parametrize('method', ['int4', 'int8'])
def test_nested_quantize_and_lora_compose(order, method):
  fns = [_quant_fn(method), _lora_fn(rank=3, alpha=6.0)]
  if order == 'lora_outer':
    fns = fns[::-1]
  with ModuleInterceptor(fns[0]), ModuleInterceptor(fns[1]):
    params = _Mlp().init(jax.random.key(0), _XQ)['params']
  assert _shapes(params) == {
      name: {'kernel': (32, 32), 'bias': (32,),
             'lora': {'a': (32, 3), 'b': (3, 32)}}
      for name in ('Dense_0', 'Dense_1')
  }
  original, lora = peft.split_params(params)
  lora = _random_lora(lora)
  params = peft.merge_params(original, lora)
  with ModuleInterceptor(fns[0]), ModuleInterceptor(fns[1]):
    y = _Mlp().apply({'params': params}, _XQ)
    y_jit = jax.jit(lambda p: _Mlp().apply({'params': p}, _XQ))(params)
  ref = _mlp_reference(params, _XQ, method, scale=6.0 / 3)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(y_jit), ref, rtol=2e-5, atol=2e-5)
  # Quantization really is applied: the float model differs.
  with ModuleInterceptor(fns[0] if order == 'lora_outer' else fns[1]):
    y_float = _Mlp().apply({'params': params}, _XQ)
  assert np.abs(np.asarray(y_float) - ref).max() > 1e-3


def test_nested_orders_give_the_same_params_and_outputs():
  q, l = _quant_fn('int4'), _lora_fn(rank=2)
  with ModuleInterceptor(q), ModuleInterceptor(l):
    p1 = _Mlp().init(jax.random.key(0), _XQ)['params']
  with ModuleInterceptor(l), ModuleInterceptor(q):
    p2 = _Mlp().init(jax.random.key(0), _XQ)['params']
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  params = peft.merge_params(peft.split_params(p1)[0],
                             _random_lora(peft.split_params(p1)[1]))
  with ModuleInterceptor(q), ModuleInterceptor(l):
    y1 = _Mlp().apply({'params': params}, _XQ)
  with ModuleInterceptor(l), ModuleInterceptor(q):
    y2 = _Mlp().apply({'params': params}, _XQ)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-6,
                             atol=1e-6)


def test_nested_quantize_outer_lora_gradients_reach_lora_params():
  q, l = _quant_fn('int4'), _lora_fn(rank=2)
  with ModuleInterceptor(q), ModuleInterceptor(l):
    params = _Mlp().init(jax.random.key(0), _XQ)['params']
    original, lora = peft.split_params(params)
    lora = _random_lora(lora)

    def loss(lora):
      y = _Mlp().apply({'params': peft.merge_params(original, lora)}, _XQ)
      return jnp.sum(y ** 2)

    grads = jax.grad(loss)(lora)

  def loss_ref(lora):
    return np.sum(_mlp_reference(peft.merge_params(original, lora), _XQ,
                                 'int4') ** 2)

  # Finite difference of the hand-written reference on one entry of `b`.
  eps = 1e-3
  bumped = jax.tree.map(lambda v: v, lora)
  bumped['Dense_1']['lora']['b'] = lora['Dense_1']['lora']['b'].at[1, 5].add(
      eps)
  fd = (loss_ref(bumped) - loss_ref(lora)) / eps
  np.testing.assert_allclose(float(grads['Dense_1']['lora']['b'][1, 5]), fd,
                             rtol=2e-2, atol=2e-2)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_nested_int4_outer_lora_inner_reads_quantized_checkpoint():
  with ModuleInterceptor(_lora_fn(rank=2)):
    params = _Mlp().init(jax.random.key(0), _XQ)['params']
  original, lora = peft.split_params(params)
  lora = _random_lora(lora)
  quantized = peft.quantize_checkpoint(original, method='int8')
  fns = [_quant_fn('int8', peft.Int4Dense), _lora_fn(rank=2)]
  for order in (fns, fns[::-1]):
    with ModuleInterceptor(order[0]), ModuleInterceptor(order[1]):
      y = _Mlp().apply({'params': peft.merge_params(quantized, lora)}, _XQ)
    ref = _mlp_reference(peft.merge_params(original, lora), _XQ, 'int8')
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_explicit_quantization_wrapper_gets_lora_from_interceptor():
  class Quantized(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = peft.SimulateQuantizedDense(wrapped=nn.Dense(32), method='int4')(x)
      return peft.SimulateQuantizedDense(  # (tanh inside, as in _Mlp)
          wrapped=nn.Dense(32), method='int4')(jnp.tanh(h))

  with ModuleInterceptor(_lora_fn(rank=2)):
    params = Quantized().init(jax.random.key(0), _XQ)['params']
    assert _shapes(params)['Dense_0']['lora'] == {'a': (32, 2), 'b': (2, 32)}
    params = peft.merge_params(peft.split_params(params)[0],
                               _random_lora(peft.split_params(params)[1]))
    y = Quantized().apply({'params': params}, _XQ)
  np.testing.assert_allclose(np.asarray(y),
                             _mlp_reference(params, _XQ, 'int4'),
                             rtol=2e-5, atol=2e-5)


def test_nested_lora_interceptors_clear_error():
  with pytest.raises(ValueError, match=r"already has a LoRA adapter \('lora'\)"
                     r'[\s\S]*return the module unchanged'):
    with ModuleInterceptor(_lora_fn()), ModuleInterceptor(_lora_fn()):
      _Mlp().init(jax.random.key(0), _XQ)


@pytest.mark.parametrize('inner_cls', ['SimulateQuantizedDense',
                                       'Int4Dense'])
def test_nested_quantization_interceptors_clear_error(inner_cls):
  inner = _quant_fn('int8', getattr(peft, inner_cls))
  with pytest.raises(ValueError, match=r'quantized twice[\s\S]*return the'
                     ' module unchanged'):
    with ModuleInterceptor(_quant_fn('int4')), ModuleInterceptor(inner):
      _Mlp().init(jax.random.key(0), _XQ)


def test_remat_dense_inside_interceptor():
  class Remat(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.remat(nn.Dense)(32)(x))
      return nn.remat(nn.Dense)(32)(h)

  with ModuleInterceptor(_lora_fn(rank=2)):
    params = Remat().init(jax.random.key(0), _XQ)['params']
  assert _shapes(params) == {
      name: {'kernel': (32, 32), 'bias': (32,),
             'lora': {'a': (32, 2), 'b': (2, 32)}}
      for name in ('CheckpointDense_0', 'CheckpointDense_1')
  }
  params = peft.merge_params(peft.split_params(params)[0],
                             _random_lora(peft.split_params(params)[1]))
  with ModuleInterceptor(_lora_fn(rank=2)):
    y, grads = jax.value_and_grad(
        lambda p: jnp.sum(Remat().apply({'params': p}, _XQ)))(params)
  renamed = {'Dense_0': params['CheckpointDense_0'],
             'Dense_1': params['CheckpointDense_1']}
  h = np.asarray(_XQ, np.float64)
  for i, name in enumerate(['Dense_0', 'Dense_1']):
    p = jax.tree.map(np.asarray, renamed[name])
    h = h @ p['kernel'] + p['bias'] + h @ p['lora']['a'] @ p['lora']['b']
    if i == 0:
      h = np.tanh(h)
  np.testing.assert_allclose(float(y), h.sum(), rtol=1e-5)
  assert float(jnp.abs(grads['CheckpointDense_0']['lora']['a']).max()) > 0


# ---------------------------------------------------------------------------
# Bounded memory in long-running blocks.


def test_cache_is_bounded_over_many_applies():
  replaced = []

  def fn(module):
    if isinstance(module, nn.Dense):
      wrapper = _SharedScale(wrapped=module)
      replaced.append((weakref.ref(module), weakref.ref(wrapper)))
      return wrapper
    return module

  mi = ModuleInterceptor(fn)
  sizes_inside = []

  class Probe(nn.Module):
    """_Model plus a probe of the interceptor's cache after its layers."""

    @nn.compact
    def __call__(self, x):
      y = _Model()(x)
      sizes_inside.append(mi._cache_size())  # pylint: disable=protected-access
      return y

  with mi:
    variables = Probe().init(jax.random.key(0), _X)
    n_init = len(replaced)
    for _ in range(200):
      Probe().apply(variables, _X)
      assert mi._cache_size() == 0  # pylint: disable=protected-access
    gc.collect()
    alive = sum(m() is not None or w() is not None for m, w in replaced)
  # Two Dense per call (Dense_0 is called twice but wrapped once).
  assert n_init == 2 and len(replaced) == 2 * 201
  # During a call: Probe, _Model, Dense_0, Dense_1 and the two wrappers'
  # own entries at most; never growing with the number of calls.
  assert max(sizes_inside) <= 6 and sizes_inside[-1] == sizes_inside[1]
  assert alive == 0, f'{alive} replaced modules still alive after 201 calls'


def test_nested_compose_inside_nn_scan_and_setup():
  class Body(nn.Module):

    def setup(self):
      self.proj = nn.Dense(32)

    def __call__(self, c, _):
      return jnp.tanh(self.proj(c)), None

  class Scanned(nn.Module):

    @nn.compact
    def __call__(self, x):
      y, _ = nn.scan(Body, variable_axes={'params': 0},
                     split_rngs={'params': True}, length=3)()(x, None)
      return y

  q, l = _quant_fn('int4'), _lora_fn(rank=2)
  with ModuleInterceptor(q), ModuleInterceptor(l):
    params = Scanned().init(jax.random.key(0), _XQ)['params']
  assert _shapes(params) == {'ScanBody_0': {'proj': {
      'kernel': (3, 32, 32), 'bias': (3, 32),
      'lora': {'a': (3, 32, 2), 'b': (3, 2, 32)}}}}
  original, lora = peft.split_params(params)
  params = peft.merge_params(original, _random_lora(lora))
  outputs = []
  for fns in ((q, l), (l, q)):
    with ModuleInterceptor(fns[0]), ModuleInterceptor(fns[1]):
      outputs.append(np.asarray(Scanned().apply({'params': params}, _XQ)))
  p = jax.tree.map(np.asarray, params['ScanBody_0']['proj'])
  h = np.asarray(_XQ, np.float64)
  for i in range(3):
    kernel = np.asarray(peft.simulate_quantize(jnp.asarray(p['kernel'][i]),
                                               'int4'), np.float64)
    h = np.tanh(h @ kernel + p['bias'][i]
                + h @ p['lora']['a'][i] @ p['lora']['b'][i])
  for y in outputs:
    np.testing.assert_allclose(y, h, rtol=5e-5, atol=5e-5)

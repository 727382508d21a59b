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

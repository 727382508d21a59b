"""Every code block of the original document (peft-README.md) runs.

The eight ```python blocks are copied verbatim below (`_BLOCKS`); when the
document is reachable (`../shared/seed/peft-README.md` next to the repo, or
`$PEFT_SEED_README`), the copy is checked against it. Each test runs one block
in a namespace holding the minimal fill-ins (imports, a model, an input,
params) and checks what it produced. Where the document cannot run as
written, the test shows the failure and runs the corrected form:

* block 1: `peft.LoRADenseAdapter(rank=3)` has no output size; the corrected
  form is `peft.LoRADenseAdapter(rank=3, features=10)`.
* blocks 3, 4: Q4_0 puts blocks of 32 along the kernel's last axis, so
  `nn.Dense(10)` cannot be stored as Q4_0 (clear ValueError); the corrected
  form uses `nn.Dense(32)`.
* block 6: the `with ModuleInterceptor(_apply_q4_0)` line names a function
  the block calls `_apply_q4_0_to_dense`; the corrected form names the latter.
"""

import os
import pathlib
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft as _peft_top
from peft import linen as _peft_linen
from peft import params as _peft_params
from peft import quantization as _peft_quantization

_NAMES = (
    list(_peft_linen.__all__)
    + ['split_params', 'merge_params', 'fuse_params', 'unfuse_params']
    + ['QuantizationMethod', 'simulate_quantize']
)


def _peft_namespace():
  """`import peft` once the top level re-exports everything, else the parts."""
  if all(hasattr(_peft_top, n) for n in _NAMES):
    return _peft_top
  ns = {n: getattr(_peft_linen, n) for n in _peft_linen.__all__}
  ns.update({n: getattr(_peft_params, n) for n in _NAMES[-6:-2]})
  ns['QuantizationMethod'] = _peft_quantization.QuantizationMethod
  ns['simulate_quantize'] = _peft_quantization.simulate_quantize
  return types.SimpleNamespace(**ns)


peft = _peft_namespace()

_BLOCKS = [
    # block 0
    '''\
class MyModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    layer = peft.LoRADense(
        rank=3,
        wrapped=nn.Dense(10),
    )
    return layer(x)
''',
    # block 1
    '''\
class MyModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(10)
    lora = peft.LoRADenseAdapter(rank=3)  # Only do `x @ A @ B`
    return dense(x) + lora(x)
''',
    # block 2
    '''\
params_q = peft.quantize_checkpoint(
  params, method=peft.QuantizationMethod.INT4
)
''',
    # block 3
    '''\
class MyModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    layer = peft.Int4Dense(
        wrapped=nn.Dense(10),
        method=peft.QuantizationMethod.Q4_0
    )
    return layer(x)
''',
    # block 4
    '''\
class MyModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    layer = peft.SimulateQuantizedDense(
        wrapped=nn.Dense(10),
        method=peft.QuantizationMethod.Q4_0
    )
    return layer(x)
''',
    # block 5
    '''\
def _replace_dense_by_lora(module: nn.Module) -> nn.Module:
  if isinstance(module, nn.Dense):
    return peft.LoRADense(rank=3, wrapped=module)
  else:
    return module

# Within the context, the dense layers are replaced by their LoRA version.
with ModuleInterceptor(_replace_dense_by_lora):
  y = model(x)
''',
    # block 6
    '''\
def _apply_q4_0_to_dense(module: nn.Module) -> nn.Module:
  if isinstance(module, nn.Dense):
    if 'gating' in module.name.lower():
      return peft.SimulateQuantizedDense(
          wrapped=module,
          method=peft.QuantizationMethod.Q4_0_TRANSPOSE,
      )
    else:
      return peft.SimulateQuantizedDense(
          wrapped=module,
          method=peft.QuantizationMethod.Q4_0,
      )
  else:
    return module

# Within the context, the dense layers are replaced by their LoRA version.
with ModuleInterceptor(_apply_q4_0):
  y = model(x)
''',
    # block 7
    '''\
params = {
    'dense': {
        'kernel': 0,
        'bias': 1,
        'lora': {
            'a': 0,
            'b': 1,
        },
    },
    'other': 0,
}

original, lora = peft.split_params(params)
assert original == {
    'dense': {
        'kernel': 0,
        'bias': 1,
    },
    'other': 0,
}
assert lora == {
    'dense': {
        'lora': {
            'a': 0,
            'b': 1,
        },
    },
}
'''
]


def _seed_path():
  env = os.environ.get('PEFT_SEED_README')
  if env:
    return pathlib.Path(env)
  root = pathlib.Path(__file__).resolve().parents[1]
  for candidate in (root.parent / 'shared' / 'seed' / 'peft-README.md',
                    root / 'docs' / 'peft-README.md'):
    if candidate.exists():
      return candidate
  return None


def test_blocks_are_the_documents():
  path = _seed_path()
  if path is None:
    pytest.skip('the original document is not reachable from here')
  text = path.read_text()
  blocks = re.findall(r'^```python\n(.*?)^```', text, re.M | re.S)
  assert blocks == _BLOCKS


def _run(i, **fill_ins):
  namespace = {'nn': nn, 'jax': jax, 'jnp': jnp, 'peft': peft, **fill_ins}
  exec(compile(_BLOCKS[i], f'peft-README.md[block {i}]', 'exec'), namespace)
  return namespace


_X = jnp.ones((2, 64))
_KEY = jax.random.key(0)


def _shapes(tree):
  return jax.tree.map(jnp.shape, tree)


def test_block0_lora_dense():
  ns = _run(0)
  variables = ns['MyModel']().init(_KEY, _X)
  assert _shapes(variables) == {'params': {'Dense_0': {
      'kernel': (64, 10), 'bias': (10,), 'lora': {'a': (64, 3), 'b': (3, 10)},
  }}}
  assert ns['MyModel']().apply(variables, _X).shape == (2, 10)


def test_block1_lora_dense_adapter_needs_features():
  ns = _run(1)
  with pytest.raises(TypeError, match='features'):
    ns['MyModel']().init(_KEY, _X)  # as written: no output size
  corrected = _BLOCKS[1].replace('peft.LoRADenseAdapter(rank=3)',
                                 'peft.LoRADenseAdapter(rank=3, features=10)')
  ns = {'nn': nn, 'peft': peft}
  exec(compile(corrected, 'peft-README.md[block 1, corrected]', 'exec'), ns)
  variables = ns['MyModel']().init(_KEY, _X)
  assert _shapes(variables['params']) == {
      'Dense_0': {'kernel': (64, 10), 'bias': (10,)},
      'LoRADenseAdapter_0': {'a': (64, 3), 'b': (3, 10)},
  }
  # b starts at zero: the sum equals the Dense alone.
  dense = variables['params']['Dense_0']
  np.testing.assert_allclose(
      ns['MyModel']().apply(variables, _X),
      _X @ dense['kernel'] + dense['bias'], rtol=1e-6)


def test_block2_quantize_checkpoint():
  params = nn.Dense(32).init(_KEY, _X)['params']
  ns = _run(2, params=params)
  q = ns['params_q']
  assert q['kernel'].dtype == jnp.int4 and q['kernel'].shape == (64, 32)
  assert q['scale'].shape == (1, 32)
  np.testing.assert_array_equal(q['bias'], params['bias'])


@pytest.mark.parametrize('block', [3, 4])
def test_blocks3_4_q4_0_dense(block):
  ns = _run(block)
  with pytest.raises(ValueError, match='32'):
    ns['MyModel']().init(_KEY, _X)  # as written: Dense(10), 10 % 32 != 0
  corrected = _BLOCKS[block].replace('nn.Dense(10)', 'nn.Dense(32)')
  ns = {'nn': nn, 'peft': peft}
  exec(compile(corrected, f'peft-README.md[block {block}, corrected]',
               'exec'), ns)
  variables = ns['MyModel']().init(_KEY, _X)
  y = ns['MyModel']().apply(variables, _X)
  assert y.shape == (2, 32)
  if block == 3:  # Int4Dense: init gives the Q4_0 storage
    assert variables['params']['Dense_0']['kernel'].dtype == jnp.uint8
  else:  # SimulateQuantizedDense: the plain Dense params
    p = variables['params']['Dense_0']
    w = peft.simulate_quantize(p['kernel'], peft.QuantizationMethod.Q4_0)
    np.testing.assert_allclose(y, _X @ w + p['bias'], rtol=1e-5, atol=1e-5)


class _Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name='gating')(x))
    return nn.Dense(32)(x)


def _lazy_model():
  """Fill-in `model`: a bound linen model that creates its params when called."""
  return _Model().bind({}, rngs={'params': _KEY}, mutable=True)


def test_block5_module_interceptor_lora():
  model = _lazy_model()
  ns = _run(5, ModuleInterceptor=peft.ModuleInterceptor, model=model, x=_X)
  assert ns['y'].shape == (2, 32)
  params = model.variables['params']
  assert _shapes(params) == {
      'gating': {'kernel': (64, 32), 'bias': (32,),
                 'lora': {'a': (64, 3), 'b': (3, 32)}},
      'Dense_0': {'kernel': (32, 32), 'bias': (32,),
                  'lora': {'a': (32, 3), 'b': (3, 32)}},
  }


def test_block6_q4_0_surgery():
  with pytest.raises(NameError, match='_apply_q4_0'):
    _run(6, ModuleInterceptor=peft.ModuleInterceptor, model=_lazy_model(),
         x=_X)
  corrected = _BLOCKS[6].replace('ModuleInterceptor(_apply_q4_0)',
                                 'ModuleInterceptor(_apply_q4_0_to_dense)')
  model = _lazy_model()
  ns = {'nn': nn, 'peft': peft, 'ModuleInterceptor': peft.ModuleInterceptor,
        'model': model, 'x': _X}
  exec(compile(corrected, 'peft-README.md[block 6, corrected]', 'exec'), ns)
  p = model.variables['params']
  assert _shapes(p) == {
      'gating': {'kernel': (64, 32), 'bias': (32,)},
      'Dense_0': {'kernel': (32, 32), 'bias': (32,)},
  }
  # Reference: Q4_0_TRANSPOSE for the gating layer, Q4_0 for the other.
  m = peft.QuantizationMethod
  h = jax.nn.relu(
      _X @ peft.simulate_quantize(p['gating']['kernel'], m.Q4_0_TRANSPOSE)
      + p['gating']['bias'])
  ref = h @ peft.simulate_quantize(p['Dense_0']['kernel'], m.Q4_0) + p[
      'Dense_0']['bias']
  np.testing.assert_allclose(ns['y'], ref, rtol=1e-5, atol=1e-5)


def test_block7_split_params_exact():
  ns = _run(7)  # the block's own asserts check both trees exactly
  assert ns['original'] == {'dense': {'kernel': 0, 'bias': 1}, 'other': 0}
  assert ns['lora'] == {'dense': {'lora': {'a': 0, 'b': 1}}}
  assert peft.merge_params(ns['original'], ns['lora']) == ns['params']

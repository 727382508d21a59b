"""Hardening of the linen layer (`peft.linen`): bad input and the private-API seam.

* A table of bad inputs over `peft.linen` in the `Bad` style of
  tests/test_hardening.py: each raises a `ValueError`/`TypeError` whose
  message names the offending argument (and what to do).
* The private-API seam: no name with a leading underscore is taken from
  flax or jax anywhere in `peft/linen/` (an AST walk); such names live only
  in `peft/_compat.py`.
"""

from __future__ import annotations

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import peft
from peft import linen as pl
from _bad import Bad
from _bad import check_bad

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_X = jnp.ones((2, 32), jnp.float32)


def _init(module, x=_X):
  return module.init(jax.random.key(0), x)


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(32)(jnp.tanh(nn.Dense(32)(x)))


def _fn(make):
  def fn(module):
    return make(module) if isinstance(module, nn.Dense) else module
  return fn


def _nested(outer, inner):
  def run():
    with pl.ModuleInterceptor(_fn(outer)), pl.ModuleInterceptor(_fn(inner)):
      _init(_Mlp())
  return run


def _lora(m):
  return pl.LoRADense(rank=2, wrapped=m)


def _sq(method):
  return lambda m: pl.SimulateQuantizedDense(wrapped=m, method=method)


_EINSUM = dict(einsum_str='bi,io->bo', shape=(32, 3))
_ALPHA_MAKERS = {
    'dense': lambda **kw: pl.LoRADense(rank=2, wrapped=nn.Dense(3), **kw),
    'einsum': lambda **kw: pl.LoRAEinsum(
        rank=2, wrapped=nn.Einsum(**_EINSUM), **kw),
    'dense_general': lambda **kw: pl.LoRADenseGeneral(
        rank=2, wrapped=nn.DenseGeneral(3), **kw),
    'dense_adapter': lambda **kw: pl.LoRADenseAdapter(
        rank=2, features=3, **kw),
    'einsum_adapter': lambda **kw: pl.LoRAEinsumAdapter(
        rank=2, **_EINSUM, **kw),
    'dense_general_adapter': lambda **kw: pl.LoRADenseGeneralAdapter(
        rank=2, features=3, **kw),
}

_BAD = [
    *(Bad(f'linen/{name}_alpha_zero', lambda make=make: make(alpha=0.0),
          ('alpha=0', 'alpha=None'), (ValueError,))
      for name, make in _ALPHA_MAKERS.items()),
    Bad('linen/dense_alpha_nan', lambda: _ALPHA_MAKERS['dense'](
        alpha=float('nan')), ('alpha', 'finite'), (ValueError,)),
    Bad('linen/dense_alpha_inf', lambda: _ALPHA_MAKERS['dense'](
        alpha=float('inf')), ('alpha', 'finite'), (ValueError,)),
    Bad('linen/dense_alpha_string', lambda: _ALPHA_MAKERS['dense'](
        alpha='16'), ('alpha', 'real number'), (TypeError,)),
    Bad('linen/dense_adapter_alpha_bool',
        lambda: _ALPHA_MAKERS['dense_adapter'](alpha=True),
        ('alpha', 'real number'), (TypeError,)),
    Bad('linen/einsum_adapter_rank_zero_at_construction',
        lambda: pl.LoRAEinsumAdapter(rank=0, **_EINSUM),
        ('rank', 'positive'), (ValueError,)),
    Bad('linen/nested_lora_interceptors', _nested(_lora, _lora),
        ("'lora'", 'twice', 'replace_module_fn'), (ValueError,)),
    Bad('linen/nested_same_quantization_interceptors',
        _nested(_sq('int4'), _sq('int8')),
        ('quantized twice', 'SimulateQuantizedDense', 'replace_module_fn'),
        (ValueError,)),
    Bad('linen/nested_simulated_and_int4_interceptors',
        _nested(_sq('int4'),
                lambda m: pl.Int4Dense(wrapped=m, method='int8')),
        ('quantized twice', 'Int4Dense', "'int8'"), (ValueError,)),
    Bad('linen/lora_over_lora_direct',
        lambda: pl.LoRADense(rank=2, wrapped=pl.LoRADense(
            rank=2, wrapped=nn.Dense(3))),
        ('wrapped', 'nn.Dense'), (TypeError,)),
    Bad('linen/interceptor_returns_non_module',
        lambda: _nested(lambda m: m, lambda m: 'x')(),
        ('replace_module_fn', 'str'), (TypeError,)),
    Bad('linen/interceptor_replaces_root',
        lambda: _run_in(pl.ModuleInterceptor(_fn(_lora)),
                        lambda: _init(nn.Dense(3))),
        ('root module', 'Dense'), (ValueError,)),
]


def _run_in(context, fn):
  with context:
    return fn()


def test_bad_table_ids_are_unique():
  ids = [c.id for c in _BAD]
  assert len(ids) == len(set(ids))


@pytest.mark.parametrize('case', [pytest.param(c, id=c.id) for c in _BAD])
def test_bad_input_raises_clear_error(case):
  check_bad(case)


def test_good_neighbours_of_the_bad_rows_run():
  """The valid calls next to the bad rows work (the table is not vacuous)."""
  for make in _ALPHA_MAKERS.values():
    _init(make(alpha=-1.0), jnp.ones((2, 32)))
  with pl.ModuleInterceptor(_fn(_sq('int4'))), \
      pl.ModuleInterceptor(_fn(_lora)):
    params = _init(_Mlp())['params']
  assert sorted(params['Dense_0']) == ['bias', 'kernel', 'lora']


# ---------------------------------------------------------------------------
# The private-API seam.

_FRAMEWORKS = ('flax', 'jax', 'jaxlib')


def _private_uses(path: pathlib.Path) -> list[str]:
  """`file:line name` for each private flax/jax name used in `path`.

  Tracked: names bound by `import flax...` / `from flax... import ...` (and
  jax); a private name is an attribute, imported name or module part with a
  leading underscore (dunders aside) reached from one of them, or a string
  constant `'_x'` given to `getattr`/`hasattr`/`setattr` on one of them.
  Any other `obj._x` is flagged too unless `obj` is `self`/`cls`, comes from
  a peft import, or `_x` is one of peft's own `_peft_*` hooks.
  """
  tree = ast.parse(path.read_text(), filename=str(path))
  aliases: set[str] = set()
  found = []
  rel = path.relative_to(_ROOT)

  def private(name: str) -> bool:
    return name.startswith('_') and not (
        name.startswith('__') and name.endswith('__'))

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split('.')[0] in _FRAMEWORKS:
          aliases.add((alias.asname or alias.name).split('.')[0])
          if any(private(p) for p in alias.name.split('.')):
            found.append(f'{rel}:{node.lineno} import {alias.name}')
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.split('.')[0] in _FRAMEWORKS:
        if any(private(p) for p in node.module.split('.')):
          found.append(f'{rel}:{node.lineno} from {node.module}')
        for alias in node.names:
          aliases.add(alias.asname or alias.name)
          if private(alias.name):
            found.append(f'{rel}:{node.lineno} {node.module}.{alias.name}')

  peft_aliases = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.split('.')[0] == 'peft'):
      peft_aliases.update(a.asname or a.name for a in node.names)
    elif isinstance(node, ast.Import):
      peft_aliases.update((a.asname or a.name).split('.')[0]
                          for a in node.names
                          if a.name.split('.')[0] == 'peft')

  def rooted_in_peft(node) -> bool:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
      node = node.func if isinstance(node, ast.Call) else node.value
    return isinstance(node, ast.Name) and node.id in peft_aliases

  def rooted(node) -> bool:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
      node = node.func if isinstance(node, ast.Call) else node.value
    return isinstance(node, ast.Name) and node.id in aliases

  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and private(node.attr) and rooted(
        node.value):
      found.append(f'{rel}:{node.lineno} .{node.attr}')
    elif (isinstance(node, ast.Attribute) and private(node.attr)
          and not node.attr.startswith('_peft')
          and not (isinstance(node.value, ast.Name)
                   and node.value.id in ('self', 'cls'))
          and not rooted_in_peft(node.value)):
      # `obj._x` on any other object (e.g. a flax module or stack held in a
      # local variable): private unless it is one of our `_peft_*` hooks.
      found.append(f'{rel}:{node.lineno} .{node.attr}')
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in ('getattr', 'hasattr', 'setattr')
        and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and private(node.args[1].value) and rooted(node.args[0])):
      found.append(f'{rel}:{node.lineno} {node.args[1].value!r}')
  return found


def test_private_name_detector_finds_known_patterns(tmp_path):
  (tmp_path / 'peft').mkdir()
  sample = tmp_path / 'peft' / 'sample.py'
  sample.write_text(
      'import flax.linen as nn\n'
      'from flax.nnx import bridge\n'
      'from jax._src import core\n'
      'x = nn.module._global_interceptor_stack\n'
      'y = getattr(nn.module, "_global_interceptor_stack")\n'
      'def f(m, stack):\n'
      '  return m._peft_hook_of_ours, stack._storage\n'
      'z = nn.Dense(3)._get_bias_shape\n'
  )
  global _ROOT  # pylint: disable=global-statement
  root, _ROOT = _ROOT, tmp_path
  try:
    found = _private_uses(sample)
  finally:
    _ROOT = root
  names = ' '.join(found)
  for expected in ('jax._src', '._global_interceptor_stack',
                   "'_global_interceptor_stack'", '._get_bias_shape'):
    assert expected in names, (expected, found)
  assert '._storage' in names  # on a local variable
  assert '_peft_hook_of_ours' not in names  # our own hooks
  assert len(found) == 5, found


def _private_overrides(module) -> list[str]:
  """`Class.method` for each private method of a flax/jax class overridden in
  `module` (overriding one is using private API too)."""
  found = []
  for cls in vars(module).values():
    if not isinstance(cls, type) or cls.__module__ != module.__name__:
      continue
    for name, value in vars(cls).items():
      if not name.startswith('_') or name.startswith('__'):
        continue
      func = getattr(value, '__func__', value)
      if not (callable(func) and getattr(func, '__qualname__', '').startswith(
          cls.__qualname__ + '.')):
        continue  # not a method written in this class (e.g. linen's state)
      for base in cls.__mro__[1:]:
        if (base.__module__.split('.')[0] in _FRAMEWORKS
            and name in vars(base)):
          found.append(f'{module.__name__}.{cls.__name__}.{name}'
                       f' (of {base.__module__}.{base.__name__})')
  return found


def test_private_override_detector_finds_known_patterns():
  import types  # pylint: disable=g-import-not-at-top
  from flax.nnx import bridge  # pylint: disable=g-import-not-at-top
  sample = types.ModuleType('sample')

  class Bridge(bridge.ToLinen):

    def _update_variables(self, module):  # the flax private method
      del module

    def _ours(self):  # a private helper of our own
      pass

  Bridge.__module__ = 'sample'
  sample.Bridge = Bridge
  found = _private_overrides(sample)
  assert len(found) == 1 and 'Bridge._update_variables' in found[0], found


def test_no_private_flax_or_jax_names_in_peft_linen():
  import importlib  # pylint: disable=g-import-not-at-top
  files = sorted((_ROOT / 'peft' / 'linen').rglob('*.py'))
  assert files
  found = [use for path in files for use in _private_uses(path)]
  for path in files:
    name = '.'.join(path.relative_to(_ROOT).with_suffix('').parts)
    found += _private_overrides(importlib.import_module(
        name.removesuffix('.__init__')))
  assert not found, (
      'private flax/jax names outside peft/_compat.py (wrap them there): '
      + ', '.join(found))


def test_compat_linen_functions_are_documented():
  from peft import _compat  # pylint: disable=g-import-not-at-top
  for name in ('push_linen_interceptor',):
    doc = getattr(_compat, name).__doc__ or ''
    assert 'Wraps' in doc and 'flax' in doc and 'Examples:' in doc, name
  assert peft.ModuleInterceptor is pl.ModuleInterceptor

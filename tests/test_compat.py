"""Private flax/jax names are used only in `peft/_compat.py`.

Two checks over the sources of `peft/` (AST, not text search):
* names known to be flax/jax internals (`graphlib`, `_pytree__*`,
  `jax.core.Tracer`, `flax.core.spmd`, the linen interceptor stack,
  `ToLinen._update_variables`, `nn.Einsum._get_bias_shape`, `jax._src`) appear
  nowhere else;
* no other module reads an underscore attribute of an object that is not
  peft's own (`self._x` and peft's own private names are fine).
"""

from __future__ import annotations

import ast
import pathlib

_PEFT = pathlib.Path(__file__).resolve().parents[1] / 'peft'
_SEAM = _PEFT / '_compat.py'

_KNOWN_PRIVATE = {
    'graphlib', 'GRAPH_REGISTRY', 'get_node_impl', 'spmd', 'Tracer', '_src',
    '_global_interceptor_stack', '_update_variables', '_get_bias_shape',
    '_storage',
}


def _sources():
  return sorted(p for p in _PEFT.rglob('*.py') if p != _SEAM)


def _own_names() -> set[str]:
  """Every name peft defines (functions, classes, attributes it assigns)."""
  names = set()
  for path in _PEFT.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                           ast.ClassDef)):
        names.add(node.name)
      elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        names.add(node.id)
      elif isinstance(node, ast.Attribute) and isinstance(node.ctx,
                                                          ast.Store):
        names.add(node.attr)
      elif isinstance(node, ast.alias) and node.asname:
        names.add(node.asname)
      elif isinstance(node, ast.arg):
        names.add(node.arg)
  return names


def _violations(path: pathlib.Path, own: set[str]) -> list[str]:
  out = []
  tree = ast.parse(path.read_text())
  rel = path.relative_to(_PEFT.parent)
  for node in ast.walk(tree):
    where = f'{rel}:{getattr(node, "lineno", "?")}'
    if isinstance(node, ast.ImportFrom) and node.module:
      parts = node.module.split('.')
      if parts[0] in ('flax', 'jax', 'jaxlib'):
        bad = [p for p in parts + [a.name for a in node.names]
               if p in _KNOWN_PRIVATE or (p.startswith('_') and
                                          not p.startswith('__'))]
        if bad:
          out.append(f'{where}: from {node.module} import ... ({bad})')
    elif isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split('.')
        if parts[0] in ('flax', 'jax') and any(
            p in _KNOWN_PRIVATE or p.startswith('_') for p in parts):
          out.append(f'{where}: import {alias.name}')
    elif isinstance(node, ast.Attribute):
      attr = node.attr
      if attr in _KNOWN_PRIVATE:
        out.append(f'{where}: .{attr}')
      elif attr.startswith('_') and not attr.startswith('__'):
        base = node.value
        if isinstance(base, ast.Name) and base.id in ('self', 'cls'):
          continue
        if attr not in own:
          out.append(f'{where}: ._{attr[1:]} (not a peft name)')
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      if '_pytree__' in node.value or node.value in _KNOWN_PRIVATE:
        out.append(f'{where}: string {node.value!r}')
  return out


def test_private_names_only_in_compat():
  own = _own_names() - _KNOWN_PRIVATE
  found = [v for p in _sources() for v in _violations(p, own)]
  assert not found, (
      'private flax/jax names outside peft/_compat.py (move them there with'
      ' a docstring saying why):\n' + '\n'.join(found))


def test_the_check_catches_a_private_use():
  text = ('from flax.nnx import graphlib\n'
          'import flax.linen as nn\n'
          'x = nn.module._global_interceptor_stack\n'
          "y = getattr(object, '_pytree__nodes', None)\n"
          "z = getattr(nn.module, '_global_interceptor_stack')\n")
  fake = _PEFT / '_fake_for_test.py'  # placed as if it were in peft/
  try:
    fake.write_text(text)
    found = _violations(fake, set())
  finally:
    fake.unlink()
  assert len(found) == 4, found


def test_compat_functions_have_docstrings():
  from peft import _compat
  for name in _compat.__all__:
    fn = getattr(_compat, name)
    assert fn.__doc__ and fn.__doc__.strip(), name


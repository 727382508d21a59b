"""Selecting layers of an NNX model: `where=` selectors and classification.

A supported layer is a module whose type is in `peft.nnx.registry` (a float
layer) or one of peft's wrappers: `LoRA` (kind `'lora'`), `SimulateQuantized`
(`'simulate'`) and `QuantizedLayer` (`'int4'`); a wrapper counts as one layer.

Selectors (`where=`), used by every surgery function:

* `None`: every supported layer;
* a type or tuple of types: the layer, the base layer inside a peft wrapper,
  or a module containing the layer is an instance (so `where=nnx.Linear` also
  picks `LoRALinear(Linear)`, and `where=MyAttention` picks every layer inside
  `MyAttention` modules);
* a string: a regex that must `re.fullmatch` the `/`-joined path, e.g.
  `r'layers/\\d+/attn/(q|v)_proj'`; a layer reachable by several paths (shared)
  matches if any of its paths does;
* a callable `(path, module) -> bool`, with `path` a tuple of keys (str/int) —
  the first path the walk reaches the layer by — and `module` the layer as it
  sits in the model (for a LoRA-wrapped layer: the wrapper).

A selector that matches nothing raises a `ValueError` listing the paths it
could have matched (no silent no-ops); a string or callable selector that
matches a module holding parameters whose type has no registered geometry is
an error too (it names the path, the type, and how to register it), and
`expected_count=n` makes any other number of matches an error.

Examples:
  >>> from flax import nnx
  >>> from peft.nnx import selection
  >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu)
  >>> [p for p, _ in selection.select(model)]
  ['layers/0']
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

from flax import nnx

from peft.nnx import graph
from peft.nnx import quantized as _q
from peft.nnx import registry
from peft.nnx.graph import Path

__all__ = ['Selector', 'kind_of', 'select', 'select_layers']

#: What `where=` accepts (see the module docstring).
Selector = Union[
    None, type, tuple, str, re.Pattern, Callable[[Path, nnx.Module], bool]
]

_MAX_LISTED_PATHS = 60


def kind_of(module: Any) -> str | None:
  """`'lora'`, `'simulate'`, `'int4'`, `'float'` or None (not a layer).

  Examples:
    >>> from flax import nnx
    >>> kind_of(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), kind_of(nnx.relu)
    ('float', None)
  """
  from peft.nnx import lora as _lora  # pylint: disable=g-import-not-at-top
  if isinstance(module, _lora.LoRA):
    return 'lora'
  if isinstance(module, _q.SimulateQuantized):
    return 'simulate'
  if isinstance(module, _q.QuantizedLayer):
    return 'int4'
  if isinstance(module, nnx.Module) and registry.layer_type(module):
    return 'float'
  return None


def base_of(layer: Any) -> Any:
  """The layer under a LoRA wrapper (or the layer itself)."""
  return layer.wrapped if kind_of(layer) == 'lora' else layer


def _compile_selector(where: Any) -> Callable[[graph.Index, Any], bool]:
  """Returns `matches(idx, top_layer) -> bool`; validates `where`."""
  if where is None:
    return lambda idx, layer: True
  if isinstance(where, type) or (
      isinstance(where, tuple) and where and
      all(isinstance(t, type) for t in where)
  ):
    types = where if isinstance(where, tuple) else (where,)

    def match_type(idx, layer):
      node = layer
      for _ in range(3):  # the layer, its base, the base's float layer.
        if isinstance(node, types):
          return True
        if kind_of(node) not in ('lora', 'simulate'):
          break
        node = node.wrapped
      return any(isinstance(a, types) for a in graph.ancestors(idx, id(layer)))

    return match_type
  if isinstance(where, (str, re.Pattern)):
    try:
      pattern = re.compile(where)
    except re.error as e:
      raise ValueError(
          f'where: {where!r} is not a valid regular expression ({e}); pass a'
          " regex matched against '/'-joined paths, e.g. r'layers/\\d+/attn/.*'."
      ) from None

    def match_regex(idx, layer):
      return any(
          pattern.fullmatch(graph.path_str(p)) for p in graph.all_paths(idx, id(layer))
      )

    return match_regex
  if callable(where):
    return lambda idx, layer: bool(where(idx.first_path[id(layer)], layer))
  raise TypeError(
      f'where: expected None, a layer type or tuple of types, a regex string,'
      f' or a predicate (path, module) -> bool; got {where!r}.'
  )


def _format_paths(paths: Sequence[str]) -> str:
  if not paths:
    return '  (none)'
  shown = [f'  {p}' for p in paths[:_MAX_LISTED_PATHS]]
  if len(paths) > _MAX_LISTED_PATHS:
    shown.append(f'  ... and {len(paths) - _MAX_LISTED_PATHS} more')
  return '\n'.join(shown)


def select_layers(
    model: Any,
    where: Any,
    expected_count: int | None,
    eligible: Callable[[Any, str], bool],
    action: str,
    skipped_reason: str,
    full: bool = False,
) -> tuple[graph.Index, list[Any]]:
  """Top layers that are eligible for `action` (by kind) and match `where`."""
  if expected_count is not None and (
      not isinstance(expected_count, int) or expected_count < 0
  ):
    raise ValueError(
        f'expected_count: expected a non-negative int or None, got'
        f' {expected_count!r}.'
    )
  if model is None or isinstance(model, (str, bytes, int, float)):
    raise TypeError(
        f'{action}: model must be an nnx.Module, got {type(model).__name__}'
    )
  matches = _compile_selector(where)
  idx = graph.index(model, kind_of, full=full)
  candidates = [t for t in idx.tops if eligible(t, idx.top_info[id(t)])]
  skipped = [t for t in idx.tops if not eligible(t, idx.top_info[id(t)])]
  selected = [t for t in candidates if matches(idx, t)]
  label = lambda t: graph.path_str(idx.first_path[id(t)])
  _check_unsupported_matches(idx, where, matches, action)
  if not idx.tops:
    raise ValueError(
        f'{action}: the model has no supported layer (nnx.Linear, nnx.Einsum,'
        ' nnx.LinearGeneral, a type registered with peft.nnx.register_layer,'
        f' or their peft wrappers), so where={where!r} cannot select any.'
    )
  if not selected:
    msg = [
        f'where={where!r} matched no layer for {action}. Paths it could have'
        f' matched ({len(candidates)}):',
        _format_paths([label(t) for t in candidates]),
    ]
    if skipped:
      msg.append(
          f'Skipped ({skipped_reason}, {len(skipped)}):\n'
          + _format_paths([label(t) for t in skipped])
      )
    raise ValueError('\n'.join(msg))
  if expected_count is not None and len(selected) != expected_count:
    raise ValueError(
        f'expected_count={expected_count} but where={where!r} matched'
        f' {len(selected)} layers for {action}:\n'
        + _format_paths([label(t) for t in selected])
    )
  return idx, selected


def select(model: Any, where: Selector = None) -> list[tuple[str, nnx.Module]]:
  """Lists the supported layers `where` picks, as `(path, layer)`; a dry run.

  Supported layers are `nnx.Linear`, `nnx.Einsum`, `nnx.LinearGeneral` and the
  peft wrappers of them (LoRA, simulated and int4 quantized). A wrapper counts
  as one layer (the layers inside it are not listed separately). The model is
  not changed. Each operation also takes `dry_run=True`, which returns exactly
  the paths that operation would change (e.g. `apply_lora` skips layers that
  already have an adapter, `select` lists them).

  Args:
    model: an `nnx.Module`.
    where: a selector (see the module docstring); `None` = every layer.

  Returns:
    `[(path, layer), ...]` in walk order, `path` the `/`-joined first path.

  Raises:
    ValueError: nothing matched (the message lists every candidate path).

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import selection
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu)
    >>> [p for p, _ in selection.select(model)]
    ['layers/0']
  """
  idx, selected = select_layers(
      model, where, None, lambda t, kind: True, 'select', 'n/a'
  )
  return [(graph.path_str(idx.first_path[id(t)]), t) for t in selected]


def _check_unsupported_matches(idx: graph.Index, where, matches, action):
  """A string/callable selector must not match an unregistered layer.

  Such a module (it holds parameters itself, is not inside a supported layer
  and contains none) would otherwise be skipped silently.
  """
  if where is None or isinstance(where, (type, tuple)):
    return
  has_layer = set()
  for top in idx.tops:
    has_layer.add(id(top))
    has_layer.update(id(a) for a in graph.ancestors(idx, id(top)))
  children: dict[int, list[int]] = {}
  for child, parents in idx.edges.items():
    for parent, _ in parents:
      children.setdefault(parent, []).append(child)
  inside, stack = set(), [id(t) for t in idx.tops]
  while stack:  # everything below a supported layer
    for child in children.get(stack.pop(), ()):
      if child not in inside:
        inside.add(child)
        stack.append(child)
  bad = []
  for m in idx.modules:
    nid = id(m)
    if (nid in has_layer or nid in inside or nid not in idx.direct_params
        or kind_of(m) is not None):
      continue
    try:
      hit = matches(idx, m)
    except Exception:  # pylint: disable=broad-except
      hit = False  # a predicate written for layers may not handle others
    if hit:
      bad.append(f'  {graph.path_str(idx.first_path[nid])}:'
                 f' {type(m).__module__}.{type(m).__qualname__}')
  if bad:
    raise ValueError(
        f'{action}: where={where!r} matches layers whose type has no'
        ' registered geometry, so they cannot be wrapped:\n'
        + '\n'.join(bad[:_MAX_LISTED_PATHS])
        + '\nRegister the type with peft.nnx.register_layer(type,'
        ' geometry=..., kernel=..., bias=...), or narrow the selector.'
    )

"""Graph surgery on NNX models: select layers, wrap them, merge them back.

An NNX model is a graph of Python objects, so adding LoRA or quantizing a model
is a walk over that graph that swaps some layers for wrappers, in place (no
method interception, no dummy forward pass).

* `replace(model, fn)`: the primitive; `fn(path, module)` returns the module or
  its replacement.
* `apply_lora`, `simulate_quantization`, `quantize`: wrap the selected layers;
  they compose (`quantize` then `apply_lora` is QLoRA; `quantize` on a
  LoRA-wrapped model quantizes the base layer and keeps the adapter).
* `merge_lora`: folds every adapter into its base kernel and drops the wrapper.
* `select` and `dry_run=True`: see which layers a selector picks, change nothing.
* `lora_state`: the adapter-only `nnx.State` (what to save after fine-tuning).
* `summary`: parameter counts (total / trainable / frozen) and real bytes.

Selectors (`where=`), used by every function above:

* `None`: every supported layer (`nnx.Linear`, `nnx.Einsum`,
  `nnx.LinearGeneral` and their peft wrappers);
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
could have matched (no silent no-ops), and `expected_count=n` makes any other
number of matches an error too.

Examples:
  >>> from flax import nnx
  >>> from peft.nnx import surgery
  >>> class MLP(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.up = nnx.Linear(4, 8, rngs=rngs)
  ...     self.down = nnx.Linear(8, 4, rngs=rngs)
  >>> model = MLP(nnx.Rngs(0))
  >>> surgery.apply_lora(model, rank=2, where='up', dry_run=True)
  ['up']
  >>> model = surgery.apply_lora(model, rank=2, where='up', rngs=nnx.Rngs(1))
  >>> type(model.up).__name__, type(model.down).__name__
  ('LoRALinear', 'Linear')
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence, Union

from flax import nnx
from flax.nnx import graphlib
import jax
import jax.numpy as jnp
import numpy as np

from peft.nnx.visual import format_bytes

__all__ = [
    'Path',
    'Selector',
    'ParamSummary',
    'replace',
    'select',
    'apply_lora',
    'simulate_quantization',
    'quantize',
    'merge_lora',
    'lora_state',
    'summary',
    'param_counts',
]

#: A path in the model graph: the attribute names / container keys from the
#: root, e.g. `('layers', 0, 'attn', 'q_proj')`.
Path = tuple[Union[str, int], ...]

#: What `where=` accepts (see the module docstring).
Selector = Union[
    None, type, tuple, str, re.Pattern, Callable[[Path, nnx.Module], bool]
]

_FLOAT_KINDS = {
    nnx.Linear: 'linear',
    nnx.Einsum: 'einsum',
    nnx.LinearGeneral: 'linear_general',
}

_MAX_LISTED_PATHS = 60


# --------------------------------------------------------------------------
# Layer classification (the peft modules are imported lazily: surgery works
# on plain flax models without them, and avoids import cycles).
# --------------------------------------------------------------------------


def _peft_classes() -> dict[str, dict[type, str]]:
  """{'lora': {cls: geometry}, 'simulate': {...}, 'int4': {...}}."""
  out: dict[str, dict[type, str]] = {'lora': {}, 'simulate': {}, 'int4': {}}
  try:
    from peft.nnx import lora as _lora  # pylint: disable=g-import-not-at-top
  except ImportError:
    _lora = None
  try:
    from peft.nnx import quantized as _q  # pylint: disable=g-import-not-at-top
  except ImportError:
    _q = None
  specs = [
      ('lora', _lora, 'LoRA'),
      ('simulate', _q, 'SimulateQuantized'),
      ('int4', _q, 'Int4'),
  ]
  for kind, mod, prefix in specs:
    if mod is None:
      continue
    for geometry, suffix in (
        ('linear', 'Linear'),
        ('einsum', 'Einsum'),
        ('linear_general', 'LinearGeneral'),
    ):
      cls = getattr(mod, prefix + suffix, None)
      if isinstance(cls, type):
        out[kind][cls] = geometry
  return out


def _lookup(classes: dict[type, str], module: Any) -> str | None:
  for cls in type(module).__mro__:
    if cls in classes:
      return classes[cls]
  return None


@dataclasses.dataclass(frozen=True)
class _Layer:
  """How a supported layer is built: `kind` and `geometry` of each level."""

  kind: str  # 'float', 'lora', 'simulate', 'int4'
  geometry: str  # 'linear', 'einsum', 'linear_general'


def _classify(module: Any, peft: dict[str, dict[type, str]]) -> _Layer | None:
  for kind in ('lora', 'simulate', 'int4'):
    geometry = _lookup(peft[kind], module)
    if geometry is not None:
      return _Layer(kind, geometry)
  geometry = _lookup(_FLOAT_KINDS, module)
  if geometry is not None:
    return _Layer('float', geometry)
  return None


def _base_of(layer: Any, peft) -> Any:
  """The layer under a LoRA wrapper (or the layer itself)."""
  info = _classify(layer, peft)
  if info is not None and info.kind == 'lora':
    return layer.wrapped
  return layer


# --------------------------------------------------------------------------
# Graph walking.
# --------------------------------------------------------------------------


def _is_graph_node(x: Any) -> bool:
  return type(x) in graphlib.GRAPH_REGISTRY


def _is_container(x: Any) -> bool:
  """A node that may hold modules: graph node or pytree (tuple, list, ...)."""
  if isinstance(x, nnx.Variable) or isinstance(x, (jax.Array, np.ndarray)):
    return False
  return graphlib.is_node(x)


def _graph_items(node: Any) -> list[tuple[Any, Any]]:
  impl = graphlib.GRAPH_REGISTRY[type(node)]
  return [
      (key, value)
      for key, value in impl.node_dict(node).items()
      if not (isinstance(key, str) and key.startswith('_pytree__'))
  ]


def _pytree_items(node: Any) -> tuple[Any, list[tuple[Any, Any]], Any]:
  impl = graphlib.get_node_impl(node)
  items, aux = impl.flatten(node)
  return impl, list(items), aux


def _replace(root: Any, fn: Callable[[Path, Any], Any]) -> Any:
  """Core of `replace`: parents first, one result per original object."""
  memo: dict[int, tuple[Any, Any]] = {}  # id -> (original, result)

  def visit(node: Any, path: Path) -> Any:
    if _is_graph_node(node):
      entry = memo.get(id(node))
      if entry is not None:
        return entry[1]
      if isinstance(node, nnx.Module):
        new = fn(path, node)
        if new is not node:
          memo[id(node)] = (node, new)
          return new
      memo[id(node)] = (node, node)
      impl = graphlib.GRAPH_REGISTRY[type(node)]
      for key, child in _graph_items(node):
        if not _is_container(child):
          continue
        new_child = visit(child, path + (key,))
        if new_child is not child:
          impl.set_key(node, key, new_child)
      return node
    # A pytree container (tuple, list, dict, ...): rebuilt if a child changed.
    impl, items, aux = _pytree_items(node)
    new_items, changed = [], False
    for key, child in items:
      new_child = visit(child, path + (key,)) if _is_container(child) else child
      changed |= new_child is not child
      new_items.append((key, new_child))
    if not changed:
      return node
    return impl.unflatten(new_items, aux)

  if not _is_container(root):
    raise TypeError(
        f'model: expected an nnx.Module (or a container of modules), got'
        f' {type(root).__name__}.'
    )
  return visit(root, ())


def replace(model: Any, fn: Callable[[Path, nnx.Module], Any]) -> Any:
  """Replaces modules of `model` in place by `fn(path, module)`'s results.

  `fn` is called once per `nnx.Module` object in the graph, parents before
  children, with `path` the tuple of keys by which the walk first reaches it
  (attribute names, `nnx.List` indices, `nnx.Dict` keys, tuple indices). It
  returns the module itself (keep it and walk into its children) or a
  replacement. A replacement is installed in every place the original object
  appears (sharing is preserved: a module reachable by two paths is replaced
  once and both parents see the same new object), and the walk does not descend
  into it, so a wrapper is never asked to wrap its own contents. Modules inside
  `nnx.List`, `nnx.Dict`, tuples stored with `nnx.data`, and nested modules are
  all reached; tuples are rebuilt, everything else is edited in place.

  Args:
    model: the root (an `nnx.Module`, or a pytree of modules).
    fn: `(path, module) -> module or replacement`.

  Returns:
    `model` (edited in place), or `fn`'s replacement if the root itself is
    replaced (or a rebuilt root if the root is a tuple).

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> double = lambda path, m: (
    ...     nnx.Sequential(m, m) if isinstance(m, nnx.Linear) else m)
    >>> model = surgery.replace(model, double)
    >>> type(model.layers[0]).__name__
    'Sequential'
  """
  if not callable(fn):
    raise TypeError(
        f'fn: expected a callable (path, module) -> module, got {fn!r}.'
    )
  return _replace(model, fn)


@dataclasses.dataclass
class _Index:
  """One walk over the whole graph (descending into every module)."""

  modules: list[Any]  # unique modules, first-visit (depth-first) order
  first_path: dict[int, Path]
  edges: dict[int, list[tuple[int, Path]]]  # child id -> [(parent id, keys)]
  var_owners: dict[int, list[int]]  # Variable id -> ids of owning modules
  variables: list[nnx.Variable]  # unique Variables
  tops: list[Any]  # supported layers not inside another supported layer
  top_info: dict[int, _Layer]
  by_id: dict[int, Any]  # graph nodes by id


def _index(root: Any, peft, full: bool = True) -> _Index:
  """Walks the graph; `full=False` does not enter supported layers (faster:
  enough to select layers, not to find Variables or tied kernels)."""
  idx = _Index([], {}, {}, {}, [], [], {}, {})
  seen: set[int] = set()
  seen_vars: set[int] = set()

  def add_var(var, owner_id):
    owners = idx.var_owners.setdefault(id(var), [])
    if owner_id is not None:
      owners.append(owner_id)
    if id(var) not in seen_vars:
      seen_vars.add(id(var))
      idx.variables.append(var)

  def visit(node, path, parent_id, rel, inside_layer):
    if isinstance(node, nnx.Variable):
      add_var(node, parent_id)
      return
    if _is_graph_node(node):
      nid = id(node)
      if parent_id is not None or path == ():
        idx.edges.setdefault(nid, []).append((parent_id, rel))
      if nid in seen:
        return
      seen.add(nid)
      idx.first_path[nid] = path
      idx.by_id[nid] = node
      is_layer = False
      if isinstance(node, nnx.Module):
        idx.modules.append(node)
        info = _classify(node, peft)
        if info is not None:
          is_layer = True
          if not inside_layer:
            idx.tops.append(node)
            idx.top_info[nid] = info
          if not full:
            return
      for key, child in _graph_items(node):
        if isinstance(child, nnx.Variable) or _is_container(child):
          visit(child, path + (key,), nid, (key,), inside_layer or is_layer)
      return
    if not _is_container(node):
      return
    _, items, _ = _pytree_items(node)
    for key, child in items:
      if isinstance(child, nnx.Variable) or _is_container(child):
        visit(child, path + (key,), parent_id, rel + (key,), inside_layer)

  visit(root, (), None, (), False)
  return idx


def _all_paths(idx: _Index, node_id: int, limit: int = 16) -> list[Path]:
  """Every path to a node (up to `limit`), following recorded parent edges."""
  cache: dict[int, list[Path]] = {}

  def paths(nid, stack):
    if nid in cache:
      return cache[nid]
    out: list[Path] = []
    for parent_id, rel in idx.edges.get(nid, []):
      if parent_id is None:
        out.append(())
      elif parent_id not in stack:
        for p in paths(parent_id, stack | {parent_id}):
          out.append(p + rel)
          if len(out) >= limit:
            break
      if len(out) >= limit:
        break
    cache[nid] = out
    return out

  return paths(node_id, frozenset({node_id})) or [idx.first_path[node_id]]


def _ancestors(idx: _Index, node_id: int) -> list[Any]:
  """Every module above a node (through all its parents)."""
  out, seen, stack = [], {node_id}, [node_id]
  while stack:
    for parent_id, _ in idx.edges.get(stack.pop(), []):
      if parent_id is not None and parent_id not in seen:
        seen.add(parent_id)
        stack.append(parent_id)
        out.append(idx.by_id[parent_id])
  return out


def _path_str(path: Path) -> str:
  return '/'.join(str(k) for k in path)


# --------------------------------------------------------------------------
# Selectors.
# --------------------------------------------------------------------------


def _compile_selector(where: Any, peft) -> Callable[[_Index, Any], bool]:
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
        info = _classify(node, peft)
        if info is None or info.kind not in ('lora', 'simulate'):
          break
        node = node.wrapped
      return any(isinstance(a, types) for a in _ancestors(idx, id(layer)))

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
          pattern.fullmatch(_path_str(p)) for p in _all_paths(idx, id(layer))
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


def _select(
    model: Any,
    where: Any,
    expected_count: int | None,
    eligible: Callable[[Any, _Layer], bool],
    action: str,
    skipped_reason: str,
    full: bool = False,
) -> tuple[_Index, list[Any]]:
  """Top layers that are eligible for `action` and match `where`."""
  if expected_count is not None and (
      not isinstance(expected_count, int) or expected_count < 0
  ):
    raise ValueError(
        f'expected_count: expected a non-negative int or None, got'
        f' {expected_count!r}.'
    )
  peft = _peft_classes()
  matches = _compile_selector(where, peft)
  idx = _index(model, peft, full=full)
  candidates = [t for t in idx.tops if eligible(t, idx.top_info[id(t)])]
  skipped = [t for t in idx.tops if not eligible(t, idx.top_info[id(t)])]
  selected = [t for t in candidates if matches(idx, t)]
  label = lambda t: _path_str(idx.first_path[id(t)])
  if not idx.tops:
    raise ValueError(
        f'{action}: the model has no supported layer (nnx.Linear, nnx.Einsum,'
        ' nnx.LinearGeneral or their peft wrappers), so where='
        f'{where!r} cannot select any; other layer types are not supported.'
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
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu)
    >>> [p for p, _ in surgery.select(model)]
    ['layers/0']
  """
  idx, selected = _select(
      model, where, None, lambda t, info: True, 'select', 'n/a'
  )
  return [(_path_str(idx.first_path[id(t)]), t) for t in selected]


def _install(model: Any, replacements: dict[int, Any]) -> Any:
  """Installs prepared replacements (keyed by original object id)."""
  if not replacements:
    return model
  return _replace(model, lambda path, m: replacements.get(id(m), m))


def _as_rngs(rngs: Any) -> nnx.Rngs:
  if isinstance(rngs, nnx.Rngs):
    return rngs
  if isinstance(rngs, int) or (
      isinstance(rngs, jax.Array) and jnp.issubdtype(rngs.dtype, jax.dtypes.prng_key)
  ):
    return nnx.Rngs(rngs)
  raise TypeError(
      f'rngs: expected an nnx.Rngs (or an int seed), got {type(rngs).__name__};'
      ' pass e.g. rngs=nnx.Rngs(0).'
  )


# --------------------------------------------------------------------------
# Operations.
# --------------------------------------------------------------------------


def apply_lora(
    model: Any,
    *,
    rank: int,
    alpha: float | None = None,
    where: Selector = None,
    rngs: nnx.Rngs | int | None = None,
    expected_count: int | None = None,
    dry_run: bool = False,
    **kwargs: Any,
) -> Any:
  """Wraps the selected layers in LoRA wrappers, in place; returns the model.

  `nnx.Linear` -> `LoRALinear`, `nnx.Einsum` -> `LoRAEinsum`,
  `nnx.LinearGeneral` -> `LoRALinearGeneral`; their simulated or int4
  quantized versions are wrapped the same way (QLoRA). Layers that already have
  an adapter are skipped (never re-wrapped). Layers stacked by `nnx.vmap`
  (kernel with leading layer axes) get adapters with the same leading axes, so
  `nnx.scan` over the stack keeps working. All wrappers are built before the
  model is touched: if one fails, the model is unchanged.

  Many identical float layers (same type, shapes and settings, unsharded) are
  built as a group: their `a` factors are drawn in a few vectorised calls from
  `rngs` (each layer still gets an independent draw from the same
  distribution), which makes wrapping thousands of layers fast. Initialisers
  must therefore be pure functions of their key, as JAX initialisers are.

  Args:
    model: an `nnx.Module`.
    rank: LoRA rank (> 0).
    alpha: output scale numerator (`alpha / rank`); `None` = no scaling.
    where: a selector (see the module docstring); `None` = every layer.
    rngs: `nnx.Rngs` (or an int seed) for the `a` initializers; required
      unless `dry_run`.
    expected_count: if given, the number of layers that must match.
    dry_run: return the list of paths that would be wrapped; change nothing.
    **kwargs: passed to the wrappers (`use_rslora`, `a_init`, `b_init`,
      `dtype`, `param_dtype`).

  Returns:
    The model (or the list of paths if `dry_run`).

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> model = surgery.apply_lora(model, rank=1, rngs=nnx.Rngs(1))
    >>> type(model.layers[0]).__name__
    'LoRALinear'
  """
  idx, selected = _select(
      model,
      where,
      expected_count,
      lambda t, info: info.kind != 'lora',
      'apply_lora',
      'already have a LoRA adapter',
  )
  if dry_run:
    return [_path_str(idx.first_path[id(t)]) for t in selected]
  if rngs is None:
    raise TypeError(
        'apply_lora: rngs is required to initialise the adapters; pass e.g.'
        ' rngs=nnx.Rngs(0).'
    )
  rngs = _as_rngs(rngs)
  from peft.nnx import lora as _lora  # pylint: disable=g-import-not-at-top

  wrappers = {
      'linear': _lora.LoRALinear,
      'einsum': _lora.LoRAEinsum,
      'linear_general': _lora.LoRALinearGeneral,
  }
  groups: dict[Any, list[Any]] = {}
  order = []
  for layer in selected:
    info = idx.top_info[id(layer)]
    key, parts = _fast_group_key(layer, info, kwargs)
    if key is None:
      key = ('slow', id(layer))
    if key not in groups:
      groups[key] = []
      order.append(key)
    groups[key].append((layer, parts))
  replacements = {}
  for key in order:
    group = groups[key]
    cls = wrappers[idx.top_info[id(group[0][0])].geometry]
    built = None
    if key[0] != 'slow' and len(group) >= _FAST_MIN_GROUP:
      built = _build_group_fast(cls, group, rank, alpha, rngs, kwargs)
    if built is None:
      built = [
          cls(layer, rank=rank, alpha=alpha, rngs=rngs, **kwargs)
          for layer, _ in group
      ]
    for (layer, _), wrapper in zip(group, built):
      replacements[id(layer)] = wrapper
  return _install(model, replacements)


# Building many identical wrappers one by one costs ~1-2 ms each (flax module
# construction and one RNG call per factor). For a group of float layers with
# the same structure, `_build_group_fast` builds one wrapper normally (it does
# all the validation), then wrappers around an abstract layer (a kernel
# `ShapeDtypeStruct`) stacked `_FAST_CHUNK` times (the LoRA wrappers size their
# adapters from `kernel.shape`, so each call initialises 64 adapters, slice by
# slice, through the LoRA module's own code), and makes each remaining wrapper
# with `nnx.merge` of the first wrapper's graphdef with the layer's own
# Variables and its slice of a stacked adapter; `wrapper.wrapped` is then set to
# the original layer object. Anything unexpected falls back to the one-by-one
# construction.
_FAST_MIN_GROUP = 4
_FAST_CHUNK = 64
_FAST_KWARGS = frozenset({'use_rslora', 'a_init', 'b_init', 'dtype',
                          'param_dtype'})


def _fast_group_key(layer, info, kwargs):
  if info.kind != 'float' or not set(kwargs) <= _FAST_KWARGS:
    return None, None
  kernel = getattr(layer, 'kernel', None)
  if not isinstance(kernel, nnx.Variable):
    return None, None
  meta = kernel.get_metadata()
  if meta.get('out_sharding') or meta.get('sharding_names') or meta.get(
      'sharding'
  ):
    return None, None
  graphdef, state = nnx.split(layer)
  return ('fast', type(layer), graphdef), state


def _build_group_fast(cls, group, rank, alpha, rngs, kwargs):
  """Wrappers for `group` ([(layer, state)]) or None to build one by one."""
  first = group[0][0]
  n = len(group) - 1
  try:
    w0 = cls(first, rank=rank, alpha=alpha, rngs=rngs, **kwargs)
  except Exception:  # pylint: disable=broad-except
    return None  # the one-by-one path raises the proper error.
  try:
    graphdef, state0 = nnx.split(w0)
    flat0 = list(nnx.to_flat_state(state0))
    if any(path[0] not in ('wrapped', 'lora') for path, _ in flat0):
      return None
    fake = _shallow_clone(first)
    kernel = first.kernel
    value = kernel.get_value()
    # Fixed-size chunks: the stacked initialisers compile once per layer shape.
    fake.kernel = kernel.replace(
        jax.ShapeDtypeStruct((_FAST_CHUNK, *value.shape), value.dtype)
    )
    lora0 = {p: v for p, v in nnx.to_flat_state(nnx.state(w0.lora))}
    slices: dict[Any, list[jax.Array]] = {p: [] for p in lora0}
    for _ in range(-(-n // _FAST_CHUNK)):
      stacked = cls(fake, rank=rank, alpha=alpha, rngs=rngs, **kwargs)
      lora_n = {p: v for p, v in nnx.to_flat_state(nnx.state(stacked.lora))}
      if set(lora0) != set(lora_n):
        return None
      for path, var in lora0.items():
        big = lora_n[path].get_value()
        if tuple(big.shape) != (_FAST_CHUNK, *var.get_value().shape):
          return None
        slices[path].extend(jnp.unstack(big))  # one array per layer
    out = [w0]
    for i, (layer, layer_state) in enumerate(group[1:]):
      own = dict(nnx.to_flat_state(layer_state))
      flat = []
      for path, var in flat0:
        if path[0] == 'wrapped':
          flat.append((path, own[path[1:]]))
        else:
          flat.append((path, var.replace(slices[path[1:]][i])))
      wrapper = nnx.merge(graphdef, nnx.from_flat_state(flat))
      wrapper.wrapped = layer  # the original object, not a rebuilt copy
      out.append(wrapper)
    return out
  except Exception:  # pylint: disable=broad-except
    return None


def _quantize_op(
    model, method, where, expected_count, dry_run, real: bool
) -> Any:
  from peft import quantization as _qz  # pylint: disable=g-import-not-at-top

  method = _qz.QuantizationMethod(method)  # ValueError lists valid names.
  action = 'quantize' if real else 'simulate_quantization'

  def base_kind(t, info):
    if info.kind != 'lora':
      return info.kind
    base_info = _classify(t.wrapped, _peft_classes())
    return base_info.kind if base_info is not None else None

  ok = ('float', 'simulate') if real else ('float',)
  idx, selected = _select(
      model,
      where,
      expected_count,
      lambda t, info: base_kind(t, info) in ok,
      action,
      'already quantized' + ('' if real else ' or simulated'),
  )
  if dry_run:
    return [_path_str(idx.first_path[id(t)]) for t in selected]
  from peft.nnx import quantized as _q  # pylint: disable=g-import-not-at-top

  prefix = 'Int4' if real else 'SimulateQuantized'
  peft = _peft_classes()
  replacements = {}
  for t in selected:
    base = _base_of(t, peft)
    geometry = _classify(base, peft).geometry
    suffix = {
        'linear': 'Linear',
        'einsum': 'Einsum',
        'linear_general': 'LinearGeneral',
    }[geometry]
    cls = getattr(_q, prefix + suffix)
    if real:  # from_float also accepts a SimulateQuantized* layer.
      new = cls.from_float(base, method=method)
    else:
      new = cls(base, method=method)
    # The base object is replaced wherever it appears: at the top level, or as
    # `wrapper.wrapped` inside a LoRA wrapper (which keeps its adapter).
    replacements[id(base)] = new
  return _install(model, replacements)


def simulate_quantization(
    model: Any,
    *,
    method: Any,
    where: Selector = None,
    expected_count: int | None = None,
    dry_run: bool = False,
) -> Any:
  """Wraps the selected float layers in `SimulateQuantized*`, in place.

  The kernel is fake-quantized in the forward pass (straight-through gradient),
  for quantization-aware training. On a LoRA-wrapped layer the base layer is
  wrapped and the adapter kept: `LoRALinear(SimulateQuantizedLinear(Linear))`.
  Layers already simulated or quantized are skipped.

  Args:
    model: an `nnx.Module`.
    method: a `QuantizationMethod` or its name (`'int4'`, `'q4_0'`, ...).
    where: a selector (see the module docstring); `None` = every layer.
    expected_count: if given, the number of layers that must match.
    dry_run: return the list of paths that would change; change nothing.

  Returns:
    The model (or the list of paths if `dry_run`).

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(32, 3, rngs=nnx.Rngs(0)))
    >>> model = surgery.simulate_quantization(model, method='int4')
    >>> type(model.layers[0]).__name__
    'SimulateQuantizedLinear'
  """
  return _quantize_op(model, method, where, expected_count, dry_run, False)


def quantize(
    model: Any,
    *,
    method: Any,
    where: Selector = None,
    expected_count: int | None = None,
    dry_run: bool = False,
) -> Any:
  """Replaces the selected float layers by packed `Int4*` layers, in place.

  Real quantization (int4 / int8 per channel, or ggml Q4_0 blocks): the float
  kernel is dropped from the model. On a LoRA-wrapped layer the base layer is
  quantized and the adapter kept (`LoRALinear(Int4Linear)`); a
  `SimulateQuantized*` layer is replaced by the `Int4*` layer of its float
  kernel. Layers already quantized are skipped. `quantize` then `apply_lora` is
  QLoRA.

  Args:
    model: an `nnx.Module`.
    method: a `QuantizationMethod` or name: `'int4'`, `'int8'`, `'q4_0'`,
      `'q4_0_transpose'`.
    where: a selector (see the module docstring); `None` = every layer.
    expected_count: if given, the number of layers that must match.
    dry_run: return the list of paths that would change; change nothing.

  Returns:
    The model (or the list of paths if `dry_run`).

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(32, 3, rngs=nnx.Rngs(0)))
    >>> model = surgery.quantize(model, method='int4')
    >>> type(model.layers[0]).__name__
    'Int4Linear'
  """
  return _quantize_op(model, method, where, expected_count, dry_run, True)


def _kernel_var(base: Any, info: _Layer) -> nnx.Variable:
  if info.kind == 'float':
    return base.kernel
  if info.kind == 'simulate':
    return base.wrapped.kernel
  return base.values


def merge_lora(
    model: Any,
    *,
    where: Selector = None,
    dequantize: bool = False,
    allow_shared: bool = False,
    expected_count: int | None = None,
    dry_run: bool = False,
) -> Any:
  """Folds each LoRA adapter into its base kernel and drops the wrapper.

  Every selected `LoRA*` wrapper is replaced (everywhere it appears) by a plain
  flax layer whose kernel is `kernel + wrapper.delta()`, computed in float32 and
  cast once to the kernel's dtype; the bias and the other attributes are those
  of the base layer. The merged layer is a new object with a new kernel
  `Variable`: the old base layer and its kernel are not modified, so any other
  reference to them (a tied layer, the user's own variable) keeps the unmerged
  weights.

  Quantized bases: merging would need the float kernel, so it is refused unless
  `dequantize=True`; then the merged kernel is the dequantized (`Int4*`) or
  fake-quantized (`SimulateQuantized*`) kernel plus the delta — the function the
  model computed — stored in float (the result is no longer quantized; call
  `quantize` again if wanted).

  Tied weights: if the base kernel (or the base layer) is also used by another
  layer, folding would either change that layer or silently untie them, so it
  is refused unless `allow_shared=True`, which unties (the other layer keeps the
  original kernel).

  Args:
    model: an `nnx.Module`.
    where: a selector among the LoRA wrappers; `None` = all of them.
    dequantize: allow merging into quantized bases (see above).
    allow_shared: allow merging a kernel shared with another layer (unties).
    expected_count: if given, the number of wrappers that must match.
    dry_run: return the list of paths that would be merged; change nothing.

  Returns:
    The model (or the list of paths if `dry_run`).

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> model = surgery.apply_lora(model, rank=1, rngs=nnx.Rngs(1))
    >>> model = surgery.merge_lora(model)
    >>> type(model.layers[0]).__name__
    'Linear'
  """
  idx, selected = _select(
      model,
      where,
      expected_count,
      lambda t, info: info.kind == 'lora',
      'merge_lora',
      'have no LoRA adapter',
      full=True,
  )
  peft = _peft_classes()
  plan = []
  for wrapper in selected:
    path = _path_str(idx.first_path[id(wrapper)])
    base = wrapper.wrapped
    info = _classify(base, peft)
    if info is None:
      raise TypeError(
          f'merge_lora: the layer wrapped at {path!r} is a'
          f' {type(base).__name__}, which merge_lora cannot fold into.'
      )
    if info.kind != 'float' and not dequantize:
      raise ValueError(
          f'merge_lora: the base layer at {path!r} is quantized'
          f' ({type(base).__name__}); folding the adapter needs a float kernel.'
          ' Pass dequantize=True to merge into the dequantized kernel (the'
          ' result is a float layer), or keep the adapter separate.'
      )
    kernel = _kernel_var(base, info)
    owners = set(idx.var_owners.get(id(kernel), []))
    base_parents = {p for p, _ in idx.edges.get(id(base), [])}
    if not allow_shared and (len(owners) > 1 or base_parents != {id(wrapper)}):
      users = sorted(
          {
              _path_str(idx.first_path[o])
              for o in owners | base_parents
              if o is not None and o != id(wrapper) and o in idx.first_path
          }
      )
      raise ValueError(
          f'merge_lora: the kernel of the layer wrapped at {path!r} is shared'
          f' (tied weights; also used by: {", ".join(users) or "?"}). Folding'
          ' the adapter into it would change or untie the other layer. Pass'
          ' allow_shared=True to merge anyway (this layer gets its own merged'
          ' kernel; the other keeps the original).'
      )
    plan.append((wrapper, base, info))
  if dry_run:
    return [_path_str(idx.first_path[id(w)]) for w, _, _ in plan]

  replacements = {}
  for wrapper, base, info in plan:
    delta = jnp.asarray(wrapper.delta(), jnp.float32)
    if info.kind == 'float':
      new = _shallow_clone(base)
      old = base.kernel
      old_value = old.get_value()
    elif info.kind == 'int4':
      new = base.to_float()
      old = new.kernel
      old_value = old.get_value()
    else:  # simulate: the function the model computes uses the fake-quantized kernel.
      new = _shallow_clone(base.wrapped)
      old = new.kernel
      old_value = _simulated_kernel(base)
    if tuple(delta.shape) != tuple(old_value.shape):
      raise ValueError(
          f'merge_lora: adapter delta shape {tuple(delta.shape)} does not match'
          f' kernel shape {tuple(old_value.shape)} at'
          f' {_path_str(idx.first_path[id(wrapper)])!r}.'
      )
    dtype = old.get_value().dtype
    merged = (jnp.asarray(old_value, jnp.float32) + delta).astype(dtype)
    new.kernel = old.replace(merged)
    replacements[id(wrapper)] = new
  return _install(model, replacements)


def _shallow_clone(module: Any) -> Any:
  """A new module object holding the same Variable objects as `module`."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, state)  # copy=False: Variables are reused.


def _simulated_kernel(layer: Any) -> jax.Array:
  """The fake-quantized kernel a `SimulateQuantized*` layer computes with."""
  fn = getattr(layer, '_quantized_kernel', None)
  if not callable(fn):
    raise TypeError(
        f'merge_lora: cannot read the fake-quantized kernel of'
        f' {type(layer).__name__} (no _quantized_kernel method).'
    )
  return fn()


def lora_state(model: Any) -> nnx.State:
  """The adapters' parameters only (`nnx.LoRAParam`), as an `nnx.State`.

  This is what to save after LoRA fine-tuning; restore with
  `nnx.update(model, state)` on a model with the same adapters.

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> model = surgery.apply_lora(model, rank=1, rngs=nnx.Rngs(1))
    >>> sorted(surgery.lora_state(model)['layers'][0]['lora'].keys())
    ['a', 'b']
  """
  state = nnx.state(model, nnx.LoRAParam)
  if not jax.tree.leaves(state):
    raise ValueError(
        'lora_state: the model has no nnx.LoRAParam (no adapters); call'
        ' apply_lora(model, rank=..., rngs=...) first.'
    )
  return state


# --------------------------------------------------------------------------
# Summary.
# --------------------------------------------------------------------------


def _array_bytes(x: Any) -> int:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return int(jax.random.key_data(x).nbytes)
  dtype = jnp.dtype(x.dtype)
  size = int(np.prod(x.shape, dtype=np.int64))
  if jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits < 8:
    return math.ceil(size * jnp.iinfo(dtype).bits / 8)
  return size * dtype.itemsize


def _value_counts(value: Any) -> tuple[int, int]:
  """(number of weights, real bytes) of a Variable's value."""
  elems, nbytes = 0, 0
  for leaf in jax.tree.leaves(value):
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      elems += int(np.prod(leaf.shape, dtype=np.int64))
      nbytes += _array_bytes(leaf)
  return elems, nbytes


@dataclasses.dataclass(frozen=True)
class ParamSummary:
  """Parameter counts and real storage of a model (see `summary`).

  Attributes:
    total: number of weights (`trainable + frozen`).
    trainable: weights in `nnx.LoRAParam` (what LoRA fine-tuning trains).
    frozen: the other `nnx.Param` weights plus the (logical) weights held
      quantized by `Int4*` layers.
    total_bytes / trainable_bytes / frozen_bytes: real storage; int4 counts
      0.5 byte per value (JAX reports 1), quantized weights count their values
      plus scales.
    other: elements of non-parameter variables (LoRA scales, batch stats, RNG
      state, ...); `other_bytes` their bytes (not in `total_bytes`).
    layers: number of layers per kind, wrappers spelled out, e.g.
      `{'LoRALinear(Int4Linear)': 4, 'Linear': 2}`.

  Examples:
    >>> s = ParamSummary(10, 2, 8, 40, 8, 32, 0, 0, {})
    >>> s.trainable_fraction
    0.2
  """

  total: int
  trainable: int
  frozen: int
  total_bytes: int
  trainable_bytes: int
  frozen_bytes: int
  other: int
  other_bytes: int
  layers: dict[str, int]

  @property
  def trainable_fraction(self) -> float:
    return self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    rows = [
        ('trainable (LoRA)', self.trainable, self.trainable_bytes),
        ('frozen', self.frozen, self.frozen_bytes),
        ('total', self.total, self.total_bytes),
    ]
    lines = [f'{"":<18}{"params":>14}{"bytes":>14}']
    for name, n, b in rows:
      lines.append(f'{name:<18}{n:>14,}{format_bytes(b):>14}')
    lines.append(f'trainable fraction: {100 * self.trainable_fraction:.3f}%')
    if self.other:
      lines.append(
          f'non-parameter variables: {self.other:,} values,'
          f' {format_bytes(self.other_bytes)}'
      )
    if self.layers:
      lines.append(
          'layers: ' + ', '.join(f'{k} x{v}' for k, v in sorted(self.layers.items()))
      )
    return '\n'.join(lines)


def _describe(layer: Any, peft) -> str:
  """'LoRALinear(Int4Linear)'-style name of a (wrapped) layer."""
  name = type(layer).__name__
  info = _classify(layer, peft)
  inner = getattr(layer, 'wrapped', None)
  if info is not None and info.kind in ('lora', 'simulate') and inner is not None:
    return f'{name}({_describe(inner, peft)})'
  return name


def summary(model: Any) -> ParamSummary:
  """Counts parameters (total / trainable LoRA / frozen) and real bytes.

  Each `Variable` is counted once even if shared. Int4 values count 0.5 byte
  (JAX's `nbytes` reports 1 byte for `jnp.int4`); quantized weights count their
  packed values plus scales (`QArray.nbytes`). `print(summary(model))` shows a
  small table.

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    >>> s = surgery.summary(model)
    >>> s.total, s.trainable, s.total_bytes
    (20, 0, 80)
  """
  from peft.nnx.quantized import QuantizedWeight  # pylint: disable=g-import-not-at-top

  peft = _peft_classes()
  idx = _index(model, peft)
  trainable = frozen = other = 0
  trainable_b = frozen_b = other_b = 0
  storage: set[int] = set()
  for m in idx.modules:  # Int4* layers: logical weights + packed bytes
    values = getattr(m, 'values', None)
    if (isinstance(values, QuantizedWeight) and hasattr(m, 'qarray')
        and id(values) not in storage):
      storage.add(id(values))
      frozen += int(np.prod(m.kernel_shape, dtype=np.int64))
      frozen_b += int(m.nbytes)
  for var in idx.variables:
    if isinstance(var, QuantizedWeight):
      continue  # counted with its layer above
    n, b = _value_counts(var.get_value())
    if isinstance(var, nnx.LoRAParam):
      trainable += n
      trainable_b += b
    elif isinstance(var, nnx.Param):
      frozen += n
      frozen_b += b
    else:
      other += n
      other_b += b
  layers: dict[str, int] = {}
  for m in idx.tops:
    name = _describe(m, peft)
    layers[name] = layers.get(name, 0) + 1
  return ParamSummary(
      total=trainable + frozen,
      trainable=trainable,
      frozen=frozen,
      total_bytes=trainable_b + frozen_b,
      trainable_bytes=trainable_b,
      frozen_bytes=frozen_b,
      other=other,
      other_bytes=other_b,
      layers=layers,
  )


def param_counts(model: Any) -> ParamSummary:
  """Same as `summary` (an alias kept for discoverability).

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> surgery.param_counts(nnx.Linear(2, 2, rngs=nnx.Rngs(0))).total
    6
  """
  return summary(model)

"""Walking an NNX model graph: paths, parents, shared nodes, replacement.

`replace(model, fn)` is the primitive of all surgery: it visits every module
once (parents before children) and installs `fn`'s replacement wherever the
original object appears, so sharing survives. `index(model, classify)` walks
the whole graph once and records what the operations need: the first path to
each node, every parent edge (for shared nodes), which modules own which
variables (for tied kernels), and the top-level supported layers.

Examples:
  >>> from flax import nnx
  >>> from peft.nnx import graph
  >>> shared = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  >>> model = nnx.Sequential(shared, shared)
  >>> idx = graph.index(model, lambda m: 'layer' if m is shared else None)
  >>> [graph.path_str(p) for p in graph.all_paths(idx, id(shared))]
  ['layers/0', 'layers/1']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import jax
import numpy as np
from flax import nnx

from peft import _compat

__all__ = [
    'Path',
    'replace',
    'install',
    'Index',
    'index',
    'all_paths',
    'ancestors',
    'path_str',
]

#: A path in the model graph: the attribute names / container keys from the
#: root, e.g. `('layers', 0, 'attn', 'q_proj')`.
Path = tuple[Union[str, int], ...]


def _is_container(x: Any) -> bool:
  """A node that may hold modules: graph node or pytree (tuple, list, ...)."""
  if isinstance(x, (nnx.Variable, jax.Array, np.ndarray)):
    return False
  return _compat.is_node(x)


def _replace(root: Any, fn: Callable[[Path, Any], Any]) -> Any:
  """Core of `replace`: parents first, one result per original object."""
  memo: dict[int, tuple[Any, Any]] = {}  # id -> (original, result)

  def visit(node: Any, path: Path) -> Any:
    if _compat.is_graph_node(node):
      entry = memo.get(id(node))
      if entry is not None:
        return entry[1]
      if isinstance(node, nnx.Module):
        new = fn(path, node)
        if new is not node:
          memo[id(node)] = (node, new)
          return new
      memo[id(node)] = (node, node)
      for key, child in _compat.graph_node_items(node):
        if not _is_container(child):
          continue
        new_child = visit(child, path + (key,))
        if new_child is not child:
          _compat.graph_set_key(node, key, new_child)
      return node
    # A pytree container (tuple, list, dict, ...): rebuilt if a child changed.
    items, rebuild = _compat.pytree_node_items(node)
    new_items, changed = [], False
    for key, child in items:
      new_child = visit(child, path + (key,)) if _is_container(child) else child
      changed |= new_child is not child
      new_items.append((key, new_child))
    if not changed:
      return node
    return rebuild(new_items)

  if root is None or not _is_container(root):
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
    >>> from peft.nnx import graph
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> double = lambda path, m: (
    ...     nnx.Sequential(m, m) if isinstance(m, nnx.Linear) else m)
    >>> model = graph.replace(model, double)
    >>> type(model.layers[0]).__name__
    'Sequential'
  """
  if not callable(fn):
    raise TypeError(
        f'fn: expected a callable (path, module) -> module, got {fn!r}.'
    )
  return _replace(model, fn)


@dataclasses.dataclass
class Index:
  """One walk over the whole graph (descending into every module)."""

  modules: list[Any]  # unique modules, first-visit (depth-first) order
  first_path: dict[int, Path]
  edges: dict[int, list[tuple[int, Path]]]  # child id -> [(parent id, keys)]
  var_owners: dict[int, list[int]]  # Variable id -> ids of owning modules
  variables: list[nnx.Variable]  # unique Variables
  tops: list[Any]  # supported layers not inside another supported layer
  top_info: dict[int, Any]  # the classification of each top layer
  by_id: dict[int, Any]  # graph nodes by id
  direct_params: set[int] = dataclasses.field(default_factory=set)  # modules owning an nnx.Param directly


def index(root: Any, classify: Callable[[Any], Any], full: bool = True
          ) -> Index:
  """Walks the graph once.

  `classify(module)` returns None for modules that are not supported layers;
  the others are "layers" (the outermost ones are `tops`). `full=False` does
  not enter layers (faster: enough to select layers, not to find Variables
  or tied kernels).
  """
  idx = Index([], {}, {}, {}, [], [], {}, {})
  seen: set[int] = set()
  seen_vars: set[int] = set()

  def add_var(var, owner_id):
    if owner_id is not None and isinstance(var, nnx.Param):
      idx.direct_params.add(owner_id)
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
    if _compat.is_graph_node(node):
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
        info = classify(node)
        if info is not None:
          is_layer = True
          if not inside_layer:
            idx.tops.append(node)
            idx.top_info[nid] = info
          if not full:
            return
      for key, child in _compat.graph_node_items(node):
        if isinstance(child, nnx.Variable) or _is_container(child):
          visit(child, path + (key,), nid, (key,), inside_layer or is_layer)
      return
    if not _is_container(node):
      return
    items, _ = _compat.pytree_node_items(node)
    for key, child in items:
      if isinstance(child, nnx.Variable) or _is_container(child):
        visit(child, path + (key,), parent_id, rel + (key,), inside_layer)

  visit(root, (), None, (), False)
  return idx


def all_paths(idx: Index, node_id: int, limit: int = 16) -> list[Path]:
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


def ancestors(idx: Index, node_id: int) -> list[Any]:
  """Every module above a node (through all its parents)."""
  out, seen, stack = [], {node_id}, [node_id]
  while stack:
    for parent_id, _ in idx.edges.get(stack.pop(), []):
      if parent_id is not None and parent_id not in seen:
        seen.add(parent_id)
        stack.append(parent_id)
        out.append(idx.by_id[parent_id])
  return out


def path_str(path: Path) -> str:
  """`('layers', 0, 'attn')` -> `'layers/0/attn'`."""
  return '/'.join(str(k) for k in path)


def install(model: Any, replacements: dict[int, Any]) -> Any:
  """Installs prepared replacements (keyed by the original object's id)."""
  if not replacements:
    return model
  return _replace(model, lambda path, m: replacements.get(id(m), m))

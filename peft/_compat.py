"""The one place where peft touches private flax / jax names.

Each function wraps a private API that has no public equivalent in the
flax/jax versions peft supports, says why it is needed, and is the only use
of that name in the package (`tests/test_compat.py` checks that no other
module imports or reads a private flax/jax name).
"""

from __future__ import annotations

from typing import Any, Callable

from flax import linen as nn
from flax.nnx import graphlib as _graphlib

__all__ = [
    'is_graph_node',
    'is_node',
    'graph_node_items',
    'graph_set_key',
    'pytree_node_items',
    'is_internal_attribute',
    'is_data_attribute',
    # linen
    'push_linen_interceptor',
]

# nnx ----------------------------------------------------------------------
# Graph surgery must set a child on any graph node (Module, nnx.List,
# nnx.Dict, user-registered nodes) and rebuild pytree containers (tuples)
# in place; `nnx.iter_children` lists children but cannot set them, and
# gives no access to a pytree's flatten/unflatten. flax keeps that in
# `graphlib` (private module, stable since flax 0.10).


def is_graph_node(x: Any) -> bool:
  """True for objects registered as NNX graph nodes (Modules, nnx.List...)."""
  return type(x) in _graphlib.GRAPH_REGISTRY


def is_node(x: Any) -> bool:
  """True for graph nodes and pytree nodes NNX walks through (tuples...)."""
  return _graphlib.is_node(x)


def graph_node_items(node: Any) -> list[tuple[Any, Any]]:
  """`(key, child)` pairs of a graph node (no internal `_pytree__` slots)."""
  impl = _graphlib.GRAPH_REGISTRY[type(node)]
  return [
      (key, value)
      for key, value in impl.node_dict(node).items()
      if not (isinstance(key, str) and key.startswith('_pytree__'))
  ]


def graph_set_key(node: Any, key: Any, value: Any) -> None:
  """Sets child `key` of a graph node (attribute or container slot)."""
  _graphlib.GRAPH_REGISTRY[type(node)].set_key(node, key, value)


def pytree_node_items(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
  """`(items, rebuild)` of a pytree node: `rebuild(new_items)` remakes it."""
  impl = _graphlib.get_node_impl(node)
  items, aux = impl.flatten(node)
  return list(items), lambda new_items: impl.unflatten(new_items, aux)


def is_internal_attribute(name: Any) -> bool:
  """True for NNX's own bookkeeping slots on a Module (`_pytree__*`)."""
  return str(name).startswith('_pytree__')


def is_data_attribute(module: Any, name: str) -> bool:
  """True if NNX treats attribute `name` of `module` as data (not static)."""
  return bool((getattr(module, '_pytree__nodes', None) or {}).get(name, False))


# linen


def push_linen_interceptor(fn: Callable[..., Any]) -> Callable[[], None]:
  """Installs a linen method interceptor; returns a function removing it.

  Wraps flax's private `flax.linen.module._global_interceptor_stack` and its
  `_storage` list (a `threading.local` stack; unchanged from flax 0.7 to at
  least 0.12.8). The public `nn.intercept_methods(fn)` pops on exit and
  asserts the popped function is `fn`; two asyncio tasks of one thread whose
  `with` blocks close out of order break that assertion. The returned
  `remove()` deletes `fn` itself (the last occurrence) wherever it is in the
  stack, so blocks may close in any order. Flax versions without that list
  storage fall back to entering `nn.intercept_methods(fn)` (order-checked).

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from peft import _compat
    >>> calls = []
    >>> def count(next_fun, args, kwargs, context):
    ...   calls.append(context.method_name)
    ...   return next_fun(*args, **kwargs)
    >>> remove = _compat.push_linen_interceptor(count)
    >>> try:
    ...   _ = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))
    ... finally:
    ...   remove()
    >>> calls
    ['__call__']

  Args:
    fn: an interceptor `(next_fun, args, kwargs, context) -> output`, as
      taken by `nn.intercept_methods`.

  Returns:
    A function of no argument that removes `fn` again (call it once).
  """
  stack = getattr(nn.module, '_global_interceptor_stack', None)
  storage = getattr(stack, '_storage', None)
  if not isinstance(storage, list):  # pragma: no cover - other flax versions
    cm = nn.intercept_methods(fn)
    cm.__enter__()
    return lambda: cm.__exit__(None, None, None)
  stack.push(fn)

  def remove() -> None:
    storage = stack._storage  # pylint: disable=protected-access
    for i in range(len(storage) - 1, -1, -1):
      if storage[i] is fn:
        del storage[i]
        return

  return remove

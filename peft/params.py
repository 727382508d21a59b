"""Params tree surgery: split / merge LoRA branches, fuse / unfuse LoRA into kernels.

A LoRA branch (linen params layout) sits next to the kernel it adapts::

  {'kernel': K, 'bias': ..., 'lora': {'a': A, 'b': B}}

with ``A = (*batch, *in, r)``, ``B = (*batch, r, *out)`` and
``K = (*batch, *in, *out)``. This covers ``nn.Dense`` (``in``/``out`` one axis
each), ``nn.DenseGeneral`` (several ``in``/``out`` axes, leading ``batch_dims``)
and ``nn.Einsum`` whose weight string lists batch, then reduced, then output
axes (e.g. ``'imn'`` for ``'bi,imn->bmn'``, ``'edf'`` for ``'ebd,edf->ebf'``).

Trees are nested mappings (plain ``dict``, ``flax.core.FrozenDict``, ...). Every
function returns a new tree of the same mapping kind it was given (a plain dict
in gives a plain dict out) and never mutates its inputs. Leaves are shared, not
copied. All functions are pure tree code with ``jnp`` ops, so they can run
under ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ['split_params', 'merge_params', 'fuse_params', 'unfuse_params']

_LORA = 'lora'
_KERNEL = 'kernel'

Params = Mapping[str, Any]


# --------------------------------------------------------------------------
# Private helpers.
# --------------------------------------------------------------------------


def _is_branch(x: Any) -> bool:
  return isinstance(x, Mapping)


def _path_str(path: tuple[Any, ...]) -> str:
  return '/'.join(str(k) for k in path) if path else '<root>'


def _rebuild(template: Mapping, items: dict) -> Mapping:
  """Returns `items` as a mapping of the same kind as `template`."""
  if type(template) is dict:  # pylint: disable=unidiomatic-typecheck
    return items
  try:
    return type(template)(items)
  except Exception:  # pylint: disable=broad-except
    # Mapping types whose constructor does not take a dict: fall back to dict.
    return items


def _check_tree(params: Any, argname: str) -> None:
  if not _is_branch(params):
    raise TypeError(
        f'{argname} must be a nested mapping (dict / FrozenDict) of params, '
        f'got {type(params).__name__}.'
    )


def _split(node: Mapping, path: tuple) -> tuple[Mapping | None, Mapping | None]:
  """Returns (original, lora) for `node`; None means 'empty, drop it'."""
  original, lora = {}, {}
  for key, value in node.items():
    if key == _LORA:
      lora[key] = value  # The whole subtree under 'lora' goes to the lora side.
    elif _is_branch(value):
      if not value:
        # An empty branch in the input holds no LoRA: keep it on the original
        # side so that merge_params(*split_params(p)) == p.
        original[key] = value
        continue
      sub_original, sub_lora = _split(value, path + (key,))
      if sub_original is not None:
        original[key] = sub_original
      if sub_lora is not None:
        lora[key] = sub_lora
    else:
      original[key] = value
  return (
      _rebuild(node, original) if original else None,
      _rebuild(node, lora) if lora else None,
  )


def _merge(original: Mapping, lora: Mapping, path: tuple) -> Mapping:
  out = dict(original)
  for key, value in lora.items():
    if key not in out:
      out[key] = value
      continue
    mine = out[key]
    if _is_branch(mine) and _is_branch(value):
      out[key] = _merge(mine, value, path + (key,))
    else:
      raise ValueError(
          f'merge_params: both trees hold {_path_str(path + (key,))!r} and it '
          'is not a branch in both; the trees must not overlap at a leaf (pass '
          'the two halves returned by split_params).'
      )
  return _rebuild(original, out)


def _array_info(x: Any, what: str, path: tuple) -> tuple[tuple[int, ...], Any]:
  shape, dtype = getattr(x, 'shape', None), getattr(x, 'dtype', None)
  if shape is None or dtype is None:
    raise ValueError(
        f'{what} at {_path_str(path)!r} must be an array, got '
        f'{type(x).__name__}.'
    )
  return tuple(shape), dtype


def _lora_delta(kernel: Any, lora: Any, path: tuple, fn: str) -> jax.Array:
  """Returns a @ b in float32, shaped like `kernel`; validates the layout."""
  where = _path_str(path)
  if not _is_branch(lora):
    raise ValueError(
        f'{fn}: {where!r}/lora must be a branch {{"a": A, "b": B}}, got '
        f'{type(lora).__name__}.'
    )
  keys = set(lora.keys())
  if keys != {'a', 'b'}:
    missing = sorted(str(k) for k in {'a', 'b'} - keys)
    extra = sorted(str(k) for k in keys - {'a', 'b'})
    raise ValueError(
        f'{fn}: {where}/lora must hold exactly the leaves "a" and "b" '
        f'(missing {missing}, unexpected {extra}).'
    )
  k_shape, k_dtype = _array_info(kernel, 'kernel', path + (_KERNEL,))
  a_shape, _ = _array_info(lora['a'], 'lora a', path + (_LORA, 'a'))
  b_shape, _ = _array_info(lora['b'], 'lora b', path + (_LORA, 'b'))
  if not jnp.issubdtype(k_dtype, jnp.floating):
    raise ValueError(
        f'{fn}: kernel at {where!r} has dtype {k_dtype}; LoRA can only be '
        'fused into a float kernel (fuse before quantizing).'
    )
  layout = (
      f'kernel {k_shape}, a {a_shape}, b {b_shape}; expected '
      'a=(*batch, *in, r), b=(*batch, r, *out), kernel=(*batch, *in, *out)'
  )
  n_batch = len(a_shape) + len(b_shape) - 2 - len(k_shape)
  if len(a_shape) < 1 or len(b_shape) < 1 or n_batch < 0:
    raise ValueError(f'{fn}: cannot place the LoRA at {where!r}: {layout}.')
  batch = k_shape[:n_batch]
  rank = a_shape[-1]
  in_shape = a_shape[n_batch:-1]
  out_shape = b_shape[n_batch + 1:]
  if (
      a_shape[:n_batch] != batch
      or b_shape[:n_batch] != batch
      or len(b_shape) <= n_batch
      or b_shape[n_batch] != rank
      or k_shape != batch + in_shape + out_shape
  ):
    raise ValueError(f'{fn}: cannot place the LoRA at {where!r}: {layout}.')
  a = jnp.asarray(lora['a'], jnp.float32).reshape(
      batch + (math.prod(in_shape), rank)
  )
  b = jnp.asarray(lora['b'], jnp.float32).reshape(
      batch + (rank, math.prod(out_shape))
  )
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return delta.reshape(k_shape)


def _fuse(node: Mapping, path: tuple, scale: Any, found: list) -> Mapping:
  out = {}
  for key, value in node.items():
    if key == _LORA:
      continue
    out[key] = (
        _fuse(value, path + (key,), scale, found)
        if _is_branch(value) and value
        else value
    )
  if _LORA in node:
    if _KERNEL not in node:
      raise ValueError(
          f'fuse_params: {_path_str(path)!r} has a "lora" branch but no '
          '"kernel" to fuse it into.'
      )
    kernel = node[_KERNEL]
    delta = _lora_delta(kernel, node[_LORA], path, 'fuse_params')
    fused = jnp.asarray(kernel, jnp.float32) + scale * delta
    out[_KERNEL] = fused.astype(kernel.dtype)
    found.append(path)
  return _rebuild(node, out)


def _unfuse(fused: Any, lora: Mapping, path: tuple, scale: Any) -> Mapping:
  if not _is_branch(fused):
    raise ValueError(
        f'unfuse_params: the lora tree has a branch at {_path_str(path)!r} '
        'but the fused params do not (the trees do not match).'
    )
  out = dict(fused)
  for key, value in lora.items():
    sub = path + (key,)
    if key == _LORA:
      if _LORA in fused:
        raise ValueError(
            f'unfuse_params: fused params already hold {_path_str(sub)!r}; '
            'pass params produced by fuse_params.'
        )
      if _KERNEL not in fused:
        raise ValueError(
            f'unfuse_params: fused params have no kernel at '
            f'{_path_str(path)!r} for the lora branch there (the trees do '
            'not match).'
        )
      kernel = fused[_KERNEL]
      delta = _lora_delta(kernel, value, path, 'unfuse_params')
      base = jnp.asarray(kernel, jnp.float32) - scale * delta
      out[_KERNEL] = base.astype(kernel.dtype)
      out[_LORA] = value
    elif not _is_branch(value):
      raise ValueError(
          f'unfuse_params: the lora tree has a leaf at {_path_str(sub)!r} '
          'outside any "lora" branch; pass the lora tree returned by '
          'split_params.'
      )
    elif key not in fused:
      raise ValueError(
          f'unfuse_params: {_path_str(sub)!r} is in the lora tree but not in '
          'the fused params (the trees do not match).'
      )
    else:
      out[key] = _unfuse(fused[key], value, sub, scale)
  return _rebuild(fused, out)


def _has_lora(node: Mapping) -> bool:
  return any(
      key == _LORA or (_is_branch(v) and _has_lora(v))
      for key, v in node.items()
  )


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def split_params(params: Params) -> tuple[Params, Params]:
  """Splits a params tree into (original params, LoRA params).

  Every subtree under a key named ``'lora'`` (with the path leading to it) goes
  to the LoRA tree; everything else to the original tree. Branches left empty
  on one side are dropped from that side (a branch holding only ``'lora'`` is
  absent from the original tree); empty branches of the input stay on the
  original side, so ``merge_params(*split_params(p)) == p``.

  Example:

  ```python
  params = {'dense': {'kernel': 0, 'bias': 1, 'lora': {'a': 0, 'b': 1}},
            'other': 0}
  original, lora = split_params(params)
  # original == {'dense': {'kernel': 0, 'bias': 1}, 'other': 0}
  # lora == {'dense': {'lora': {'a': 0, 'b': 1}}}
  ```

  Args:
    params: nested mapping (``dict``, ``FrozenDict``, ...) with any leaves.

  Returns:
    ``(original, lora)``, each of the same mapping kind as ``params``.
  """
  _check_tree(params, 'params')
  original, lora = _split(params, ())
  empty = _rebuild(params, {})
  return (
      original if original is not None else empty,
      lora if lora is not None else empty,
  )


def merge_params(original: Params, lora: Params) -> Params:
  """Merges two params trees into one; the inverse of `split_params`.

  Example:

  ```python
  merge_params({'dense': {'kernel': 0}}, {'dense': {'lora': {'a': 0}}})
  # == {'dense': {'kernel': 0, 'lora': {'a': 0}}}
  ```

  Args:
    original: nested mapping, e.g. the first tree returned by `split_params`.
    lora: nested mapping, e.g. the second tree returned by `split_params`.

  Returns:
    The union of both trees, of the same mapping kind as ``original``.

  Raises:
    ValueError: if both trees hold the same path and it is not a branch in
      both (the message names the path).
  """
  _check_tree(original, 'original')
  _check_tree(lora, 'lora')
  return _merge(original, lora, ())


def fuse_params(params: Params, *, scale: float = 1.0) -> Params:
  """Fuses every LoRA branch into its kernel: ``kernel + scale * (a @ b)``.

  Each branch ``{'kernel': K, 'lora': {'a': A, 'b': B}}`` becomes
  ``{'kernel': K + scale * (A @ B)}`` (``'lora'`` removed), with
  ``A = (*batch, *in, r)``, ``B = (*batch, r, *out)``,
  ``K = (*batch, *in, *out)`` (Dense, DenseGeneral with batch dims, Einsum
  whose weight string lists batch, reduced, then output axes). The product and
  the sum are computed in float32 and cast once to the kernel's dtype.

  Example:

  ```python
  params = {'dense': {'kernel': jnp.zeros((4, 3)),
                      'lora': {'a': jnp.ones((4, 2)), 'b': jnp.ones((2, 3))}}}
  fuse_params(params)  # {'dense': {'kernel': 2 * jnp.ones((4, 3))}}
  ```

  Args:
    params: params tree holding at least one ``'lora'`` branch.
    scale: multiplies the LoRA product (e.g. ``alpha / rank``); the document's
      default is no scaling (1.0).

  Returns:
    The fused params, same mapping kind as ``params``; non-LoRA leaves shared.

  Raises:
    ValueError: if ``params`` has no ``'lora'`` branch, or a LoRA branch cannot
      be placed (no kernel, missing ``a``/``b``, inconsistent shapes); the
      message names the ``/``-joined path.
  """
  _check_tree(params, 'params')
  found = []
  fused = _fuse(params, (), scale, found)
  if not found:
    raise ValueError(
        "fuse_params: no 'lora' branch to fuse in params; apply LoRA first or "
        'pass the params tree that holds the "lora" branches.'
    )
  return fused


def unfuse_params(fused: Params, lora: Params, *, scale: float = 1.0) -> Params:
  """Recovers LoRA params from fused ones; the inverse of `fuse_params`.

  Every kernel with a LoRA branch in ``lora`` becomes
  ``kernel - scale * (a @ b)`` (float32, cast once to the kernel's dtype) and
  the ``'lora'`` branches are put back.

  Example:

  ```python
  params = {'dense': {'kernel': k, 'lora': {'a': a, 'b': b}}}
  _, lora = split_params(params)
  unfuse_params(fuse_params(params), lora)  # ~= params
  ```

  Args:
    fused: params returned by `fuse_params`.
    lora: the LoRA tree (the second tree returned by `split_params`).
    scale: must equal the ``scale`` given to `fuse_params`.

  Returns:
    The unfused params with ``'lora'`` branches, same mapping kind as
    ``fused``.

  Raises:
    ValueError: if the trees do not match (the message names the path) or
      ``lora`` holds no ``'lora'`` branch.
  """
  _check_tree(fused, 'fused')
  _check_tree(lora, 'lora')
  if not _has_lora(lora):
    raise ValueError(
        "unfuse_params: no 'lora' branch to unfuse in lora; pass the second "
        'tree returned by split_params.'
    )
  return _unfuse(fused, lora, (), scale)

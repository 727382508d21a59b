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
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def _split(node: Mapping) -> tuple[Mapping, Mapping | None]:
  """Returns (original, lora) for `node`; a lora of None means 'no LoRA here'.

  As in `gemma.peft`, every branch of the input stays on the original side
  (a branch that holds only ``'lora'`` becomes an empty branch there) and the
  LoRA side keeps only the paths that lead to a ``'lora'`` key.
  """
  original, lora = {}, {}
  for key, value in node.items():
    if key == _LORA:
      lora[key] = value  # The whole subtree under 'lora' goes to the lora side.
    elif _is_branch(value):
      sub_original, sub_lora = _split(value)
      original[key] = sub_original
      if sub_lora is not None:
        lora[key] = sub_lora
    else:
      original[key] = value
  return _rebuild(node, original), (_rebuild(node, lora) if lora else None)


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


def _array_info(
    x: Any, what: str, path: tuple, fn: str
) -> tuple[tuple[int, ...], Any]:
  shape, dtype = getattr(x, 'shape', None), getattr(x, 'dtype', None)
  if shape is None or dtype is None:
    raise TypeError(
        f'{fn}: {what} at {_path_str(path)!r} must be an array (jax or numpy),'
        f' got {type(x).__name__}.'
    )
  return tuple(shape), dtype


def _check_scale(scale: Any, fn: str) -> Any:
  """Returns `scale` as a float32-or-wider scalar; TypeError / ValueError."""
  accepts = (
      'a real number (int or float) or a scalar float array, e.g. '
      'scale=alpha / rank'
  )
  if isinstance(scale, (bool, np.bool_)) or (
      getattr(scale, 'dtype', None) == np.dtype(bool)
  ):
    raise TypeError(f'{fn}: scale must be {accepts}; got a bool.')
  if isinstance(scale, numbers.Real):
    value = float(scale)
  elif hasattr(scale, 'shape') and hasattr(scale, 'dtype'):
    if not (jnp.issubdtype(scale.dtype, jnp.floating)
            or jnp.issubdtype(scale.dtype, jnp.integer)):
      raise TypeError(
          f'{fn}: scale must be {accepts}; got an array of dtype {scale.dtype}.'
      )
    if tuple(scale.shape) != ():
      raise ValueError(
          f'{fn}: scale must be a scalar, got an array of shape '
          f'{tuple(scale.shape)}; pass one number for the whole tree.'
      )
    try:
      value = float(np.asarray(scale))
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError):
      return scale  # Traced under jit: its value cannot be checked here.
  else:
    raise TypeError(f'{fn}: scale must be {accepts}; got '
                    f'{type(scale).__name__} {scale!r}.')
  if not math.isfinite(value):
    raise ValueError(
        f'{fn}: scale must be finite, got scale={value!r} (it would make '
        'every fused kernel non-finite).'
    )
  return value


def _compute_dtype(kernel_dtype: Any) -> Any:
  """float32, or float64 for float64 kernels when jax runs with x64."""
  return jax.dtypes.canonicalize_dtype(
      jnp.promote_types(kernel_dtype, jnp.float32)
  )


def _lora_delta(kernel: Any, lora: Any, path: tuple, fn: str) -> jax.Array:
  """Returns a @ b in the compute dtype, shaped like `kernel`; validates it."""
  where = _path_str(path)
  if not _is_branch(lora):
    raise TypeError(
        f'{fn}: {where}/lora must be a branch {{"a": A, "b": B}}, got '
        f'{type(lora).__name__}.'
    )
  keys = set(lora.keys())
  allowed = {'a', 'b', 'magnitude'} if fn == 'fuse_params' else {'a', 'b'}
  if not {'a', 'b'} <= keys <= allowed:
    missing = sorted(str(k) for k in {'a', 'b'} - keys)
    extra = sorted(str(k) for k in keys - allowed)
    hint = (' (a DoRA branch cannot be unfused: its fold is not linear;'
            ' keep the split_params trees instead)'
            if 'magnitude' in keys else '')
    raise ValueError(
        f'{fn}: {where}/lora must hold the leaves "a" and "b"'
        f'{" (and a DoRA magnitude)" if fn == "fuse_params" else ""}'
        f' (missing {missing}, unexpected {extra}){hint}.'
    )
  k_shape, k_dtype = _array_info(kernel, 'kernel', path + (_KERNEL,), fn)
  a_shape, a_dtype = _array_info(lora['a'], 'lora a', path + (_LORA, 'a'), fn)
  b_shape, b_dtype = _array_info(lora['b'], 'lora b', path + (_LORA, 'b'), fn)
  if not jnp.issubdtype(k_dtype, jnp.floating):
    raise TypeError(
        f'{fn}: kernel at {where!r} has dtype {k_dtype}; LoRA can only be '
        'fused into a float kernel (fuse before quantizing).'
    )
  for name, dtype in (('a', a_dtype), ('b', b_dtype)):
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f'{fn}: {where}/lora/{name} has dtype {dtype}; LoRA factors must '
          'be float arrays.'
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
  dtype = _compute_dtype(k_dtype)
  a = jnp.asarray(lora['a'], dtype).reshape(
      batch + (math.prod(in_shape), rank)
  )
  b = jnp.asarray(lora['b'], dtype).reshape(
      batch + (rank, math.prod(out_shape))
  )
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return delta.reshape(k_shape)


def _dora_fold(v: jax.Array, lora: Mapping, path: tuple) -> jax.Array:
  """`m * v / ||v||` per output channel (`peft.nnx.dora.fold`)."""
  from peft.nnx import dora  # pylint: disable=g-import-not-at-top
  m = lora['magnitude']
  b_shape = jnp.shape(lora['b'])
  n_batch = len(jnp.shape(lora['a'])) + len(b_shape) - 2 - v.ndim
  out_shape = tuple(b_shape[n_batch + 1:])
  want = tuple(v.shape[:n_batch]) + out_shape
  if tuple(jnp.shape(m)) != want:
    raise ValueError(
        f'fuse_params: {_path_str(path)}/lora/magnitude has shape'
        f' {tuple(jnp.shape(m))}; a DoRA magnitude of this kernel has shape'
        f' {want} (*batch, *out)'
    )
  n_in = v.ndim - n_batch - len(out_shape)
  return dora.fold(v, jnp.asarray(m, v.dtype),
                   tuple(range(n_batch, n_batch + n_in)))


def _scaled(delta: jax.Array, scale: Any) -> jax.Array:
  """`scale * delta`, rounded once in delta's dtype (as in fuse and unfuse)."""
  return delta * jnp.asarray(scale, delta.dtype)


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
    fused = jnp.asarray(kernel, delta.dtype) + _scaled(delta, scale)
    if 'magnitude' in node[_LORA]:  # DoRA: m * (W + s ΔW) / ||W + s ΔW||
      fused = _dora_fold(fused, node[_LORA], path)
    out[_KERNEL] = fused.astype(jax.dtypes.canonicalize_dtype(kernel.dtype))
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
      base = jnp.asarray(kernel, delta.dtype) - _scaled(delta, scale)
      out[_KERNEL] = base.astype(jax.dtypes.canonicalize_dtype(kernel.dtype))
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
  """Splits a params tree into (original params, LoRA params), exactly.

  Every subtree under a key named ``'lora'`` (with the path leading to it) goes
  to the LoRA tree; everything else to the original tree. The layout is the
  one of the original ``gemma.peft``: every branch of the input stays in the
  original tree, so a branch that holds only ``'lora'`` is an empty branch
  there, and empty branches of the input stay on the original side; the LoRA
  tree holds only the paths that lead to a ``'lora'`` key. Both trees then have
  the input's structure minus the other side's leaves, and
  ``merge_params(*split_params(p)) == p`` exactly (no value is touched).

  (Unlike ``gemma.peft``, which drops them, a non-branch ``'lora'`` leaf and
  empty branches inside a ``'lora'`` subtree are kept on the LoRA side, so that
  the round trip is exact for every tree.)

  Examples:
    >>> params = {'dense': {'kernel': 0, 'bias': 1, 'lora': {'a': 0, 'b': 1}},
    ...           'attn': {'lora': {'a': 2, 'b': 3}}, 'other': 0}
    >>> original, lora = split_params(params)
    >>> original
    {'dense': {'kernel': 0, 'bias': 1}, 'attn': {}, 'other': 0}
    >>> lora
    {'dense': {'lora': {'a': 0, 'b': 1}}, 'attn': {'lora': {'a': 2, 'b': 3}}}
    >>> merge_params(original, lora) == params
    True

  Args:
    params: nested mapping (``dict``, ``FrozenDict``, ...) with any leaves.

  Returns:
    ``(original, lora)``, each of the same mapping kind as ``params``.

  Raises:
    TypeError: if ``params`` is not a mapping.
  """
  _check_tree(params, 'params')
  original, lora = _split(params)
  return original, lora if lora is not None else _rebuild(params, {})


def merge_params(original: Params, lora: Params) -> Params:
  """Merges two params trees into one; the exact inverse of `split_params`.

  Branches present in both trees are merged recursively (an empty branch of
  ``original`` takes the LoRA subtree of ``lora``); leaves are shared, never
  copied or changed, so ``merge_params(*split_params(p)) == p`` bit for bit.

  Examples:
    >>> merge_params({'dense': {'kernel': 0}, 'attn': {}},
    ...              {'dense': {'lora': {'a': 1}}, 'attn': {'lora': {'a': 2}}})
    {'dense': {'kernel': 0, 'lora': {'a': 1}}, 'attn': {'lora': {'a': 2}}}

  Args:
    original: nested mapping, e.g. the first tree returned by `split_params`.
    lora: nested mapping, e.g. the second tree returned by `split_params`.

  Returns:
    The union of both trees, of the same mapping kind as ``original``.

  Raises:
    TypeError: if ``original`` or ``lora`` is not a mapping.
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
  whose weight string lists batch, reduced, then output axes). The product,
  its scaling and the sum are computed in float32 (float64 for float64
  kernels under ``jax_enable_x64``) and cast once to the kernel's dtype, so a
  bfloat16 kernel is rounded once, not three times. A DoRA branch (with a
  ``'magnitude'`` ``m`` of shape ``(*batch, *out)``, from ``dora=True``)
  becomes ``m * V / ||V||`` with ``V = K + scale * (A @ B)`` and the norm over
  the ``in`` axes; `unfuse_params` cannot undo that and refuses it.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'dense': {'kernel': jnp.zeros((4, 3)), 'bias': jnp.ones(3),
    ...                     'lora': {'a': jnp.ones((4, 2)),
    ...                              'b': jnp.ones((2, 3))}}}
    >>> fused = fuse_params(params, scale=0.5)
    >>> sorted(fused['dense']), fused['dense']['kernel'][0].tolist()
    (['bias', 'kernel'], [1.0, 1.0, 1.0])

  Args:
    params: params tree holding at least one ``'lora'`` branch.
    scale: a real number (or a scalar float array, also a traced one) that
      multiplies the LoRA product, e.g. ``alpha / rank``; the document's
      default is no scaling (1.0).

  Returns:
    The fused params, same mapping kind as ``params``; non-LoRA leaves shared.

  Raises:
    TypeError: if ``params`` is not a mapping, ``scale`` is not a real number
      or scalar array, a kernel / ``a`` / ``b`` is not an array, a ``'lora'``
      entry is not a branch, or a kernel / factor is not a float array.
    ValueError: if ``params`` has no ``'lora'`` branch, ``scale`` is not
      finite or not a scalar, or a LoRA branch cannot be placed (no kernel,
      missing ``a``/``b``, inconsistent shapes); the message names the
      ``/``-joined path.
  """
  _check_tree(params, 'params')
  scale = _check_scale(scale, 'fuse_params')
  found = []
  fused = _fuse(params, (), scale, found)
  if not found:
    raise ValueError(
        "fuse_params: no 'lora' branch to fuse in params; apply LoRA first or "
        'pass the params tree that holds the "lora" branches.'
    )
  return fused


def unfuse_params(fused: Params, lora: Params, *, scale: float = 1.0) -> Params:
  """Recovers LoRA params from fused ones: `fuse_params` undone up to rounding.

  Every kernel with a LoRA branch in ``lora`` becomes
  ``kernel - scale * (a @ b)`` (computed like `fuse_params`: float32, the
  same scaled product, one cast to the kernel's dtype) and the ``'lora'``
  branches are put back (the very same leaves: exact).

  It is not an exact inverse in floating point: ``fuse_params`` rounded
  ``W + ΔW`` to the kernel dtype, and that rounding cannot be undone. For
  every kernel entry, with ``F = fuse_params(p)`` (finite) and ``u`` the unit
  roundoff of the kernel dtype (``2**-8`` bfloat16, ``2**-11`` float16,
  ``2**-24`` float32) and ``u32 = 2**-24``::

    |unfuse(fuse(W)) - W| <= 2 c (1 + c) / (1 - c) * max(|W|, |F|) + 8 tiny
    c = u32 + u + u32 * u      (c = u32 for a float32 kernel: no cast)

  where ``tiny`` is the kernel dtype's smallest normal number (it only matters
  for subnormal values). That is at most 2 ulps (float32: 4) of
  ``max(|W|, |F|)``: about ``7.9e-3 * max`` in bfloat16 and ``1.2e-7 * max`` in
  float32. Keep the unfused params (`split_params`) when bit-exactness
  matters; split and merge are exact.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'dense': {'kernel': jnp.full((4, 3), 0.1),
    ...                     'lora': {'a': jnp.ones((4, 2)),
    ...                              'b': jnp.full((2, 3), 0.3)}}}
    >>> _, lora = split_params(params)
    >>> back = unfuse_params(fuse_params(params), lora)
    >>> back['dense']['lora']['a'] is lora['dense']['lora']['a']
    True
    >>> bool(jnp.allclose(back['dense']['kernel'], 0.1, rtol=0, atol=1.2e-7))
    True

  Args:
    fused: params returned by `fuse_params`.
    lora: the LoRA tree (the second tree returned by `split_params`).
    scale: must equal the ``scale`` given to `fuse_params` (same rules).

  Returns:
    The unfused params with ``'lora'`` branches, same mapping kind as
    ``fused``.

  Raises:
    TypeError: for arguments of the wrong type (as in `fuse_params`).
    ValueError: if the trees do not match (the message names the path),
      ``lora`` holds no ``'lora'`` branch, or ``scale`` is not finite.
  """
  _check_tree(fused, 'fused')
  _check_tree(lora, 'lora')
  scale = _check_scale(scale, 'unfuse_params')
  if not _has_lora(lora):
    raise ValueError(
        "unfuse_params: no 'lora' branch to unfuse in lora; pass the second "
        'tree returned by split_params.'
    )
  return _unfuse(fused, lora, (), scale)

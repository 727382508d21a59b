"""Several named adapters on one base model: switch, disable, combine, route.

`apply_lora(model, rank=..., name='task_a')` adds a named adapter (a layer
that already has adapters gets one more). Then:

* `set_active_adapters(model, 'a' | ['a', 'b'] | {'a': 0.7, 'b': 0.3})`: the
  layers output the (weighted) sum of the active adapters. The weights live in
  variables, so switching under `nnx.jit` does not retrace, and an adapter of
  weight 0 is skipped at run time (`lax.cond`): it costs no FLOPs.
* `disable_adapters(model)`: a context manager inside which every wrapper
  returns its base layer's output, bit for bit.
* `set_adapter_ids(model, ids)`: example `i` of the next calls goes through
  adapter `list_adapters(model)[ids[i]]` (`-1`: none), from a bank padded to
  the largest rank (zero padding is exact); `ids` may be traced.
* `delete_adapter`, `combine_adapters` (`'cat'` exact, `'linear'`, `'svd'`).

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import peft.nnx as pnnx
  >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
  >>> model = pnnx.apply_lora(model, rank=2, name='a', rngs=nnx.Rngs(1))
  >>> model = pnnx.apply_lora(model, rank=3, name='b', rngs=nnx.Rngs(2))
  >>> pnnx.list_adapters(model)
  ['a', 'b']
  >>> pnnx.set_active_adapters(model, {'a': 0.5, 'b': 0.5})
  >>> with pnnx.disable_adapters(model):
  ...   base = model(jnp.ones((1, 4)))
  >>> bool((base == model.layers[0].wrapped(jnp.ones((1, 4)))).all())
  True
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft.nnx import graph
from peft.nnx.adapter import LoRAAdapter
from peft.nnx.lora import LoRA
from peft.nnx.selection import kind_of

__all__ = [
    'list_adapters',
    'set_active_adapters',
    'disable_adapters',
    'delete_adapter',
    'combine_adapters',
    'set_adapter_ids',
]


def _wrappers(model: Any, action: str) -> list[tuple[str, LoRA]]:
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f'{action}: model must be an nnx.Module, got {type(model).__name__}'
    )
  idx = graph.index(model, kind_of, full=False)
  out = [(graph.path_str(idx.first_path[id(t)]), t) for t in idx.tops
         if isinstance(t, LoRA)]
  if not out:
    raise ValueError(
        f'{action}: the model has no LoRA adapter; call'
        ' apply_lora(model, rank=..., name=..., rngs=...) first'
    )
  return out


def list_adapters(model: Any) -> list[str]:
  """The adapter names of a model, in the order they were first added.

  Examples:
    >>> from flax import nnx
    >>> import peft.nnx as pnnx
    >>> m = pnnx.apply_lora(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))),
    ...                     rank=1, rngs=nnx.Rngs(1))
    >>> pnnx.list_adapters(m)
    ['default']
  """
  names: list[str] = []
  for _, w in _wrappers(model, 'list_adapters'):
    names.extend(n for n in w.adapter_names if n not in names)
  return names


def _as_weights(active: Any, known: Sequence[str]) -> dict[str, float]:
  if isinstance(active, str):
    weights = {active: 1.0}
  elif isinstance(active, Mapping):
    weights = {}
    for k, v in active.items():
      if isinstance(v, bool) or not isinstance(
          v, (int, float, np.integer, np.floating)):
        raise TypeError(
            f'active: the weight of {k!r} must be a real number, got {v!r}')
      if not np.isfinite(v):
        raise ValueError(f'active: the weight of {k!r} must be finite')
      weights[k] = float(v)
  elif isinstance(active, (list, tuple)):
    weights = {k: 1.0 for k in active}
  else:
    raise TypeError(
        'active must be an adapter name, a list of names, or a dict'
        f' {{name: weight}}; got {type(active).__name__}'
    )
  bad = [k for k in weights if not isinstance(k, str) or k not in known]
  if bad:
    raise ValueError(
        f'active names {bad} are not adapters of this model; it has'
        f' {list(known)}'
    )
  return weights


def set_active_adapters(model: Any, active: Any) -> None:
  """Chooses which adapters every wrapper applies, and with which weights.

  Args:
    model: a model with named adapters.
    active: a name, a list of names (summed) or a dict `{name: weight}`
      (weighted sum of their outputs); names not given get weight 0 and are
      skipped at run time. `[]` deactivates every adapter.

  Raises:
    ValueError: a name the model does not have.

  Under `nnx.jit`, calling this between steps with other names or weights
  (same set of adapters in the model) does not retrace: the weights are
  `AdapterWeights` variables. It also ends per-example routing.
  """
  wrappers = _wrappers(model, 'set_active_adapters')
  weights = _as_weights(active, list_adapters(model))
  for _, w in wrappers:
    w.set_weights(weights)


@contextlib.contextmanager
def disable_adapters(model: Any) -> Iterator[Any]:
  """Inside the block the model computes its base output, bit for bit.

  Every LoRA wrapper returns `wrapped(x)` alone (the same float operations as
  without a wrapper); on exit each wrapper is re-enabled as it was.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft.nnx as pnnx
    >>> base = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    >>> m = pnnx.apply_lora(nnx.Sequential(base), rank=1, rngs=nnx.Rngs(1))
    >>> with pnnx.disable_adapters(m):
    ...   same = bool((m(jnp.ones((1, 2))) == base(jnp.ones((1, 2)))).all())
    >>> same
    True
  """
  wrappers = [w for _, w in _wrappers(model, 'disable_adapters')]
  before = [w.enabled for w in wrappers]
  for w in wrappers:
    w.enabled = False
  try:
    yield model
  finally:
    for w, flag in zip(wrappers, before):
      w.enabled = flag


def delete_adapter(model: Any, name: str) -> Any:
  """Removes adapter `name` everywhere; a layer left without one is unwrapped.

  Returns:
    The model (edited in place; the root is returned for chaining).

  Raises:
    ValueError: no layer has an adapter called `name`.
  """
  wrappers = _wrappers(model, 'delete_adapter')
  hits = [w for _, w in wrappers if name in w.adapter_names]
  if not hits:
    raise ValueError(
        f'delete_adapter: no adapter named {name!r}; the model has'
        f' {list_adapters(model)}'
    )
  unwrap = {}
  for w in hits:
    if len(w.adapter_names) == 1:
      unwrap[id(w)] = w.wrapped
    else:
      w.remove_adapter(name)
  return graph.install(model, unwrap)


def set_adapter_ids(model: Any, ids: Any) -> None:
  """Routes example `i` of the next calls through adapter `ids[i]`.

  `ids` is an int array `[batch]` of indices into `list_adapters(model)`
  (`-1`: no adapter for that example). Each wrapper maps the model's index to
  its own adapters (a layer without that adapter adds nothing for that
  example). Works inside `nnx.jit` with traced `ids`; new values of the same
  shape do not retrace. `set_active_adapters` ends the routing.

  Raises:
    TypeError: `ids` is not an integer array.
    ValueError: `ids` is not one-dimensional (eager values are also checked
      against the number of adapters).
  """
  wrappers = _wrappers(model, 'set_adapter_ids')
  names = list_adapters(model)
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f'ids must be an integer array, got dtype {ids.dtype}')
  if ids.ndim != 1:
    raise ValueError(f'ids must have shape [batch], got {ids.shape}')
  if _concrete(ids):
    bad = np.asarray(ids)
    if ((bad < -1) | (bad >= len(names))).any():
      raise ValueError(
          f'ids must be in [-1, {len(names) - 1}] (indices into'
          f' {names}), got {sorted(set(bad.tolist()))}'
      )
  for _, w in wrappers:
    table = jnp.asarray(
        [w.adapter_names.index(n) if n in w.adapter_names else -1
         for n in names] + [-1], jnp.int32)
    # -1 indexes the trailing -1 of the table.
    w.set_ids(table[jnp.where(ids < 0, len(names), ids)])


def _concrete(x) -> bool:
  try:
    np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return False
  return True


def combine_adapters(
    model: Any,
    weights: Mapping[str, float],
    new_name: str,
    *,
    how: str = 'cat',
    rank: int | None = None,
) -> dict[str, float]:
  """Adds adapter `new_name` = a weighted combination of existing adapters.

  Per layer, the target update is `ΔW = sum_i w_i * scale_i * a_i @ b_i`:

  * `'cat'`: exact; `a = [a_1 .. a_n]`, `b = [w_1 s_1 b_1; ..]`, rank
    `sum(r_i)`, scale 1;
  * `'linear'`: equal ranks required; `a = sum_i c_i a_i`, `b = sum_i c_i
    b_i` with `c_i = sqrt(w_i s_i)` (as Hugging Face PEFT; not exact: cross
    terms appear);
  * `'svd'`: `ΔW` re-factored at `rank` (default: the largest rank) from its
    singular value decomposition per batch slice.

  Layers that have none of the named adapters are left alone. The new adapter
  is inactive (weight 0) until `set_active_adapters`.

  Returns:
    `{layer path: relative Frobenius error ||ΔW' - ΔW|| / ||ΔW||}` of the
    new adapter against the exact weighted sum (0 for `'cat'`, up to
    rounding).

  Raises:
    ValueError: unknown names or `how`, `'linear'` with different ranks,
      negative `w_i * s_i` with `'linear'`.
  """
  if how not in ('cat', 'linear', 'svd'):
    raise ValueError(f"how must be 'cat', 'linear' or 'svd', got {how!r}")
  wrappers = _wrappers(model, 'combine_adapters')
  known = list_adapters(model)
  weights = _as_weights(dict(weights), known)
  if not weights:
    raise ValueError('weights must name at least one adapter')
  if new_name in known:
    raise ValueError(f'new_name={new_name!r} is already an adapter name')
  errors = {}
  for path, w in wrappers:
    parts = [(w.adapter(n), c) for n, c in weights.items()
             if n in w.adapter_names]
    if not parts:
      continue
    a, b = _combine(parts, how, rank, path)
    new = w.add_adapter(new_name, rank=a.shape[-1], rngs=nnx.Rngs(0),
                        b_init=nnx.initializers.zeros,
                        a_init=nnx.initializers.zeros)
    new.a[...] = a.astype(new.a.dtype)
    new.b[...] = b.astype(new.b.dtype)
    new.scale[...] = jnp.ones_like(new.scale[...])
    exact = sum(c * ad.delta() for ad, c in parts)
    err = jnp.linalg.norm((new.delta() - exact).ravel())
    norm = jnp.linalg.norm(exact.ravel())
    errors[path] = float(err / norm) if float(norm) > 0 else float(err)
  return errors


def _combine(parts: list[tuple[LoRAAdapter, float]], how: str, rank,
             path: str) -> tuple[jax.Array, jax.Array]:
  g = parts[0][0].geometry
  r_axis_b = len(g.batch) + len(parts[0][0].leading_shape)
  scales = [jnp.asarray(ad.scale[...], jnp.float32) for ad, _ in parts]

  def expand(s, ndim):  # per-slice scale over the factor's axes
    return jnp.reshape(s, s.shape + (1,) * (ndim - s.ndim))

  a_s = [jnp.asarray(ad.a[...], jnp.float32) for ad, _ in parts]
  b_s = [jnp.asarray(ad.b[...], jnp.float32) for ad, _ in parts]
  if how == 'cat':
    a = jnp.concatenate(a_s, axis=-1)
    b = jnp.concatenate(
        [c * expand(s, bi.ndim) * bi for (_, c), s, bi in zip(parts, scales,
                                                              b_s)],
        axis=r_axis_b)
    return a, b
  if how == 'linear':
    ranks = {ad.rank for ad, _ in parts}
    if len(ranks) != 1:
      raise ValueError(
          f"combine_adapters(how='linear') needs equal ranks; {path!r} has"
          f' {sorted(ranks)} (use how=\'cat\' or \'svd\')'
      )
    coef = []
    for (_, c), s in zip(parts, scales):
      cs = c * s
      if bool((cs < 0).any()):
        raise ValueError(
            "combine_adapters(how='linear') needs weight * scale >= 0")
      coef.append(jnp.sqrt(cs))
    a = sum(expand(k, ai.ndim) * ai for k, ai in zip(coef, a_s))
    b = sum(expand(k, bi.ndim) * bi for k, bi in zip(coef, b_s))
    return a, b
  # svd
  rank = rank or max(ad.rank for ad, _ in parts)
  delta = sum(c * ad.delta() for ad, c in parts)
  m = g.to_matrix(delta)
  if rank > min(m.shape[-2:]):
    raise ValueError(
        f'rank={rank} exceeds min(in, out)={min(m.shape[-2:])} at {path!r}')
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  root = jnp.sqrt(s[..., :rank])
  a = u[..., :, :rank] * root[..., None, :]
  b = root[..., :, None] * vt[..., :rank, :]
  lead = parts[0][0].leading_shape
  a_shape, b_shape = g.lora_shapes(rank)
  return (jnp.reshape(a, (*lead, *a_shape)), jnp.reshape(b, (*lead, *b_shape)))

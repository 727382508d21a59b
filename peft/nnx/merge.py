"""Folding LoRA adapters into their base kernels (`merge_lora`).

Examples:
  >>> from flax import nnx
  >>> import peft.nnx as pnnx
  >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  >>> model = pnnx.apply_lora(model, rank=1, rngs=nnx.Rngs(1))
  >>> type(pnnx.merge_lora(model).layers[0]).__name__
  'Linear'
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from peft.nnx import graph
from peft.nnx import quantized as _q
from peft.nnx import registry
from peft.nnx.selection import Selector
from peft.nnx.selection import kind_of
from peft.nnx.selection import select_layers

__all__ = ['merge_lora', 'kernel_variable', 'shallow_clone']


def kernel_variable(layer) -> nnx.Variable | None:
  """The float kernel variable of a float or simulated layer (or None)."""
  if isinstance(layer, _q.SimulateQuantized):
    layer = layer.wrapped
  entry = registry.layer_type(layer)
  var = getattr(layer, entry.kernel, None) if entry else None
  return var if isinstance(var, nnx.Variable) else None


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
    >>> import peft.nnx as pnnx
    >>> model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)))
    >>> model = pnnx.quantize(model, method='int8')
    >>> model = pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
    >>> model = pnnx.merge_lora(model, dequantize=True)  # a float layer again
    >>> type(model.layers[0]).__name__, model.layers[0].kernel.dtype
    ('Linear', dtype('float32'))
  """
  idx, selected = select_layers(
      model,
      where,
      expected_count,
      lambda t, kind: kind == 'lora',
      'merge_lora',
      'have no LoRA adapter',
      full=True,
  )
  plan = []
  for wrapper in selected:
    path = graph.path_str(idx.first_path[id(wrapper)])
    base = wrapper.wrapped
    kind = kind_of(base)
    if kind is None:
      raise TypeError(
          f'merge_lora: the layer wrapped at {path!r} is a'
          f' {type(base).__name__}, which merge_lora cannot fold into.'
      )
    if kind != 'float' and not dequantize:
      raise ValueError(
          f'merge_lora: the base layer at {path!r} is quantized'
          f' ({type(base).__name__}); folding the adapter needs a float kernel.'
          ' Pass dequantize=True to merge into the dequantized kernel (the'
          ' result is a float layer), or keep the adapter separate.'
      )
    kernel = (base.values if kind == 'int4' else kernel_variable(base))
    owners = set(idx.var_owners.get(id(kernel), []))
    base_parents = {p for p, _ in idx.edges.get(id(base), [])}
    if not allow_shared and (len(owners) > 1 or base_parents != {id(wrapper)}):
      users = sorted(
          {
              graph.path_str(idx.first_path[o])
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
    plan.append((wrapper, base, kind))
  if dry_run:
    return [graph.path_str(idx.first_path[id(w)]) for w, _, _ in plan]

  replacements = {}
  for wrapper, base, kind in plan:
    delta = jnp.asarray(wrapper.delta(), jnp.float32)
    if kind == 'float':
      new = shallow_clone(base)
      old = kernel_variable(base)
      old_value = old.get_value()
    elif kind == 'int4':
      new = base.to_float()
      old = kernel_variable(new)
      old_value = old.get_value()
    else:  # simulate: the model computes with the fake-quantized kernel.
      new = shallow_clone(base.wrapped)
      old = kernel_variable(new)
      old_value = base.quantized_kernel()
    if tuple(delta.shape) != tuple(old_value.shape):
      raise ValueError(
          f'merge_lora: adapter delta shape {tuple(delta.shape)} does not match'
          f' kernel shape {tuple(old_value.shape)} at'
          f' {graph.path_str(idx.first_path[id(wrapper)])!r}.'
      )
    dtype = old.get_value().dtype
    merged = (jnp.asarray(old_value, jnp.float32) + delta).astype(dtype)
    setattr(new, registry.layer_type(new).kernel, old.replace(merged))
    replacements[id(wrapper)] = new
  return graph.install(model, replacements)


def shallow_clone(module: Any) -> Any:
  """A new module object holding the same Variable objects as `module`."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, state)  # copy=False: Variables are reused.

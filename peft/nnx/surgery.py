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

Graph walking lives in `peft.nnx.graph`, selection in `peft.nnx.selection`
and the counts in `peft.nnx.summary`; this module re-exports `replace`,
`select`, `summary` and `ParamSummary` so `peft.nnx.surgery` keeps its API.

Every operation takes `where=` (a type, a path regex, a predicate, or None
for every supported layer; see `peft.nnx.selection`), `expected_count=` and
`dry_run=True`; a selector that matches nothing is an error.

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

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peft.nnx import dora as _dora
from peft.nnx import graph
from peft.nnx import lora as _lora
from peft.nnx import quantized as _q
from peft.nnx.adapter import scale_value
from peft.nnx.graph import Path
from peft.nnx.graph import replace
from peft.nnx.merge import kernel_variable
from peft.nnx.merge import merge_lora
from peft.nnx.merge import shallow_clone
from peft.nnx.selection import Selector
from peft.nnx.selection import base_of
from peft.nnx.selection import kind_of
from peft.nnx.selection import select
from peft.nnx.selection import select_layers
from peft.nnx.summary import ParamSummary
from peft.nnx.summary import param_counts
from peft.nnx.summary import summary

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
    name: str | None = None,
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
    name: the adapter's name (see `peft.nnx.adapters`): layers already
      wrapped get one more adapter under `name` (inactive until
      `set_active_adapters`); None keeps the default adapter and skips
      wrapped layers.
    **kwargs: passed to the wrappers (`use_rslora`, `a_init`, `b_init`,
      `dtype`, `param_dtype`, `dropout`, `init='pissa'`, `dora=True`).

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
  pissa = kwargs.get('init') == 'pissa'
  if name is None:  # no name: wrap unwrapped layers (the default adapter)
    eligible = lambda t, kind: kind != 'lora'
    reason = 'already have a LoRA adapter'
  else:  # a named adapter: wrapped layers get one more
    _lora.LoRA.check_name(name)
    eligible = lambda t, kind: kind != 'lora' or name not in t.adapter_names
    reason = f'already have an adapter named {name!r}'
  idx, selected = select_layers(
      model, where, expected_count, eligible, 'apply_lora', reason,
      full=pissa,
  )
  if pissa:
    for t in selected:
      _refuse_shared_kernel(idx, t, None, 'apply_lora(init="pissa")',
                            'PiSSA rewrites the kernel in place, so the other'
                            ' layer would change too')
  if dry_run:
    return [graph.path_str(idx.first_path[id(t)]) for t in selected]
  if rngs is None:
    raise TypeError(
        'apply_lora: rngs is required to initialise the adapters; pass e.g.'
        ' rngs=nnx.Rngs(0).'
    )
  rngs = _as_rngs(rngs)
  scale_value(1, alpha)  # check alpha before building anything
  if name is not None:
    kwargs['name'] = name
    wrapped = [t for t in selected if isinstance(t, _lora.LoRA)]
    if wrapped:
      extra = {k: v for k, v in kwargs.items() if k != 'name'}
      if extra.get('init', 'default') != 'default':
        raise ValueError(
            'apply_lora: init=... applies to new wrappers only; a layer that'
            ' already has adapters gets a default-initialised one')
      extra.pop('init', None)
      for t in wrapped:  # validate everything before the first change
        if name in t.adapter_names:
          raise ValueError(f'apply_lora: name {name!r} is already used')
      for t in wrapped:
        t.add_adapter(name, rank=rank, alpha=alpha, rngs=rngs, **extra)
      selected = [t for t in selected if not isinstance(t, _lora.LoRA)]
      if not selected:
        return model
  groups: dict[Any, list[Any]] = {}
  order = []
  for layer in selected:
    key, parts = _fast_group_key(layer, idx.top_info[id(layer)], kwargs)
    if key is None:
      key = ('slow', id(layer))
    if key not in groups:
      groups[key] = []
      order.append(key)
    groups[key].append((layer, parts))
  replacements = {}
  for key in order:
    group = groups[key]
    cls = _lora.wrapper_class(group[0][0])
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
  return graph.install(model, replacements)


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


def _fast_group_key(layer, kind, kwargs):
  if kind != 'float' or not set(kwargs) <= _FAST_KWARGS:
    return None, None
  if not isinstance(layer, (nnx.Linear, nnx.Einsum, nnx.LinearGeneral)):
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
  value = kernel.get_value()
  # Each adapter follows its own kernel's dtype: the group shares it.
  return ('fast', type(layer), graphdef, tuple(value.shape),
          str(value.dtype)), state


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
    fake = shallow_clone(first)
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


def _quantized_class(base, real: bool) -> type:
  """The thin public class for flax's layers, the generic one otherwise."""
  table = (
      (nnx.Linear, _q.Int4Linear, _q.SimulateQuantizedLinear),
      (nnx.Einsum, _q.Int4Einsum, _q.SimulateQuantizedEinsum),
      (nnx.LinearGeneral, _q.Int4LinearGeneral,
       _q.SimulateQuantizedLinearGeneral),
  )
  float_layer = base.wrapped if isinstance(base, _q.SimulateQuantized) else base
  for layer_type, int4, simulated in table:
    if isinstance(float_layer, layer_type):
      return int4 if real else simulated
  return _q.QuantizedLayer if real else _q.SimulateQuantized


def _quantize_op(
    model, method, where, expected_count, dry_run, real: bool,
    group_size=None, double_quant=False,
) -> Any:
  from peft import quantization as _qz  # pylint: disable=g-import-not-at-top

  method = _qz.QuantizationMethod(method)  # ValueError lists valid names.
  action = 'quantize' if real else 'simulate_quantization'
  ok = ('float', 'simulate') if real else ('float',)
  idx, selected = select_layers(
      model,
      where,
      expected_count,
      lambda t, kind: (kind_of(t.wrapped) if kind == 'lora' else kind) in ok,
      action,
      'already quantized' + ('' if real else ' or simulated'),
      full=real,
  )
  if real:
    for t in selected:
      _refuse_shared_kernel(idx, base_of(t), t, 'quantize',
                            'quantizing one user would silently untie them')
  if dry_run:
    return [graph.path_str(idx.first_path[id(t)]) for t in selected]
  replacements = {}
  for t in selected:
    base = base_of(t)
    cls = _quantized_class(base, real)
    if real:  # from_float also accepts a SimulateQuantized layer.
      new = cls.from_float(base, method=method, group_size=group_size,
                           double_quant=double_quant)
    else:
      new = cls(base, method=method, group_size=group_size,
                double_quant=double_quant)
    # The base object is replaced wherever it appears: at the top level, or as
    # `wrapper.wrapped` inside a LoRA wrapper (which keeps its adapter).
    replacements[id(base)] = new
  model = graph.install(model, replacements)
  for t in selected:  # a DoRA adapter's stored base norms follow the base
    if isinstance(t, _lora.LoRA):
      _dora.refresh_base_norms(t)
  return model


def _refuse_shared_kernel(idx, base, wrapper, action: str, why: str) -> None:
  """Raises when `base`'s kernel is also used by another module."""
  kernel = kernel_variable(base)
  if kernel is None:
    return
  float_layer = base.wrapped if isinstance(base, _q.SimulateQuantized) else (
      base)
  owners = set(idx.var_owners.get(id(kernel), [])) - {id(float_layer)}
  if owners:
    users = sorted(graph.path_str(idx.first_path[o]) for o in owners
                   if o in idx.first_path)
    path = graph.path_str(idx.first_path[id(wrapper or base)])
    raise ValueError(
        f'{action}: the kernel of {path!r} is shared with'
        f' {", ".join(users) or "another module"} (tied weights); {why}.'
        ' Untie them first, or leave this layer out of `where`.'
    )


def simulate_quantization(
    model: Any,
    *,
    method: Any,
    where: Selector = None,
    expected_count: int | None = None,
    dry_run: bool = False,
    group_size: int | None = None,
    double_quant: bool = False,
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
    group_size: INT4 / INT8 / FP8: one scale per `group_size` contracted
      values (None: per output channel); NF4: its block size (None: 64).
    double_quant: NF4 only: 8-bit absmax statistics (bitsandbytes').

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
  return _quantize_op(model, method, where, expected_count, dry_run, False,
                      group_size, double_quant)


def quantize(
    model: Any,
    *,
    method: Any,
    where: Selector = None,
    expected_count: int | None = None,
    dry_run: bool = False,
    group_size: int | None = None,
    double_quant: bool = False,
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
    method: a `QuantizationMethod` or name: `'int4'`, `'int8'`, `'fp8'`,
      `'nf4'`, `'q4_0'`, `'q4_0_transpose'`.
    where: a selector (see the module docstring); `None` = every layer.
    expected_count: if given, the number of layers that must match.
    dry_run: return the list of paths that would change; change nothing.
    group_size: INT4 / INT8 / FP8: one scale per `group_size` contracted
      values (None: per output channel); NF4: its block size (None: 64).
    double_quant: NF4 only: 8-bit absmax statistics (bitsandbytes').

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
  return _quantize_op(model, method, where, expected_count, dry_run, True,
                      group_size, double_quant)


def lora_state(model: Any, name: str | None = None) -> nnx.State:
  """The adapters' parameters only (`nnx.LoRAParam`), as an `nnx.State`.

  This is what to save after LoRA fine-tuning; restore with
  `nnx.update(model, state)` on a model with the same adapters. With `name`,
  only that named adapter's parameters.

  Examples:
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> model = surgery.apply_lora(model, rank=1, rngs=nnx.Rngs(1))
    >>> sorted(surgery.lora_state(model)['layers'][0]['lora'].keys())
    ['a', 'b']
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f'lora_state: model must be an nnx.Module, got {type(model).__name__}'
    )
  if name is None:
    state = nnx.state(model, nnx.LoRAParam)
  else:
    prefixes = adapter_prefixes(model, name)
    keep = lambda path, x: isinstance(x, nnx.LoRAParam) and any(
        tuple(path[:len(p)]) == p for p in prefixes)
    state = nnx.state(model, keep)
  if not jax.tree.leaves(state):
    raise ValueError(
        'lora_state: the model has no nnx.LoRAParam (no adapters); call'
        ' apply_lora(model, rank=..., rngs=...) first.'
    )
  return state


def adapter_prefixes(model, name: str) -> list[tuple]:
  """State paths of adapter `name` in every wrapper (all paths to it).

  Raises:
    ValueError: no wrapper has an adapter called `name`.
  """
  idx = graph.index(model, kind_of, full=False)
  prefixes = []
  for t in idx.tops:
    if isinstance(t, _lora.LoRA) and name in t.adapter_names:
      rel = (('lora',) if name == t.adapter_names[0]
             else ('adapters', name))
      prefixes += [tuple(p) + rel for p in graph.all_paths(idx, id(t))]
  if not prefixes:
    raise ValueError(f'lora_state: no adapter named {name!r} in the model')
  return prefixes

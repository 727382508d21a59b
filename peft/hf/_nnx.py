"""peft.hf for NNX models: wrap the targeted layers, load and collect LoRA."""

from __future__ import annotations

import collections
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft.hf._config import (
    _Module, _factor_matrix_shapes, _factors_from_hf, _nearby, _parse_adapter,
    _raise, _scale,
)
from peft.hf._files import _PREFIX
from peft.hf._fused import _fuse, _fused_slot_count, _split_fused, _split_slot


def _is_nnx(x) -> bool:
  return isinstance(x, nnx.Module)


def _lora_of(layer):
  """The LoRA adapter of a wrapper (has `a`, `b`, `scale`), else None."""
  lora = getattr(layer, 'lora', None)
  if lora is None:
    return None
  a, b = getattr(lora, 'a', None), getattr(lora, 'b', None)
  if isinstance(a, nnx.Variable) and isinstance(b, nnx.Variable):
    return lora
  return None


def _nnx_layers(model) -> dict[str, Any]:
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top
  return dict(surgery.select(model))


def _layer_geometry(layer):
  """The `peft.geometry.Geometry` of one layer (wrapped or not), or None."""
  from peft.nnx import registry  # pylint: disable=g-import-not-at-top
  lora = _lora_of(layer)
  if lora is not None:
    return getattr(lora, 'geometry', None)
  g = getattr(layer, 'geometry', None)  # quantized layers carry theirs
  if g is not None and not callable(g):
    return g
  try:
    return registry.geometry_of(layer)
  except TypeError:
    return None


def _lead_shape(layer, geometry):
  """Stacking axes (nnx.vmap) of an unwrapped layer's kernel, or ()."""
  from peft.nnx import registry  # pylint: disable=g-import-not-at-top
  entry = registry.layer_type(layer)
  kernel = getattr(layer, entry.kernel, None) if entry else None
  if not isinstance(kernel, nnx.Variable):
    return ()
  try:
    return geometry.lead_shape(np.shape(kernel.get_value()))
  except ValueError:
    return ()


def _check_geometry(mod, path, layer, lora, errors) -> bool:
  """Checks `mod` fits `layer` (its adapter `lora`, if any) before wrapping."""
  g = _layer_geometry(layer)
  if g is None:  # checked on the wrapper (after wrapping)
    return lora is None or _check_shapes(mod, path, lora.a.shape,
                                         lora.b.shape, errors)
  if g.batch:
    errors.append(
        f'{_PREFIX}{mod.name}: {path} has kernel batch axes {g.batch!r} (e.g.'
        f' experts) in {g.einsum_str!r}; an HF module holds one 2-D weight:'
        ' map each HF module to a layer without batch axes')
    return False
  if lora is not None:
    return _check_shapes(mod, path, lora.a.shape, lora.b.shape, errors)
  if _lora_of(layer) is not None:  # a new named adapter on a wrapper
    inner = _lora_of(layer)
    lead = tuple(np.shape(inner.scale.get_value()))
  else:
    lead = _lead_shape(layer, g)
  if lead:
    errors.append(
        f'{path}: a layer stacked by nnx.vmap (leading axes {lead}); HF'
        ' adapters hold one module per layer: map them with a key_map onto'
        ' unstacked layers')
    return False
  a_shape, b_shape = g.lora_shapes(mod.rank)
  return _check_shapes(mod, path, a_shape, b_shape, errors)


def _check_stacked(lora, path, errors) -> bool:
  scale = lora.scale.get_value()
  if np.ndim(scale):
    errors.append(
        f'{path}: a layer stacked by nnx.vmap (leading axes {np.shape(scale)});'
        ' HF adapters hold one module per layer: map them with a key_map onto'
        ' unstacked layers')
    return False
  return True


def _adapter_of(layer, adapter_name):
  """The adapter `adapter_name` (None: the first one) of a layer, or None."""
  if adapter_name is None:
    return _lora_of(layer)
  names = getattr(layer, 'adapter_names', ())
  if _lora_of(layer) is None or adapter_name not in names:
    return None
  return layer.adapter(adapter_name)


def _load_nnx(directory, model, key_map, strict, rngs, adapter_name):
  config, modules, errors = _parse_adapter(directory, strict)
  layers = _nnx_layers(model)
  plan: dict[str, _Module] = {}
  pairs, fused = [], collections.defaultdict(dict)
  for name, mod in modules.items():
    path, slot = _split_slot(key_map.jax_path(name))
    if slot is None or path not in layers:
      pairs.append((key_map.jax_path(name), mod))
    else:
      fused[path][slot] = mod
  for path, slots in fused.items():
    mod = _fuse(path, slots, errors)
    count = _fused_slot_count(path, _layer_geometry(layers[path]), errors)
    if mod is not None and count is not None and count != len(slots):
      errors.append(
          f'{path}: {len(slots)} HF modules {mod.name} map to a fused layer'
          f' with {count} slots (its first output axis)')
    elif mod is not None and count is not None:
      pairs.append((path, mod))
  for path, mod in pairs:
    name = mod.name
    if path is None or path not in layers:
      if strict:
        errors.append(
            f'{_PREFIX}{name}: maps to {path!r}, which is no layer of the'
            ' model' + _nearby(path, layers))
      continue
    if path in plan:
      errors.append(f'{_PREFIX}{name}: maps to {path!r}, as {plan[path].name}'
                    ' does')
      continue
    plan[path] = mod
    layer = layers[path]
    lora = _lora_of(layer)
    if lora is not None and not _check_stacked(lora, path, errors):
      continue
    adapter = _adapter_of(layer, adapter_name)
    _check_geometry(mod, path, layer, adapter, errors)
    if adapter is not None and (
        getattr(adapter, 'magnitude', None) is None) != (mod.magnitude is None):
      errors.append(
          f'{path}: already has a{" DoRA" * (mod.magnitude is None)} LoRA'
          f' adapter; the{" DoRA" * (mod.magnitude is not None)} adapter'
          f' {_PREFIX}{name} cannot be loaded into it')
  _raise(errors, directory, f'the {type(model).__name__} model')
  if not plan:
    raise ValueError(f'the adapter {directory!r} maps to no layer of the model')
  # Wrap the layers that have no such adapter yet, one apply_lora per setting
  # (a named adapter on an already wrapped layer is added to its wrapper).
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top
  if rngs is None:
    rngs = nnx.Rngs(0)  # every factor is overwritten below
  groups = collections.defaultdict(list)
  for path, mod in plan.items():
    if _adapter_of(layers[path], adapter_name) is None:
      groups[(mod.rank, mod.alpha, mod.use_rslora,
              mod.magnitude is not None)].append(path)
  was_wrapped = {p for p in plan if _lora_of(layers[p]) is not None}
  name_kw = {} if adapter_name is None else {'name': adapter_name}
  done = []
  try:
    for (rank, alpha, use_rslora, dora), paths in groups.items():
      wanted = set(paths)
      dora_kw = {'dora': True} if dora else {}
      surgery.apply_lora(
          model, rank=rank, alpha=alpha, use_rslora=use_rslora, rngs=rngs,
          **dora_kw,
          where=lambda p, m, wanted=wanted: '/'.join(map(str, p)) in wanted,
          expected_count=len(paths), **name_kw)
      done.extend(paths)
    wrapped = _nnx_layers(model)
    errors = []
    for path, mod in plan.items():
      lora = _adapter_of(wrapped[path], adapter_name)
      if lora is None or not _check_stacked(lora, path, errors):
        if lora is None:
          errors.append(f'{path}: could not be wrapped with LoRA')
        continue
      _check_shapes(mod, path, lora.a.shape, lora.b.shape, errors)
      _check_magnitude(mod, path, lora, errors)
    _raise(errors, directory, f'the {type(model).__name__} model')
  except Exception:
    # Undo: new wrappers give their layer back, added adapters are removed.
    now = _nnx_layers(model)
    unwrap = {id(now[p]) for p in done if p not in was_wrapped}
    for p in done:
      if p in was_wrapped:
        now[p].remove_adapter(adapter_name)
    if unwrap:
      surgery.replace(model, lambda p, m: m.wrapped if id(m) in unwrap else m)
    raise
  for path, mod in plan.items():
    lora = _adapter_of(wrapped[path], adapter_name)
    a, b = _factors_from_hf(mod.lora_a, mod.lora_b, lora.a.shape, lora.b.shape)
    lora.a.set_value(jnp.asarray(a))
    lora.b.set_value(jnp.asarray(b))
    lora.scale.set_value(jnp.full(np.shape(lora.scale.get_value()),
                                  mod.scale, jnp.float32))
    if mod.magnitude is not None:
      lora.magnitude.set_value(jnp.asarray(np.reshape(
          mod.magnitude, np.shape(lora.magnitude.get_value()))))
    for attr, value in (('rank', mod.rank), ('alpha', mod.alpha),
                        ('use_rslora', mod.use_rslora)):
      if hasattr(lora, attr):
        setattr(lora, attr, value)
  return model



def _check_shapes(mod, path, a_shape, b_shape, errors) -> bool:
  (n_in, r), (r_b, n_out) = _factor_matrix_shapes(a_shape, b_shape)
  want = (mod.lora_a.shape[1], mod.rank, mod.lora_b.shape[0])
  ok = (n_in, r, n_out) == want and r_b == r
  if not ok:
    errors.append(
        f'{_PREFIX}{mod.name}: lora_A {tuple(mod.lora_a.shape)} / lora_B'
        f' {tuple(mod.lora_b.shape)} do not fit {path}, whose factors are'
        f' a {tuple(a_shape)} / b {tuple(b_shape)} (in={n_in}, r={r},'
        f' out={n_out})')
  return ok


def _check_magnitude(mod, path, lora, errors) -> bool:
  """A DoRA module's magnitude fits the wrapper's (one per output)."""
  if mod.magnitude is None:
    return True
  have = getattr(lora, 'magnitude', None)
  shape = None if have is None else np.shape(have.get_value())
  if shape is None or int(np.prod(shape)) != mod.magnitude.shape[0]:
    errors.append(
        f'{_PREFIX}{mod.name}: lora_magnitude_vector'
        f' {tuple(mod.magnitude.shape)} does not fit {path} (DoRA magnitude'
        f' {shape})')
    return False
  return True


def _alpha_of(lora, rank: int, scale: float) -> tuple[float, bool]:
  """(alpha, use_rslora) of an NNX adapter whose float32 scale is `scale`."""
  use_rslora = bool(getattr(lora, 'use_rslora', False))
  alpha = getattr(lora, 'alpha', None)
  if alpha is None:
    alpha_ok = np.float32(1.0) == np.float32(scale)
    alpha = math.sqrt(rank) if use_rslora else float(rank)
  else:
    alpha_ok = np.float32(_scale(rank, alpha, use_rslora)) == np.float32(scale)
  if not alpha_ok:  # the scale was changed after construction
    alpha = scale * (math.sqrt(rank) if use_rslora else rank)
  return alpha, use_rslora


def _collect_nnx(model, key_map, adapter_name):
  out = []
  errors = []
  for path, layer in _nnx_layers(model).items():
    lora = _adapter_of(layer, adapter_name)
    if lora is None:
      continue
    if getattr(layer, 'init', None) == 'pissa':
      errors.append(
          f'{path}: a PiSSA adapter (its base kernel holds the residual);'
          ' merge it (peft.nnx.merge_lora) and train a plain LoRA, or save'
          ' the residual base model with it')
      continue
    if not _check_stacked(lora, path, errors):
      continue
    g = getattr(lora, 'geometry', None)
    if g is not None and g.batch:
      errors.append(
          f'{path}: kernel batch axes {g.batch!r} (e.g. experts) in'
          f' {g.einsum_str!r} have no HF LoRA module; save per-expert layers')
      continue
    a, b = np.asarray(lora.a.get_value()), np.asarray(lora.b.get_value())
    magnitude = getattr(lora, 'magnitude', None)
    if magnitude is not None:
      magnitude = np.asarray(magnitude.get_value())
    if key_map.is_fused(path):
      if b.ndim < 3:
        errors.append(f'{path}: a fused layer needs a slot axis in b {b.shape}')
        continue
      parts = [(f'{path}[{c}]', *p)
               for c, p in enumerate(_split_fused(a, b, magnitude))]
    else:
      parts = [(path, a, b, magnitude)]
    scale = float(np.asarray(lora.scale.get_value(), np.float32))
    dropout = getattr(lora, 'dropout', None)
    for slot_path, a, b, magnitude in parts:
      name = key_map.hf_name(slot_path)
      if name is None:
        errors.append(f'{slot_path}: the key_map gives no HF module name')
        continue
      rank = int(a.shape[-1])
      alpha, use_rslora = _alpha_of(lora, rank, scale)
      out.append(dict(name=name, a=a, b=b, rank=rank, alpha=alpha,
                      use_rslora=use_rslora, magnitude=magnitude,
                      dropout=float(getattr(dropout, 'rate', 0.0) or 0.0)))
  return out, errors

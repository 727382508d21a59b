"""peft.hf's public functions: `load_adapter` and `save_adapter`."""

from __future__ import annotations

import collections
import json
import math
import os
import re
import tempfile
from typing import Mapping

import numpy as np

from flax import nnx

from peft.hf._config import _factors_to_hf
from peft.hf._files import (  # noqa: F401  (doctests)
    ADAPTER_CONFIG, ADAPTER_INDEX, ADAPTER_WEIGHTS, _PREFIX, _SHARD,
    _check_directory, _safetensors_numpy, read_adapter_config,
)
from peft.hf._keymaps import KeyMap, MapFn, Rules, _as_key_map
from peft.hf._nnx import _collect_nnx, _is_nnx, _load_nnx
from peft.hf._tree import _collect_tree, _load_tree


def load_adapter(
    directory,
    model_or_params,
    *,
    key_map: KeyMap | Rules | MapFn | None = None,
    strict: bool = True,
    rngs: nnx.Rngs | None = None,
    fold_scale: bool | None = None,
    adapter_name: str | None = None,
):
  """Loads a Hugging Face PEFT LoRA adapter into an NNX model or params tree.

  For an NNX model, the layers the adapter targets are wrapped in place with
  `peft.nnx.apply_lora` (rank, alpha, `use_rslora` and the per-module
  `rank_pattern` / `alpha_pattern` of the config), and the factors are loaded
  (`a = lora_Aᵀ`, `b = lora_Bᵀ`, reshaped row-major to the layer's factor
  shapes, in the file's dtype); layers that already have a LoRA adapter of
  the same rank get the factors and scale loaded into it. Returns the model.
  A DoRA adapter (`use_dora: true`) wraps with `dora=True` and loads each
  `lora_magnitude_vector` into `layer.lora.magnitude`. Modules that a key
  map sends to slots of one fused layer (`path[i]`, e.g. k and v into tunix
  Gemma's `kv_einsum`) load into that layer's one LoRA (see `KeyMap`).

  For a linen params tree (a dict, or `{'params': ...}` variables), returns a
  new tree with `lora: {'a': [in, r], 'b': [r, out]}` beside each targeted
  `kernel` (the document's layout, for `LoRADense` / `LoRAEinsum` through
  `ModuleInterceptor` or for `peft.fuse_params`). The input is not changed.

  Nothing is changed unless everything fits: every key must map to a layer,
  every `target_modules` entry must match a key, and every shape must fit;
  otherwise one `ValueError` lists all problems.

  Args:
    directory: the adapter directory (`adapter_config.json` and
      `adapter_model.safetensors`, or shards with their index).
    model_or_params: an `nnx.Module` or a params tree (nested dicts).
    key_map: HF module name -> JAX path (a `KeyMap`, or its `to_jax` part: a
      list of `(regex, replacement)` or a callable); default: dots as keys.
    strict: `False` skips adapter keys that map to no layer and targets that
      match no key (shape mismatches and unsupported config fields are always
      errors).
    rngs: `nnx.Rngs` for the wrappers' initialisers (the values are
      overwritten; default `nnx.Rngs(0)`). NNX models only.
    fold_scale: params trees only (an NNX wrapper keeps the scale in
      `lora.scale`): `True` (the default) multiplies `b` by the module's
      scale (`alpha / r`), so that the unscaled `LoRADense` and
      `fuse_params(scale=1)` compute what PEFT computes; `False` copies the
      factors bit for bit, and you apply the scale yourself.
    adapter_name: NNX models only: load into the named adapter (see
      `peft.nnx.apply_lora(name=...)`; a layer that is already wrapped gets
      it as one more adapter, inactive until `set_active_adapters`); `None`
      loads into each wrapper's first adapter (`layer.lora`), wrapping
      unwrapped layers.

  Returns:
    The NNX model (changed in place), or the new params tree.

  Raises:
    ValueError: see above; also for config fields that cannot be honoured.
    TypeError: `model_or_params` is neither an NNX module nor a mapping.

  Examples:
    >>> import os, tempfile
    >>> import numpy as np
    >>> import safetensors.numpy
    >>> d = tempfile.mkdtemp()
    >>> _ = open(os.path.join(d, 'adapter_config.json'), 'w').write(
    ...     '{"peft_type": "LORA", "r": 2, "lora_alpha": 4,'
    ...     ' "target_modules": ["fc"]}')
    >>> safetensors.numpy.save_file({
    ...     'base_model.model.fc.lora_A.weight': np.ones((2, 3), np.float32),
    ...     'base_model.model.fc.lora_B.weight': np.ones((5, 2), np.float32)},
    ...     os.path.join(d, 'adapter_model.safetensors'))
    >>> params = {'fc': {'kernel': np.zeros((3, 5), np.float32)}}
    >>> out = load_adapter(d, params)
    >>> out['fc']['lora']['a'].shape, float(out['fc']['lora']['b'][0, 0])
    ((3, 2), 2.0)
  """
  directory = _check_directory(directory)
  if not isinstance(strict, bool):
    raise TypeError(f'strict must be a bool, got {strict!r}')
  km = _as_key_map(key_map, 'to_jax')
  if _is_nnx(model_or_params):
    if fold_scale is not None:
      raise ValueError(
          'fold_scale= is for params trees; an NNX wrapper keeps the scale in'
          ' lora.scale')
    return _load_nnx(directory, model_or_params, km, strict, rngs,
                     adapter_name)
  if isinstance(model_or_params, Mapping):
    if rngs is not None or adapter_name is not None:
      raise ValueError(
          'rngs= and adapter_name= are for NNX models; a params tree needs'
          ' neither')
    fold = True if fold_scale is None else fold_scale
    if not isinstance(fold, bool):
      raise TypeError(f'fold_scale must be a bool, got {fold_scale!r}')
    return _load_tree(directory, model_or_params, km, strict, fold)
  raise TypeError(
      'model_or_params must be an nnx.Module or a linen params dict, got'
      f' {type(model_or_params).__name__}'
  )


def _common(values):
  return collections.Counter(values).most_common(1)[0][0]


def _pattern(entries, field, default):
  """rank_pattern / alpha_pattern: short names where a group agrees."""
  by_short = collections.defaultdict(list)
  for e in entries:
    by_short[e['name'].rsplit('.', 1)[-1]].append(e)
  pattern = {}
  for short, group in sorted(by_short.items()):
    values = {g[field] for g in group}
    if len(values) == 1:
      (v,) = values
      if v != default:
        pattern[short] = v
      continue
    for g in group:
      if g[field] != default:
        pattern[re.escape(g['name'])] = g[field]
  return pattern


def _number(x):
  x = float(x)
  return int(x) if x.is_integer() else x


def _write_atomic(path, write):
  directory = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_adapter(
    directory,
    model_or_params,
    *,
    key_map: KeyMap | Rules | MapFn | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    rslora_as_alpha: bool = False,
    alpha: float | None = None,
    use_rslora: bool = False,
    task_type: str | None = None,
    adapter_name: str | None = None,
) -> None:
  """Writes a Hugging Face PEFT LoRA adapter (safetensors + config).

  `peft.PeftModel.from_pretrained(torch_model, directory)` loads the result
  for the matching PyTorch model. The factors are written in their own dtype
  (`lora_A = aᵀ`, `lora_B = bᵀ` after flattening the factor axes row-major);
  `r`, `lora_alpha`, `use_rslora` come from the adapters, with
  `rank_pattern` / `alpha_pattern` for modules that differ from the most
  common rank / alpha; `target_modules` lists the modules' last names.
  DoRA adapters add their `lora_magnitude_vector` and `use_dora: true` (a
  model with both DoRA and plain LoRA layers is an error); a fused layer of
  the key map is written as one HF module per slot.

  Args:
    directory: where to write (created if needed).
    model_or_params: an NNX model with LoRA wrappers of this library, or a
      linen params tree with `lora: {a, b}` branches (the document's layout,
      e.g. from `peft.split_params`).
    key_map: JAX path -> HF module name (a `KeyMap`, or its `to_hf` part);
      default: slashes as dots.
    base_model_name_or_path: written to the config (the hub id or path of
      the base model PEFT should pair it with).
    overwrite: replace an existing adapter in `directory`.
    rslora_as_alpha: write rsLoRA scales as plain LoRA
      (`lora_alpha * sqrt(r)` with `use_rslora: false`, the same scale), for
      readers that ignore `use_rslora` (llama.cpp's converter).
    alpha: params trees only: the `alpha` their factors are used with
      (`LoRADense(alpha=...)`); `None` means the factors carry the whole
      scale (written as `lora_alpha = r`, scale 1).
    use_rslora: params trees only: `alpha` is used as `alpha / sqrt(r)`.
    task_type: the config's `task_type` (e.g. `'CAUSAL_LM'`); `None` is valid.
    adapter_name: NNX models only: save the adapter of this name (layers
      without it are left out); `None`: each wrapper's first adapter.

  Raises:
    ValueError: no LoRA adapter found, an unmappable path, a stacked layer, a
      PiSSA adapter, or `alpha` given for an NNX model.
    FileExistsError: `directory` already holds an adapter and not
      `overwrite`.

  Examples:
    >>> import tempfile
    >>> import numpy as np
    >>> params = {'fc': {'kernel': np.zeros((3, 5), np.float32),
    ...                  'lora': {'a': np.ones((3, 2), np.float32),
    ...                           'b': np.ones((2, 5), np.float32)}}}
    >>> d = tempfile.mkdtemp()
    >>> save_adapter(d, params, alpha=4)
    >>> cfg = read_adapter_config(d)
    >>> cfg['r'], cfg['lora_alpha'], cfg['target_modules']
    (2, 4, ['fc'])
  """
  directory = _check_directory(directory)
  km = _as_key_map(key_map, 'to_hf')
  if _is_nnx(model_or_params):
    if alpha is not None or use_rslora:
      raise ValueError(
          'alpha= and use_rslora= are for params trees; an NNX model\'s'
          ' adapters carry their own scale (set alpha in apply_lora)')
    entries, errors = _collect_nnx(model_or_params, km, adapter_name)
    what = f'the {type(model_or_params).__name__} model'
  elif isinstance(model_or_params, Mapping):
    if adapter_name is not None:
      raise ValueError('adapter_name= is for NNX models')
    entries, errors = _collect_tree(model_or_params, km, alpha, use_rslora)
    what = 'the params tree'
  else:
    raise TypeError(
        'model_or_params must be an nnx.Module or a linen params dict, got'
        f' {type(model_or_params).__name__}')
  names = collections.Counter(e['name'] for e in entries)
  errors += [f'{n}: {c} layers map to this HF module' for n, c in names.items()
             if c > 1]
  dora = {e.get('magnitude') is not None for e in entries}
  if len(dora) > 1:
    errors.append(
        'some layers have DoRA adapters and some plain LoRA ones; a PEFT'
        ' adapter is all one or the other (use_dora): save them separately'
        ' (adapter_name=) or give every layer DoRA')
  if errors:
    raise ValueError(f'cannot save {what} as a PEFT adapter:\n'
                     + '\n'.join(f'  {e}' for e in errors))
  if not entries:
    raise ValueError(f'{what} has no LoRA adapter to save')
  if rslora_as_alpha or len({e['use_rslora'] for e in entries}) > 1:
    for e in entries:
      if e['use_rslora']:
        e['alpha'] = e['alpha'] * math.sqrt(e['rank'])
        e['use_rslora'] = False
  use_rslora_out = entries[0]['use_rslora']
  r = _common(e['rank'] for e in entries)
  lora_alpha = _common(e['alpha'] for e in entries)
  tensors = {}
  for e in entries:
    lora_a, lora_b = _factors_to_hf(e['a'], e['b'])
    tensors[f'{_PREFIX}{e["name"]}.lora_A.weight'] = lora_a
    tensors[f'{_PREFIX}{e["name"]}.lora_B.weight'] = lora_b
    if e.get('magnitude') is not None:
      tensors[f'{_PREFIX}{e["name"]}.lora_magnitude_vector'] = (
          np.ascontiguousarray(np.reshape(e['magnitude'], (-1,))))
  config = {
      'peft_type': 'LORA',
      'task_type': task_type,
      'base_model_name_or_path': base_model_name_or_path,
      'r': int(r),
      'lora_alpha': _number(lora_alpha),
      'use_rslora': bool(use_rslora_out),
      'rank_pattern': _pattern(entries, 'rank', r),
      'alpha_pattern': {k: _number(v) for k, v in
                        _pattern(entries, 'alpha', lora_alpha).items()},
      'target_modules': sorted({e['name'].rsplit('.', 1)[-1]
                                for e in entries}),
      'lora_dropout': _common(e['dropout'] for e in entries),
      'bias': 'none',
      'fan_in_fan_out': False,
      'init_lora_weights': True,
      'modules_to_save': None,
      'use_dora': dora == {True},
      'inference_mode': True,
  }
  stn = _safetensors_numpy()
  os.makedirs(directory, exist_ok=True)
  existing = [n for n in os.listdir(directory)
              if n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_INDEX)
              or _SHARD.fullmatch(n)]
  if existing and not overwrite:
    raise FileExistsError(
        f'{directory!r} already holds an adapter ({sorted(existing)}); pass'
        ' overwrite=True to replace it')
  for n in existing:
    if n not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
      os.remove(os.path.join(directory, n))  # stale shards / index
  _write_atomic(
      os.path.join(directory, ADAPTER_WEIGHTS),
      lambda p: stn.save_file(tensors, p, metadata={'format': 'pt'}))

  def write_config(p):
    with open(p, 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write('\n')

  _write_atomic(os.path.join(directory, ADAPTER_CONFIG), write_config)

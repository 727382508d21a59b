"""`save_adapter`: only the LoRA parameters and a config, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from peft.checkpoint._atomic import _carry
from peft.checkpoint._atomic import _orbax_save
from peft.checkpoint._atomic import _recover
from peft.checkpoint._atomic import _staging
from peft.checkpoint._atomic import _swap_in
from peft.checkpoint._orbax import _abs
from peft.checkpoint._orbax import _norm
from peft.checkpoint._orbax import _show
from peft.checkpoint._orbax import _version
from peft.checkpoint.config import ADAPTER_CONFIG
from peft.checkpoint.config import ADAPTER_PARAMS
from peft.checkpoint.config import _FORMAT
from peft.checkpoint.config import _FORMAT_VERSION
from peft.checkpoint.config import _adapter_names
from peft.checkpoint.config import _base_method
from peft.checkpoint.config import _json_key
from peft.checkpoint.config import _scale_entry
from peft.checkpoint.config import _weights
from peft.checkpoint.config import _wrappers
from peft.checkpoint.fingerprint import _digests
from peft.checkpoint.fingerprint import _fingerprint

__all__ = ['save_adapter']


def save_adapter(
    directory: Any,
    model: nnx.Module,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
  """Saves only the LoRA adapters of `model`, atomically: params and a config.

  Without `name`, every named adapter of every layer is saved (see
  `peft.nnx.adapters`): per layer and adapter its name, rank, alpha,
  `use_rslora`, scale, DoRA magnitude (if any), parameter dtype and its
  weight in the layer's output (`set_active_adapters`); `load_adapter`
  re-creates them all. With `name`, only that adapter is saved. Per-example
  routing (`set_adapter_ids`) and `disable_adapters` are not saved.

  Writes `directory/lora` (orbax, the `nnx.LoRAParam` state) and
  `directory/adapter_config.json`: rank and alpha (top level when all adapters
  agree, and per target), `use_rslora`, `targets` (the wrapped layers' paths
  as lists of keys), per target its class, kernel shape, base quantization
  `method` and current `scale` (the `LoRAScale` values, restored as saved),
  a sha256 `checksums` entry per saved array, the `base_fingerprint` (paths,
  shapes, dtypes and a sampled checksum of the wrapped layers' params, checked
  by `load_adapter`) and the library `version`. `metadata`
  (JSON-serialisable) is stored under `"metadata"`.

  The write is atomic: everything goes to a hidden directory beside
  `directory` that is renamed into place; an existing `directory` is renamed
  aside first and deleted last (other files in it are carried over). A process
  killed at any moment leaves the previous adapter or the new one, never a
  mix; `load_adapter` reads the previous one if the kill fell between the two
  renames. An existing adapter is an error unless `overwrite=True`. One
  writer per directory at a time. Returns the config dict.

  Examples:
    >>> import tempfile
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    >>> _ = surgery.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    >>> config = save_adapter(tempfile.mkdtemp() + '/adapter', model)
    >>> config['rank'], config['targets'], config['layers'][0]['scale']
    (2, [['layers', 0]], 2.0)
    >>> _ = surgery.apply_lora(model, rank=3, name='b', rngs=nnx.Rngs(2))
    >>> config = save_adapter(tempfile.mkdtemp() + '/adapters', model)
    >>> config['adapters'], [t['rank'] for t in config['layers']]
    (['default', 'b'], [2, 3])
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  if not (metadata is None or isinstance(metadata, dict)):
    raise TypeError(
        f'metadata: expected a JSON-serialisable dict or None, got'
        f' {type(metadata).__name__}'
    )
  directory = _abs(directory)
  wrappers = sorted(_wrappers(model), key=lambda pw: _norm(pw[0]))
  if not wrappers:
    raise ValueError(
        'model: has no LoRA wrappers to save; call'
        ' surgery.apply_lora(model, rank=..., rngs=...) first'
    )
  if name is not None:
    if not isinstance(name, str):
      raise TypeError(f'name: expected an adapter name (str), got {name!r}')
    wrappers = [(p, w) for p, w in wrappers if name in _adapter_names(w)]
    if not wrappers:
      raise ValueError(f'name: the model has no adapter named {name!r}')
  targets, fingerprint = [], []
  state: dict[Any, Any] = {}
  for path, w in wrappers:
    names = (name,) if name is not None else _adapter_names(w)
    weights = dict(zip(_adapter_names(w), _weights(w)))
    for i, n in enumerate(names):
      ad = w.adapter(n) if hasattr(w, 'adapter') else w.lora
      node = state
      for k in path:
        node = node.setdefault(k, {})
      if i:  # the layout of _layout: the first at `lora`, then by name
        node = node.setdefault('adapters', {})
      node['lora' if not i else n] = nnx.to_pure_dict(
          nnx.state(ad, nnx.LoRAParam))
      targets.append({
          'name': n,
          'path': [_json_key(k) for k in path],
          'type': type(w).__name__,
          'base': type(w.wrapped).__name__,
          'method': _base_method(w.wrapped),
          'kernel_shape': [int(d) for d in
                           jax.eval_shape(lambda ad=ad: ad.delta()).shape],
          'rank': int(ad.rank),
          'alpha': None if ad.alpha is None else float(ad.alpha),
          'use_rslora': bool(ad.use_rslora),
          'scale': _scale_entry(ad.scale[...]),
          'weight': weights[n],
          'dora': getattr(ad, 'magnitude', None) is not None,
          'param_dtype': str(np.dtype(ad.a.get_value().dtype)),
      })
    fingerprint.extend(_fingerprint(path, w.wrapped))

  def common(key):
    values = {json.dumps(t[key]) for t in targets}
    return targets[0][key] if len(values) == 1 else None

  methods = sorted({t['method'] for t in targets})
  paths, adapters = [], []
  for t in targets:
    if t['path'] not in paths:
      paths.append(t['path'])
    if t['name'] not in adapters:
      adapters.append(t['name'])
  config = {
      'format': _FORMAT,
      # 1 while each layer holds one adapter: the first release reads it.
      'format_version': 1 if len(paths) == len(targets) else _FORMAT_VERSION,
      'library': 'flax-peft',
      'version': _version(),
      'peft_type': 'lora',
      'rank': common('rank'),
      'alpha': common('alpha'),
      'use_rslora': common('use_rslora'),
      'method': methods[0] if len(methods) == 1 else methods,
      'targets': paths,
      'adapters': adapters,
      'layers': targets,
      'checksums': _digests(state),
      'base_fingerprint': fingerprint,
      'metadata': metadata or {},
  }
  try:  # before anything is written
    json.dumps(config['metadata'], allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f'metadata: must be JSON-serialisable (finite numbers, str, lists,'
        f' dicts): {e}'
    ) from e
  bad_scale = [_show(t['path']) for t in targets
               if not np.all(np.isfinite(np.asarray(
                   t['scale'] if t['scale'] is not None else 0.0)))]
  if bad_scale:
    raise ValueError(
        f'model: the LoRA scale of {bad_scale} is not finite; set a finite'
        ' `layer.lora.scale[...]` before saving'
    )
  text = json.dumps(config, indent=2, allow_nan=False) + '\n'

  _recover(directory)
  params_dir = os.path.join(directory, ADAPTER_PARAMS)
  config_path = os.path.join(directory, ADAPTER_CONFIG)
  exists = os.path.exists(params_dir) or os.path.exists(config_path)
  if exists and not overwrite:
    raise ValueError(
        f'directory: {directory} already holds an adapter; pass'
        ' overwrite=True to replace it or choose a new directory'
    )
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f'directory: {directory} exists and is not a directory')
  staging = _staging(directory)
  try:
    os.makedirs(staging)
    _orbax_save(os.path.join(staging, ADAPTER_PARAMS), state)
    if os.path.isdir(directory):  # keep the user's other files
      _carry(directory, staging, (ADAPTER_PARAMS, ADAPTER_CONFIG))
    tmp_config = os.path.join(staging, ADAPTER_CONFIG)
    with open(tmp_config, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    _swap_in(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return config

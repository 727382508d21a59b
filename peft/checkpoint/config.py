"""The adapter format: `adapter_config.json`, its checks, the wrapped layers.

`layers` has one entry per (layer, named adapter): path, name, rank, alpha,
`use_rslora`, scale, weight, `dora`, `param_dtype`, base method and shapes.
The arrays of a layer's first entry are at `<path>/lora` in the orbax tree,
those of its next entries at `<path>/adapters/<name>` (`_layout`).
`format_version` 1 (the first release) has one entry per layer; 2 is written
only when some layer holds several adapters.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import nnx

from peft.checkpoint._atomic import _resolve
from peft.checkpoint._orbax import Path
from peft.checkpoint._orbax import _abs
from peft.checkpoint._orbax import _load_json
from peft.checkpoint._orbax import _norm

__all__ = [
    'ADAPTER_CONFIG',
    'ADAPTER_PARAMS',
    'adapter_targets',
    'read_adapter_config',
]

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_PARAMS = 'lora'
_FORMAT = 'flax-peft-lora-adapter'
# 1: one adapter per layer (the first release); 2: several adapters on some
# layer (written only then, so one adapter per layer stays readable by 1).
_FORMAT_VERSION = 2


def _wrapper_types() -> tuple[type, ...]:
  from peft.nnx import lora  # pylint: disable=g-import-not-at-top

  base = getattr(lora, 'LoRA', None)  # the one wrapper class all derive from
  if base is not None:
    return (base,)
  return (lora.LoRALinear, lora.LoRAEinsum, lora.LoRALinearGeneral)


def _adapter_names(wrapper: Any) -> tuple[str, ...]:
  return tuple(getattr(wrapper, 'adapter_names', None) or ('default',))


def _base_method(layer: Any) -> str:
  method = getattr(layer, 'method', None)
  if method is None:
    return 'none'
  return str(getattr(method, 'value', method))


def _wrappers(model: Any) -> list[tuple[Path, Any]]:
  """(structured path, wrapper) of every LoRA wrapper, each listed once."""
  types = _wrapper_types()
  return [
      (tuple(path), node)
      for path, node in nnx.iter_graph(model)
      if isinstance(node, types)
  ]


def _weights(wrapper: Any) -> list[float]:
  """Each adapter's weight in the layer's output (the first: 1 by default)."""
  weights = getattr(wrapper, 'adapter_weights', None)
  n = len(_adapter_names(wrapper))
  if weights is None:
    return [1.0] + [0.0] * (n - 1)
  return [float(v) for v in np.asarray(weights.get_value())]


def adapter_targets(model: nnx.Module) -> list[Path]:
  """Paths (tuples of keys) of the LoRA-wrapped layers of `model`.

  Example:

  ```python
  surgery.apply_lora(model, rank=2, where='up', rngs=nnx.Rngs(0))
  adapter_targets(model)   # [('up',)]
  ```

  """
  return sorted((p for p, _ in _wrappers(model)), key=_norm)


def _json_key(k: Any) -> Any:
  if isinstance(k, (str, int)) and not isinstance(k, bool):
    return k
  raise ValueError(
      f'model: path key {k!r} ({type(k).__name__}) cannot be stored in the'
      ' adapter config; only str attribute names and int indices are supported'
  )


def _scale_entry(scale: Any) -> Any:
  """The LoRAScale values for JSON: one float if uniform, else nested lists."""
  values = np.asarray(scale, np.float32)
  if values.size == 0:
    return None
  if values.ndim == 0 or np.all(values == values.reshape(-1)[0]):
    return float(values.reshape(-1)[0])
  return values.tolist()


_LAYER_KEYS = {'path': list, 'rank': int, 'use_rslora': bool, 'method': str}


def read_adapter_config(directory: Any) -> dict[str, Any]:
  """Reads and checks `adapter_config.json` of an adapter from `save_adapter`.

  A damaged (truncated, not JSON) or malformed config is a `ValueError`
  naming the file. After a save killed between its two renames, the previous
  adapter (left aside) is read.

  Examples:
    >>> import tempfile
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> from peft.checkpoint import save_adapter
    >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    >>> _ = surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
    >>> d = tempfile.mkdtemp() + '/adapter'
    >>> _ = save_adapter(d, model)
    >>> read_adapter_config(d)['targets']
    [['layers', 0]]
  """
  root = _resolve(_abs(directory))
  path = os.path.join(root, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise ValueError(
        f'directory: {_abs(directory)} has no {ADAPTER_CONFIG}; is it a'
        ' directory written by save_adapter?'
    )
  config = _load_json(path, 'adapter config')
  if not isinstance(config, dict) or config.get('format') != _FORMAT:
    fmt = config.get('format') if isinstance(config, dict) else None
    raise ValueError(
        f'directory: {path} is not a flax-peft adapter config'
        f' (format={fmt!r})'
    )
  try:
    version = int(config.get('format_version', 0))
  except (TypeError, ValueError):
    version = None
  if version is None or version > _FORMAT_VERSION:
    raise ValueError(
        f'directory: adapter format_version {config.get("format_version")!r}'
        f' in {path} is not supported by this library ({_FORMAT_VERSION});'
        ' upgrade flax-peft'
    )
  layers = config.get('layers')
  problems = []
  if not isinstance(layers, list) or not layers:
    problems.append('"layers" must be a non-empty list')
  else:
    for i, t in enumerate(layers):
      if not isinstance(t, dict):
        problems.append(f'layers[{i}] must be an object')
        continue
      for key, typ in _LAYER_KEYS.items():
        if not isinstance(t.get(key), typ) or (
            typ is int and isinstance(t.get(key), bool)):
          problems.append(f'layers[{i}].{key} must be a {typ.__name__},'
                          f' got {t.get(key)!r}')
      if not isinstance(t.get('alpha'), (int, float, type(None))):
        problems.append(f'layers[{i}].alpha must be a number or null')
      if not isinstance(t.get('name', 'default'), str):
        problems.append(f'layers[{i}].name must be a string')
      for key, types, what in (('weight', (int, float), 'a number'),
                               ('dora', (bool,), 'a bool'),
                               ('param_dtype', (str,), 'a dtype name')):
        if key in t and (not isinstance(t[key], types) or (
            key == 'weight' and isinstance(t[key], bool))):
          problems.append(f'layers[{i}].{key} must be {what},'
                          f' got {t[key]!r}')
    seen = set()
    for i, t in enumerate(layers):
      if isinstance(t, dict) and isinstance(t.get('path'), list):
        pair = (_norm(tuple(t['path'])), t.get('name', 'default'))
        if pair in seen:
          problems.append(f'layers[{i}] repeats adapter {pair[1]!r} of layer'
                          f' {"/".join(pair[0])}')
        seen.add(pair)
  for key, typ in (('checksums', dict), ('base_fingerprint', list)):
    if key in config and not isinstance(config[key], typ):
      problems.append(f'"{key}" must be a {typ.__name__}')
  if problems:
    raise ValueError(
        f'directory: {path} is malformed: ' + '; '.join(problems)
        + '; save the adapter again'
    )
  return config


def _layout(layers: list[dict[str, Any]]) -> list[tuple[str, ...]]:
  """Where each config entry's arrays are, under its layer's path.

  A layer's first entry (in config order) is at `lora`, the next ones at
  `adapters/<name>`: the layout of a wrapper whose adapters were added in
  that order, and the only layout format_version 1 has (one per layer).
  """
  seen, out = set(), []
  for t in layers:
    key = _norm(tuple(t['path']))
    out.append(('adapters', t.get('name', 'default')) if key in seen
               else ('lora',))
    seen.add(key)
  return out

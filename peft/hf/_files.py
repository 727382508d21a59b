"""Adapter files: constants, the config file, the safetensors shards."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 etc. with numpy)
import numpy as np


ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
ADAPTER_INDEX = 'adapter_model.safetensors.index.json'

_PREFIX = 'base_model.model.'
_SHARD = re.compile(r'adapter_model-\d+-of-\d+\.safetensors')
# PEFT's default layer-list names for `layers_to_transform`.
_LAYERS_PATTERNS = ('layers', 'h', 'block', 'blocks', 'layer')

def _safetensors_numpy():
  try:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        'peft.hf reads and writes Hugging Face adapters with the `safetensors`'
        ' package; install it with `pip install safetensors`'
    ) from None
  return safetensors.numpy


def _check_directory(directory) -> str:
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(
        f'directory must be a path (str or os.PathLike), got'
        f' {type(directory).__name__}'
    )
  return os.fspath(directory)


def read_adapter_config(directory) -> dict[str, Any]:
  """The parsed `adapter_config.json` of an adapter directory.

  Args:
    directory: the adapter directory.

  Returns:
    The config as a dict, as PEFT wrote it.

  Raises:
    FileNotFoundError: no `adapter_config.json` in `directory`.
    ValueError: the file is not a JSON object.

  Examples:
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, 'adapter_config.json'), 'w') as f:
    ...   json.dump({'peft_type': 'LORA', 'r': 8}, f)
    >>> read_adapter_config(d)['r']
    8
  """
  directory = _check_directory(directory)
  path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {directory!r} is not a PEFT adapter directory'
        f' (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})'
    )
  with open(path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e})') from None
  if not isinstance(config, dict):
    raise ValueError(f'{path} must hold a JSON object, got {type(config).__name__}')
  return config


def _weight_files(directory: str) -> list[str]:
  """Every safetensors file of the adapter (all shards, in order)."""
  index = os.path.join(directory, ADAPTER_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'{index} has no "weight_map"')
    files = sorted(set(weight_map.values()))
    missing = [n for n in files if not os.path.exists(os.path.join(directory, n))]
    if missing:
      raise ValueError(
          f'{index} lists shards that are not in {directory!r}: {missing}'
      )
    return [os.path.join(directory, n) for n in files]
  single = os.path.join(directory, ADAPTER_WEIGHTS)
  shards = sorted(n for n in os.listdir(directory) if _SHARD.fullmatch(n))
  if shards:
    counts = {n.rsplit('-of-', 1)[1] for n in shards}
    total = int(next(iter(counts)).split('.')[0])
    if len(counts) != 1 or len(shards) != total:
      raise ValueError(
          f'{directory!r} holds the adapter shards {shards} but no'
          f' {ADAPTER_INDEX}; expected {total} shards of one set'
      )
    if os.path.exists(single):
      raise ValueError(
          f'{directory!r} holds both {ADAPTER_WEIGHTS} and the shards'
          f' {shards}; remove the stale one'
      )
    return [os.path.join(directory, n) for n in shards]
  if os.path.exists(single):
    return [single]
  if os.path.exists(os.path.join(directory, 'adapter_model.bin')):
    raise ValueError(
        f'{directory!r} holds adapter_model.bin (a pickled PyTorch file), which'
        ' this library does not read (unpickling runs code); re-save the'
        ' adapter with PEFT\'s save_pretrained(..., safe_serialization=True)'
    )
  raise FileNotFoundError(f'no {ADAPTER_WEIGHTS} in {directory!r}')


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  stn = _safetensors_numpy()
  tensors: dict[str, np.ndarray] = {}
  for path in _weight_files(directory):
    part = stn.load_file(path)
    dup = sorted(set(part) & set(tensors))
    if dup:
      raise ValueError(f'keys {dup} appear in more than one shard ({path})')
    tensors.update(part)
  return tensors

"""The adapter config as PEFT means it, the 2-D factor view, the parsed file."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from peft.hf._files import (
    ADAPTER_CONFIG, _LAYERS_PATTERNS, _PREFIX, _read_tensors,
    read_adapter_config,
)


# init_lora_weights values whose factors only make sense with base weights
# that the initialisation changed (residual / quantized bases).
_BASE_CHANGING_INITS = ('pissa', 'olora', 'corda', 'loftq', 'lora_ga')


def _config_problems(config: Mapping[str, Any]) -> list[str]:
  """Fields of a PEFT config this library cannot honour."""
  problems = []
  peft_type = config.get('peft_type')
  if peft_type != 'LORA':
    problems.append(
        f'peft_type={peft_type!r}: only LoRA adapters ("LORA") can be read')

  def bad(field, ok, why):
    if field in config and not ok(config[field]):
      problems.append(f'{field}={config[field]!r}: {why}')

  bad('bias', lambda v: v in (None, 'none'),
      'LoRA bias training is not supported (only bias="none")')
  bad('lora_bias', lambda v: not v, 'LoRA B biases are not supported')
  bad('modules_to_save', lambda v: not v,
      'fully trained extra modules cannot be loaded into LoRA wrappers;'
      ' load their weights into the base model separately')
  bad('use_qalora', lambda v: not v, 'QA-LoRA is not supported')
  bad('use_bdlora', lambda v: not v, 'BD-LoRA is not supported')
  bad('target_parameters', lambda v: not v,
      'LoRA on raw parameters (target_parameters) is not supported')
  bad('trainable_token_indices', lambda v: not v,
      'trainable tokens are not supported')
  bad('layer_replication', lambda v: not v,
      'layer replication is not supported')
  bad('alora_invocation_tokens', lambda v: not v,
      'activated LoRA (aLoRA) is not supported')
  bad('megatron_config', lambda v: not v, 'Megatron layers are not supported')
  bad('arrow_config', lambda v: not v, 'Arrow routing is not supported')
  bad('loftq_config', lambda v: not v,
      'LoftQ adapters need the LoftQ-quantized base weights')
  init = config.get('init_lora_weights', True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    problems.append(
        f'init_lora_weights={init!r}: the factors belong to a base model that'
        ' this initialisation changed (a residual or quantized base); convert'
        ' the adapter to plain LoRA with PEFT\'s save_pretrained('
        'path_initial_model_for_weight_conversion=...) first')
  for field in ('r', 'lora_alpha'):
    v = config.get(field)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
      problems.append(f'{field}={v!r}: expected a number')
  for field in ('rank_pattern', 'alpha_pattern'):
    v = config.get(field) or {}
    if not isinstance(v, dict):
      problems.append(f'{field}={v!r}: expected a dict')
  return problems


def _pattern_value(patterns: Mapping[str, Any], name: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup (first matching key wins)."""
  for key, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({key})$', name):
      return value
  return default


def _is_targeted(config: Mapping[str, Any], name: str) -> bool:
  """PEFT's target_modules / exclude_modules / layers_to_transform test."""
  exclude = config.get('exclude_modules')
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, name):
        return False
    elif name in exclude or any(name.endswith('.' + e) for e in exclude):
      return False
  targets = config.get('target_modules')
  if targets is None:
    return True  # PEFT filled the defaults in; the keys are the truth
  if isinstance(targets, str):
    return re.fullmatch(targets, name) is not None
  if name in targets:
    return True
  if not any(name.endswith('.' + t) for t in targets):
    return False
  layers = config.get('layers_to_transform')
  if layers is None or layers == []:
    return True
  layers = [layers] if isinstance(layers, int) else list(layers)
  pattern = config.get('layers_pattern') or _LAYERS_PATTERNS
  pattern = [pattern] if isinstance(pattern, str) else list(pattern)
  for p in pattern:
    m = re.match(rf'.*\.{p}\.(\d+)\.', name)
    if m:
      return int(m.group(1)) in layers
  return False


def _target_matches(target: str, name: str) -> bool:
  return name == target or name.endswith('.' + target)


def _scale(rank: int, alpha: float, use_rslora: bool) -> float:
  return float(alpha) / (math.sqrt(rank) if use_rslora else float(rank))


# ---------------------------------------------------------------------------
# factors <-> 2-D matrices (the one place the layer geometry enters)
# ---------------------------------------------------------------------------


def _factor_matrix_shapes(a_shape, b_shape):
  """(in, r), (r, out) of the 2-D matrices behind factors of these shapes.

  The factors of a layer without kernel batch axes are `a: (*contracted, r)`
  and `b: (r, *output)`, the axes in kernel order (`Geometry.lora_shapes`);
  the 2-D `[in, out]` view flattens them row-major, as
  `Geometry.to_matrix` flattens the kernel, which is the split HF models use
  for their `[out, in]` weights (e.g. tunix's `q_proj.w` `[embed, heads,
  head_dim]` is HF's `q_proj.weight` transposed, rows ordered (head, dim)).
  """
  a_shape, b_shape = tuple(a_shape), tuple(b_shape)
  return ((int(np.prod(a_shape[:-1], dtype=np.int64)), a_shape[-1]),
          (b_shape[0], int(np.prod(b_shape[1:], dtype=np.int64))))


def _factors_from_hf(lora_a, lora_b, a_shape, b_shape):
  """HF `lora_A [r, in]`, `lora_B [out, r]` -> `a`, `b` of the given shapes."""
  return (np.reshape(np.ascontiguousarray(lora_a.T), a_shape),
          np.reshape(np.ascontiguousarray(lora_b.T), b_shape))


def _factors_to_hf(a, b):
  """`a (*in, r)`, `b (r, *out)` -> HF `lora_A [r, in]`, `lora_B [out, r]`."""
  (n_in, r), (_, n_out) = _factor_matrix_shapes(a.shape, b.shape)
  return (np.ascontiguousarray(np.reshape(a, (n_in, r)).T),
          np.ascontiguousarray(np.reshape(b, (r, n_out)).T))


# ---------------------------------------------------------------------------
# the adapter as read from disk
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Module:
  name: str
  lora_a: np.ndarray | None = None
  lora_b: np.ndarray | None = None
  rank: int = 0
  alpha: float = 0.0
  use_rslora: bool = False
  magnitude: np.ndarray | None = None  # DoRA: `lora_magnitude_vector [out]`
  scale_rank: int = 0  # the rank the scale uses, if not `rank` (fused)

  @property
  def scale(self) -> float:
    return _scale(self.scale_rank or self.rank, self.alpha, self.use_rslora)


def _parse_adapter(directory: str, strict: bool):
  """Reads and checks config and tensors; returns (config, modules, errors)."""
  config = read_adapter_config(directory)
  problems = _config_problems(config)
  if problems:
    raise ValueError(
        f'{os.path.join(directory, ADAPTER_CONFIG)} asks for what this library'
        ' cannot honour:\n' + '\n'.join(f'  {p}' for p in problems)
    )
  tensors = _read_tensors(directory)
  errors = []
  modules: dict[str, _Module] = {}
  use_dora = bool(config.get('use_dora', False))
  key_re = re.compile(r'(.+)\.(lora_A\.weight|lora_B\.weight|'
                      r'lora_magnitude_vector)')
  for key in sorted(tensors):
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
    m = key_re.fullmatch(name) if name else None
    if m is not None and m.group(2) == 'lora_magnitude_vector':
      if not use_dora:
        errors.append(f'{key}: a DoRA magnitude, but the config says'
                      ' use_dora=false')
        continue
      t = tensors[key]
      if t.ndim != 1:
        errors.append(f'{key}: shape {t.shape} is not 1-D')
        continue
      modules.setdefault(m.group(1), _Module(m.group(1))).magnitude = t
      continue
    if m is None:
      hint = ''
      if 'lora_embedding' in key:
        hint = ' (embedding LoRA is not supported)'
      elif key.endswith('.bias'):
        hint = ' (LoRA biases are not supported)'
      errors.append(f'unsupported key {key!r}{hint}')
      continue
    mod = modules.setdefault(m.group(1), _Module(m.group(1)))
    t = tensors[key]
    if t.ndim != 2:
      errors.append(
          f'{key}: shape {t.shape} is not 2-D (convolution LoRA is not'
          ' supported)')
      continue
    if m.group(2) == 'lora_A.weight':
      mod.lora_a = t
    else:
      mod.lora_b = t
  r, alpha = config['r'], config['lora_alpha']
  use_rslora = bool(config.get('use_rslora', False))
  for name, mod in list(modules.items()):
    if mod.lora_a is None or mod.lora_b is None:
      missing = 'lora_B' if mod.lora_b is None else 'lora_A'
      errors.append(f'{_PREFIX}{name}: has no {missing}.weight')
      del modules[name]
      continue
    if mod.lora_a.shape[0] != mod.lora_b.shape[1]:
      errors.append(
          f'{_PREFIX}{name}: lora_A {mod.lora_a.shape} and lora_B'
          f' {mod.lora_b.shape} disagree on the rank')
      del modules[name]
      continue
    mod.rank = int(mod.lora_a.shape[0])
    if use_dora and mod.magnitude is None:
      errors.append(f'{_PREFIX}{name}: use_dora=true but the file has no'
                    ' lora_magnitude_vector for it')
    elif use_dora and mod.magnitude.shape[0] != mod.lora_b.shape[0]:
      errors.append(
          f'{_PREFIX}{name}: lora_magnitude_vector {mod.magnitude.shape} does'
          f' not match lora_B {mod.lora_b.shape} (one entry per output)')
    want = _pattern_value(config.get('rank_pattern'), name, r)
    if int(want) != mod.rank:
      errors.append(
          f'{_PREFIX}{name}: rank {mod.rank} in the file but {want} in the'
          ' config (r / rank_pattern)')
    mod.alpha = _pattern_value(config.get('alpha_pattern'), name, alpha)
    mod.use_rslora = use_rslora
    if not _is_targeted(config, name):
      errors.append(
          f'{_PREFIX}{name}: not matched by target_modules'
          f'={config.get("target_modules")!r} (PEFT would not load it)')
  targets = config.get('target_modules')
  unmatched = []
  if isinstance(targets, str):
    if not any(re.fullmatch(targets, n) for n in modules):
      unmatched.append(targets)
  elif targets:
    unmatched = [t for t in targets
                 if not any(_target_matches(t, n) for n in modules)]
  if unmatched and strict:
    errors.append(
        f'target_modules {sorted(unmatched)} match no key of the adapter'
        ' (pass strict=False to allow)')
  return config, modules, errors


def _raise(errors, directory, what):
  if errors:
    raise ValueError(
        f'cannot load the adapter {directory!r} into {what} ({len(errors)}'
        ' problem(s); nothing was loaded):\n'
        + '\n'.join(f'  {e}' for e in errors)
    )


def _nearby(path, layers, n=3):
  if path is None:
    return ''
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(path, list(layers), n=n, cutoff=0.6)
  return f' (close: {", ".join(close)})' if close else ''

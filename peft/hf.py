"""Hugging Face PEFT LoRA adapters: read them into JAX models, write them back.

An adapter directory written by PyTorch PEFT's `save_pretrained` holds
`adapter_model.safetensors` (or several shards listed in
`adapter_model.safetensors.index.json`) and `adapter_config.json`. Its keys
are `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
`.lora_B.weight` (`[out, r]`); the update of a PyTorch `[out, in]` weight is
`s * B @ A` with `s = lora_alpha / r` (`lora_alpha / sqrt(r)` with
`use_rslora`), and `rank_pattern` / `alpha_pattern` override `r` and
`lora_alpha` per module. For a JAX `[in, out]` kernel this is `a = Aᵀ`,
`b = Bᵀ`.

* `load_adapter(directory, model_or_params)`: an NNX model gets LoRA wrappers
  on exactly the layers the adapter targets (rank, scale from the config) with
  the factors loaded; a linen params tree comes back as a new tree with
  `lora: {a, b}` branches beside the targeted kernels.
* `save_adapter(directory, model_or_params)`: writes the two files that
  `peft.PeftModel.from_pretrained(torch_model, directory)` reads.

Both are strict: every key of the file, every target of the config and every
shape is checked before anything is changed, and one `ValueError` lists every
problem. Config fields this library cannot honour (`bias`, `modules_to_save`,
`use_dora`, embedding LoRA, PiSSA-style initialisations that change the base
weights, ...) are errors naming the field, never silently dropped. Factors are
copied bit for bit in their own dtype, both ways.

How HF module names map to JAX paths is a `key_map` (see `KeyMap`). The
default reads the module name as the path, dots as keys
(`model.layers.0.self_attn.q_proj` <-> `model/layers/0/self_attn/q_proj`),
which fits `FlaxLlamaForCausalLM`-style params trees and NNX models whose
attribute names are the PyTorch ones.

Reading and writing safetensors needs the `safetensors` package
(`pip install safetensors`).

Examples:
  >>> import tempfile
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import peft.nnx as pnnx
  >>> from peft import hf
  >>> class Block(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.fc1 = nnx.Linear(8, 16, rngs=rngs)
  ...     self.fc2 = nnx.Linear(16, 8, rngs=rngs)
  >>> model = pnnx.apply_lora(Block(nnx.Rngs(0)), rank=2, alpha=4.0,
  ...                         rngs=nnx.Rngs(1))
  >>> model.fc1.lora.b[...] = jnp.ones((2, 16))
  >>> directory = tempfile.mkdtemp()
  >>> hf.save_adapter(directory, model)
  >>> sorted(hf.read_adapter_config(directory)['target_modules'])
  ['fc1', 'fc2']
  >>> fresh = hf.load_adapter(directory, Block(nnx.Rngs(0)))
  >>> type(fresh.fc1).__name__, float(fresh.fc1.lora.scale[...])
  ('LoRALinear', 2.0)
  >>> bool(jnp.all(fresh.fc1.lora.b[...] == 1))
  True
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Mapping, Sequence, Union

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 etc. with numpy)
import numpy as np
from flax import nnx

__all__ = [
    'ADAPTER_CONFIG',
    'ADAPTER_WEIGHTS',
    'ADAPTER_INDEX',
    'KeyMap',
    'TUNIX_LLAMA3',
    'TUNIX_QWEN',
    'read_adapter_config',
    'load_adapter',
    'save_adapter',
]

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
ADAPTER_INDEX = 'adapter_model.safetensors.index.json'

_PREFIX = 'base_model.model.'
_SHARD = re.compile(r'adapter_model-\d+-of-\d+\.safetensors')
# PEFT's default layer-list names for `layers_to_transform`.
_LAYERS_PATTERNS = ('layers', 'h', 'block', 'blocks', 'layer')


# ---------------------------------------------------------------------------
# key maps
# ---------------------------------------------------------------------------

Rules = Sequence[tuple[str, str]]
MapFn = Callable[[str], Union[str, Sequence[Any], None]]


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """How HF module names map to JAX layer paths (and back).

  `to_jax` maps an HF module name (`'model.layers.0.self_attn.q_proj'`) to
  the `/`-joined path of the JAX layer (`'model/layers/0/self_attn/q_proj'`:
  attribute names / list indices for an NNX model, as `peft.nnx.select`
  prints them; dict keys for a params tree, the dict that holds the
  `kernel`). `to_hf` is the inverse, used by `save_adapter`. Each is either
  a list of `(regex, replacement)` rules or a callable:

  * rules are tried in order; the first whose regex `re.search`es the name
    rewrites it with `re.sub(regex, replacement, name, count=1)` (so
    `replacement` may use `\\1` / `\\g<name>`); a name no rule matches keeps
    the default mapping (dots <-> slashes);
  * a callable returns the path (a `/`- or `.`-joined string or a tuple of
    keys), or `None` for "no such layer".

  `load_adapter` also accepts a bare rule list or callable as `key_map`
  (meaning `to_jax`), `save_adapter` a bare one meaning `to_hf`.

  Examples:
    >>> km = KeyMap(to_jax=[(r'^model\\.layers\\.(\\d+)\\.self_attn\\.',
    ...                      r'layers/\\1/attn/')],
    ...             to_hf=[(r'^layers/(\\d+)/attn/',
    ...                     r'model.layers.\\1.self_attn.')])
    >>> km.jax_path('model.layers.3.self_attn.q_proj')
    'layers/3/attn/q_proj'
    >>> km.hf_name('layers/3/attn/q_proj')
    'model.layers.3.self_attn.q_proj'
    >>> KeyMap().jax_path('model.norm')
    'model/norm'
  """

  to_jax: Rules | MapFn | None = None
  to_hf: Rules | MapFn | None = None

  def __post_init__(self):
    for field in ('to_jax', 'to_hf'):
      _check_rules(getattr(self, field), f'KeyMap.{field}')

  def jax_path(self, name: str) -> str | None:
    """The `/`-joined JAX path of HF module `name` (None: no layer)."""
    return _apply_map(self.to_jax, name, '/', 'to_jax')

  def hf_name(self, path: str) -> str | None:
    """The HF module name of the JAX layer at `/`-joined `path`."""
    return _apply_map(self.to_hf, path, '.', 'to_hf')


def _check_rules(rules, what):
  if rules is None or callable(rules):
    return
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(
        f'{what}: expected a list of (regex, replacement) pairs or a callable,'
        f' got {type(rules).__name__}'
    )
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not all(isinstance(r, str) for r in rule)):
      raise TypeError(
          f'{what}: each rule must be a (regex, replacement) pair of strings,'
          f' got {rule!r}'
      )
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f'{what}: {rule[0]!r} is not a valid regex ({e})') from None


#: tunix's NNX Llama3 and Qwen2/Qwen3 models (`tunix.models.llama3`,
#: `tunix.models.qwen2`, `tunix.models.qwen3`): `model.layers.N.self_attn.X`
#: <-> `layers/N/attn/X` (Einsum layers with split head axes: `q_proj.w` is
#: `[embed, heads, head_dim]`, `o_proj.w` `[heads, head_dim, embed]`; the
#: factors reshape row-major, as tunix reshapes the base weights) and
#: `model.layers.N.mlp.X` <-> `layers/N/mlp/X`.
TUNIX_LLAMA3 = KeyMap(
    to_jax=((r'^model\.layers\.(\d+)\.self_attn\.', r'layers/\1/attn/'),
            (r'^model\.layers\.(\d+)\.mlp\.', r'layers/\1/mlp/')),
    to_hf=((r'^layers/(\d+)/attn/', r'model.layers.\1.self_attn.'),
           (r'^layers/(\d+)/mlp/', r'model.layers.\1.mlp.')),
)
TUNIX_QWEN = TUNIX_LLAMA3


def _apply_map(rules, name, sep, what):
  other = '.' if sep == '/' else '/'
  default = name.replace(other, sep)
  if rules is None:
    return default
  if callable(rules):
    out = rules(name)
    if out is None:
      return None
    if isinstance(out, str):
      return out.replace(other, sep) if sep == '/' else out.replace('/', '.')
    try:
      return sep.join(str(k) for k in out)
    except TypeError:
      raise TypeError(
          f'key_map {what}: the callable returned {out!r} for {name!r};'
          ' return a string path, a tuple of keys or None'
      ) from None
  for pattern, repl in rules:
    if re.search(pattern, name):
      out = re.sub(pattern, repl, name, count=1)
      return out.replace(other, sep) if sep == '/' else out.replace('/', '.')
  return default


def _as_key_map(key_map, direction):
  if key_map is None:
    return KeyMap()
  if isinstance(key_map, KeyMap):
    return key_map
  _check_rules(key_map, 'key_map')
  return KeyMap(**{direction: key_map})


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------

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
  bad('use_dora', lambda v: not v, 'DoRA adapters are not supported yet')
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

  @property
  def scale(self) -> float:
    return _scale(self.rank, self.alpha, self.use_rslora)


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
  key_re = re.compile(r'(.+)\.(lora_A|lora_B)\.weight')
  for key in sorted(tensors):
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
    m = key_re.fullmatch(name) if name else None
    if m is None:
      hint = ''
      if 'lora_embedding' in key:
        hint = ' (embedding LoRA is not supported)'
      elif 'lora_magnitude_vector' in key:
        hint = ' (a DoRA magnitude: DoRA is not supported yet)'
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
    if m.group(2) == 'lora_A':
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


# ---------------------------------------------------------------------------
# NNX models
# ---------------------------------------------------------------------------


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
  for name, mod in modules.items():
    path = key_map.jax_path(name)
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
    _check_geometry(mod, path, layer, _adapter_of(layer, adapter_name),
                    errors)
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
      groups[(mod.rank, mod.alpha, mod.use_rslora)].append(path)
  was_wrapped = {p for p in plan if _lora_of(layers[p]) is not None}
  name_kw = {} if adapter_name is None else {'name': adapter_name}
  done = []
  try:
    for (rank, alpha, use_rslora), paths in groups.items():
      wanted = set(paths)
      surgery.apply_lora(
          model, rank=rank, alpha=alpha, use_rslora=use_rslora, rngs=rngs,
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
    for attr, value in (('rank', mod.rank), ('alpha', mod.alpha),
                        ('use_rslora', mod.use_rslora)):
      if hasattr(lora, attr):
        setattr(lora, attr, value)
  return model


def _nearby(path, layers, n=3):
  if path is None:
    return ''
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(path, list(layers), n=n, cutoff=0.6)
  return f' (close: {", ".join(close)})' if close else ''


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
    name = key_map.hf_name(path)
    if name is None:
      errors.append(f'{path}: the key_map gives no HF module name')
      continue
    a, b = np.asarray(lora.a.get_value()), np.asarray(lora.b.get_value())
    rank = int(a.shape[-1])
    scale = float(np.asarray(lora.scale.get_value(), np.float32))
    alpha, use_rslora = _alpha_of(lora, rank, scale)
    dropout = getattr(lora, 'dropout', None)
    out.append(dict(name=name, a=a, b=b, rank=rank, alpha=alpha,
                    use_rslora=use_rslora,
                    dropout=float(getattr(dropout, 'rate', 0.0) or 0.0)))
  return out, errors


# ---------------------------------------------------------------------------
# linen params trees
# ---------------------------------------------------------------------------


def _root_of(params):
  """(prefix, subtree): a `{'params': ...}` variables dict is entered."""
  if isinstance(params, Mapping) and isinstance(params.get('params'), Mapping):
    return ('params',), params['params']
  return (), params


def _tree_layers(tree, want_lora=False):
  """`/`-joined path -> dict for every dict holding a kernel (or lora)."""
  found = {}

  def visit(node, path):
    if not isinstance(node, Mapping):
      return
    lora = node.get('lora')
    has_lora = isinstance(lora, Mapping) and 'a' in lora and 'b' in lora
    if (has_lora if want_lora else 'kernel' in node):
      found['/'.join(path)] = node
    for k, v in node.items():
      if k != 'lora':
        visit(v, path + (str(k),))

  visit(tree, ())
  return found


def _kernel_split(kernel_shape, n_in, n_out):
  """The (in_axes, out_axes) split of a kernel for a 2-D `[in, out]` view."""
  shape = tuple(int(d) for d in kernel_shape)
  for k in range(1, len(shape)):
    if (int(np.prod(shape[:k])) == n_in and int(np.prod(shape[k:])) == n_out):
      return shape[:k], shape[k:]
  return None


def _set_path(tree, keys, value):
  """A copy of `tree` with `tree[keys...] = value` (dicts copied on the path)."""
  if not keys:
    return value
  node = dict(tree)
  node[keys[0]] = _set_path(tree[keys[0]], keys[1:], value)
  return type(tree)(node) if not isinstance(tree, dict) else node


def _get_key(tree, path_keys):
  """The real keys (str or int) of `path_keys` in `tree`."""
  keys, node = [], tree
  for k in path_keys:
    if k not in node and k.isdigit() and int(k) in node:
      k = int(k)
    keys.append(k)
    node = node[k]
  return keys


def _load_tree(directory, params, key_map, strict, fold_scale):
  config, modules, errors = _parse_adapter(directory, strict)
  prefix, root = _root_of(params)
  layers = {}
  for path, node in _tree_layers(root).items():
    layers[path] = node
  plan = {}
  for name, mod in modules.items():
    path = key_map.jax_path(name)
    if path is None or path not in layers:
      if strict:
        errors.append(
            f'{_PREFIX}{name}: maps to {path!r}, which holds no kernel in the'
            ' params tree' + _nearby(path, layers))
      continue
    node = layers[path]
    if 'lora' in node:
      errors.append(f'{path}: already has a lora branch')
      continue
    kernel_shape = np.shape(node['kernel'])
    split = _kernel_split(kernel_shape, mod.lora_a.shape[1],
                          mod.lora_b.shape[0])
    if split is None:
      errors.append(
          f'{_PREFIX}{name}: lora_A {tuple(mod.lora_a.shape)} / lora_B'
          f' {tuple(mod.lora_b.shape)} (in={mod.lora_a.shape[1]},'
          f' out={mod.lora_b.shape[0]}) do not fit the kernel {path}'
          f' {tuple(kernel_shape)}')
      continue
    plan[path] = (mod, split)
  _raise(errors, directory, 'the params tree')
  if not plan:
    raise ValueError(f'the adapter {directory!r} maps to no kernel of the tree')
  out = root
  for path, (mod, (in_axes, out_axes)) in plan.items():
    a, b = _factors_from_hf(mod.lora_a, mod.lora_b, (*in_axes, mod.rank),
                            (mod.rank, *out_axes))
    b = jnp.asarray(b)
    if fold_scale and mod.scale != 1.0:
      b = (b.astype(jnp.float32) * np.float32(mod.scale)).astype(b.dtype)
    keys = _get_key(out, path.split('/'))
    node = dict(_get_node(out, keys))
    node['lora'] = {'a': jnp.asarray(a), 'b': b}
    out = _set_path(out, keys, node)
  if prefix:
    out = _set_path(params, list(prefix), out)
  return out


def _get_node(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _collect_tree(params, key_map, alpha, use_rslora):
  _, root = _root_of(params)
  out, errors = [], []
  for path, node in _tree_layers(root, want_lora=True).items():
    name = key_map.hf_name(path)
    if name is None:
      errors.append(f'{path}: the key_map gives no HF module name')
      continue
    a, b = np.asarray(node['lora']['a']), np.asarray(node['lora']['b'])
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[0]:
      errors.append(
          f'{path}: lora a {a.shape} / b {b.shape} are not (*in, r) / (r, *out)')
      continue
    rank = int(a.shape[-1])
    if alpha is None:  # the factors carry the whole scale: s = 1
      mod_alpha = math.sqrt(rank) if use_rslora else rank
    else:
      mod_alpha = alpha
    out.append(dict(name=name, a=a, b=b, rank=rank, alpha=mod_alpha,
                    use_rslora=use_rslora, dropout=0.0))
  return out, errors


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


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
      'use_dora': False,
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

"""Checkpoints with orbax: LoRA adapters alone, and whole (quantized) models.

* `save_adapter(directory, model)` writes only the LoRA parameters
  (`nnx.LoRAParam`) with orbax plus a small `adapter_config.json` (rank, alpha,
  the wrapped layers' paths, the base layers' quantization method, the library
  version). `load_adapter(directory, base_model)` re-applies the same surgery
  (`apply_lora` on exactly those paths) to a fresh base model and restores the
  parameters strictly: missing or unexpected keys and shape/dtype mismatches
  raise a `ValueError` that lists them; nothing is silently left at its fresh
  initialisation.
* `save_model` / `restore_model`: the full `nnx.State` of a model (float,
  LoRA-wrapped or quantized: int4 values and Q4_0 blocks restore bit-exact)
  restored into an abstract model (`nnx.eval_shape`).
* `save_pytree` / `restore_pytree`: any pytree of arrays, e.g. a linen params
  dict written by `quantize_checkpoint` (int4 kernels + float scales), with
  the same strict key/shape/dtype checks.

Keys are structured paths (tuples of attribute names and list indices, as
`nnx.State` and `jax.tree_util` give them), never built by editing names.

Example:

```python
from peft import checkpoint
from peft.nnx import surgery
surgery.apply_lora(model, rank=8, alpha=16, rngs=nnx.Rngs(0))
...  # fine-tune
checkpoint.save_adapter('/tmp/run/adapter', model)
fresh = checkpoint.load_adapter('/tmp/run/adapter', make_base_model())
```

"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

__all__ = [
    'ADAPTER_CONFIG',
    'ADAPTER_PARAMS',
    'adapter_targets',
    'read_adapter_config',
    'save_adapter',
    'load_adapter',
    'save_model',
    'restore_model',
    'save_pytree',
    'restore_pytree',
]

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_PARAMS = 'lora'
_FORMAT = 'flax-peft-lora-adapter'
_FORMAT_VERSION = 1

Path = tuple[Any, ...]


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _version() -> str:
  import peft  # pylint: disable=g-import-not-at-top

  v = getattr(peft, '__version__', None)
  if v:
    return str(v)
  try:
    return importlib.metadata.version('flax-peft')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.StandardCheckpointer()


def _abs(directory: Any, arg: str = 'directory') -> str:
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(
        f'{arg}: expected a path (str or os.PathLike), got'
        f' {type(directory).__name__}'
    )
  return os.path.abspath(os.fspath(directory))


def _key_name(k: Any) -> Any:
  """The plain key (str or int) of a jax tree path entry."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _norm(path: Path) -> tuple[str, ...]:
  # orbax stores every dict key as a string (an nnx.List index 0 comes back as
  # '0'); compare keys in that normal form.
  return tuple(str(p) for p in path)


def _show(path: Path) -> str:
  return '/'.join(str(p) for p in path) or '<root>'


def _flat(tree: Any) -> dict[Path, Any]:
  """{structured path: leaf} of a pytree (leaves: arrays or array metadata)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
  return tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))


def _compare(
    saved: dict[Path, Any], expected: dict[Path, Any], what: str, fix: str
) -> None:
  """Raises ValueError listing missing/unexpected keys and mismatches."""
  saved_n = {_norm(p): (p, v) for p, v in saved.items()}
  expected_n = {_norm(p): (p, v) for p, v in expected.items()}
  missing = [expected_n[k][0] for k in expected_n if k not in saved_n]
  unexpected = [saved_n[k][0] for k in saved_n if k not in expected_n]
  mismatched = []
  for k in expected_n.keys() & saved_n.keys():
    (path, want), (_, got) = expected_n[k], saved_n[k]
    if _shape_dtype(want) != _shape_dtype(got):
      ws, wd = _shape_dtype(want)
      gs, gd = _shape_dtype(got)
      mismatched.append(
          f'{_show(path)}: checkpoint {gd}{list(gs)}, model {wd}{list(ws)}'
      )
  if not (missing or unexpected or mismatched):
    return
  lines = [f'{what} does not match the model:']
  if missing:
    lines.append(
        f'  missing keys (in the model, not in the checkpoint): '
        f'{sorted(_show(p) for p in missing)}'
    )
  if unexpected:
    lines.append(
        f'  unexpected keys (in the checkpoint, not in the model): '
        f'{sorted(_show(p) for p in unexpected)}'
    )
  if mismatched:
    lines.append(f'  shape/dtype mismatches: {sorted(mismatched)}')
  lines.append(f'  {fix}')
  raise ValueError('\n'.join(lines))


def _saved_metadata(directory: str) -> Any:
  with _checkpointer() as ck:
    md = ck.metadata(directory)
  return getattr(getattr(md, 'item_metadata', md), 'tree', md)


def _write(directory: str, tree: Any, overwrite: bool) -> None:
  if os.path.exists(directory):
    if not overwrite:
      raise ValueError(
          f'directory: {directory} already exists; pass overwrite=True to'
          ' replace it or choose a new directory'
      )
    shutil.rmtree(directory)
  os.makedirs(os.path.dirname(directory) or '.', exist_ok=True)
  with _checkpointer() as ck:
    ck.save(directory, tree)
    ck.wait_until_finished()


def _read(directory: str, target: Any, what: str, fix: str) -> Any:
  if not os.path.isdir(directory):
    raise ValueError(f'directory: no checkpoint at {directory}')
  saved = _flat(_saved_metadata(directory))
  _compare(saved, _flat(target), what, fix)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target
  )
  with _checkpointer() as ck:
    return ck.restore(directory, abstract)


# --------------------------------------------------------------------------
# Whole pytrees and models
# --------------------------------------------------------------------------


def save_pytree(directory: Any, tree: Any, *, overwrite: bool = False) -> str:
  """Saves a pytree of arrays (e.g. linen params) with orbax; returns the path.

  Works for any dtype orbax knows, including `jnp.int4` (a linen checkpoint
  from `quantize_checkpoint` keeps its int4 kernels and float scales exactly).

  Example:

  ```python
  path = save_pytree('/tmp/params', {'Dense_0': {'kernel': k, 'scale': s}})
  params = restore_pytree(path)
  ```

  """
  directory = _abs(directory)
  _write(directory, tree, overwrite)
  return directory


def restore_pytree(directory: Any, target: Any = None) -> Any:
  """Restores a pytree saved by `save_pytree`, strictly against `target`.

  `target` (optional) is a pytree of arrays or `jax.ShapeDtypeStruct`s with the
  expected structure; missing/unexpected keys and shape/dtype mismatches raise
  a `ValueError` listing them. Without `target` the tree is restored as saved
  (dict keys come back as strings, dtypes as saved).

  Example:

  ```python
  params = restore_pytree('/tmp/params', target=jax.eval_shape(init_fn))
  ```

  """
  directory = _abs(directory)
  if target is None:
    if not os.path.isdir(directory):
      raise ValueError(f'directory: no checkpoint at {directory}')
    with _checkpointer() as ck:
      return ck.restore(directory)
  return _read(
      directory, target, f'checkpoint {directory}',
      'pass a target with the structure the checkpoint was saved with.',
  )


def save_model(directory: Any, model: nnx.Module, *, overwrite: bool = False
               ) -> str:
  """Saves the full state of an NNX model (any wrappers, quantized or not).

  Restore it with `restore_model(directory, abstract_model)`. Quantized
  weights (int4 values, packed Q4_0 blocks and their scales) are saved as they
  are stored, so the round trip is bit-exact.

  Example:

  ```python
  save_model('/tmp/q4', surgery.quantize(model, method='q4_0'))
  abstract = nnx.eval_shape(lambda: surgery.quantize(make_model(),
                                                     method='q4_0'))
  model = restore_model('/tmp/q4', abstract)
  ```

  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  return save_pytree(directory, nnx.to_pure_dict(nnx.state(model)),
                     overwrite=overwrite)


def restore_model(directory: Any, model: nnx.Module) -> nnx.Module:
  """Restores a `save_model` checkpoint into `model` (abstract or concrete).

  `model` gives the structure: typically `nnx.eval_shape(lambda: make())`
  after the same surgery. Returns a new concrete model; `model` itself is not
  changed. Strict: differing keys, shapes or dtypes raise `ValueError`.

  Example:

  ```python
  abstract = nnx.eval_shape(lambda: make_model())
  model = restore_model('/tmp/ckpt', abstract)
  ```

  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  graphdef, state = nnx.split(model)
  target = nnx.to_pure_dict(state)
  restored = _read(
      _abs(directory), target, f'model checkpoint {_abs(directory)}',
      'build `model` with the same architecture and surgery as the saved one.',
  )
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------


def _wrapper_types() -> tuple[type, ...]:
  from peft.nnx import lora  # pylint: disable=g-import-not-at-top

  return (lora.LoRALinear, lora.LoRAEinsum, lora.LoRALinearGeneral)


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


def save_adapter(
    directory: Any,
    model: nnx.Module,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Saves only the LoRA adapter of `model`: its params and a JSON config.

  Writes `directory/lora` (orbax, the `nnx.LoRAParam` state) and
  `directory/adapter_config.json`: rank and alpha (top level when all adapters
  agree, and per target), `use_rslora`, `targets` (the wrapped layers' paths
  as lists of keys), the base layers' quantization `method` (`'none'` for
  float), each target's class and kernel shape, and the library `version`.
  `metadata` (JSON-serialisable) is stored under `"metadata"`. An existing
  adapter in `directory` is an error unless `overwrite=True` (which replaces
  only those two entries; other files in `directory` are kept). Returns the
  config dict.

  Example:

  ```python
  config = save_adapter('/tmp/run/adapter', model)
  config['rank'], config['targets'][0]   # 8, ['blocks', 0, 'attn', 'q']
  ```

  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  directory = _abs(directory)
  wrappers = sorted(_wrappers(model), key=lambda pw: _norm(pw[0]))
  if not wrappers:
    raise ValueError(
        'model: has no LoRA wrappers to save; call'
        ' surgery.apply_lora(model, rank=..., rngs=...) first'
    )
  targets = []
  for path, w in wrappers:
    ad = w.lora
    targets.append({
        'path': [_json_key(k) for k in path],
        'type': type(w).__name__,
        'base': type(w.wrapped).__name__,
        'method': _base_method(w.wrapped),
        'kernel_shape': [int(d) for d in
                         jax.eval_shape(lambda ad=ad: ad.delta()).shape],
        'rank': int(ad.rank),
        'alpha': None if ad.alpha is None else float(ad.alpha),
        'use_rslora': bool(ad.use_rslora),
        'scale': float(np.asarray(ad.scale[...]).reshape(-1)[0])
                 if np.asarray(ad.scale[...]).size else None,
    })

  def common(key):
    values = {json.dumps(t[key]) for t in targets}
    return targets[0][key] if len(values) == 1 else None

  methods = sorted({t['method'] for t in targets})
  config = {
      'format': _FORMAT,
      'format_version': _FORMAT_VERSION,
      'library': 'flax-peft',
      'version': _version(),
      'peft_type': 'lora',
      'rank': common('rank'),
      'alpha': common('alpha'),
      'use_rslora': common('use_rslora'),
      'method': methods[0] if len(methods) == 1 else methods,
      'targets': [t['path'] for t in targets],
      'layers': targets,
      'metadata': metadata or {},
  }
  json.dumps(config)  # fail before writing anything if not serialisable
  state = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  params_dir = os.path.join(directory, ADAPTER_PARAMS)
  config_path = os.path.join(directory, ADAPTER_CONFIG)
  if os.path.exists(params_dir) or os.path.exists(config_path):
    if not overwrite:
      raise ValueError(
          f'directory: {directory} already holds an adapter; pass'
          ' overwrite=True to replace it or choose a new directory'
      )
    # Only what save_adapter writes is replaced; other files are kept.
    if os.path.exists(config_path):
      os.remove(config_path)
    if os.path.exists(params_dir):
      shutil.rmtree(params_dir)
  os.makedirs(directory, exist_ok=True)
  _write(params_dir, state, overwrite=False)
  with open(config_path, 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
    f.write('\n')
  return config


def read_adapter_config(directory: Any) -> dict[str, Any]:
  """Reads `adapter_config.json` of an adapter saved by `save_adapter`.

  Example:

  ```python
  read_adapter_config('/tmp/run/adapter')['targets']
  ```

  """
  path = os.path.join(_abs(directory), ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise ValueError(
        f'directory: {_abs(directory)} has no {ADAPTER_CONFIG}; is it a'
        ' directory written by save_adapter?'
    )
  with open(path, encoding='utf-8') as f:
    config = json.load(f)
  if config.get('format') != _FORMAT:
    raise ValueError(
        f'directory: {path} is not a flax-peft adapter config'
        f' (format={config.get("format")!r})'
    )
  if int(config.get('format_version', 0)) > _FORMAT_VERSION:
    raise ValueError(
        f'directory: adapter format_version {config["format_version"]} is'
        f' newer than this library supports ({_FORMAT_VERSION}); upgrade'
        ' flax-peft'
    )
  return config


def _layers_by_path(model: Any) -> dict[tuple[str, ...], tuple[Path, Any]]:
  return {
      _norm(tuple(p)): (tuple(p), node)
      for p, node in nnx.iter_graph(model)
      if isinstance(node, nnx.Module)
  }


def _apply(model: Any, layers: Sequence[dict[str, Any]], rngs: nnx.Rngs) -> Any:
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top

  groups: dict[tuple[Any, ...], set[tuple[str, ...]]] = {}
  for t in layers:
    key = (t['rank'], t['alpha'], t['use_rslora'])
    groups.setdefault(key, set()).add(_norm(tuple(t['path'])))
  for (rank, alpha, use_rslora), paths in groups.items():
    surgery.apply_lora(
        model, rank=rank, alpha=alpha, use_rslora=use_rslora,
        where=lambda path, module, paths=paths: _norm(tuple(path)) in paths,
        expected_count=len(paths), rngs=rngs,
    )
  return model


def load_adapter(
    directory: Any,
    base_model: nnx.Module,
    *,
    rngs: nnx.Rngs | None = None,
    check_method: bool = True,
) -> nnx.Module:
  """Re-applies a saved adapter's surgery to `base_model` and restores it.

  `apply_lora` is applied (in place) to exactly the saved target paths with
  the saved rank / alpha / use_rslora, then the LoRA parameters are restored
  from orbax. Strict: every check runs before the model is touched, and
  targets missing from the model, missing or unexpected parameter keys and
  shape/dtype mismatches raise one `ValueError` listing them all. With
  `check_method`, a base layer whose quantization method differs from the one
  the adapter was trained on (e.g. float vs `q4_0`) is an error too. `rngs`
  only seeds the (overwritten) initial values; default `nnx.Rngs(0)`.
  Returns `base_model`.

  Example:

  ```python
  model = load_adapter('/tmp/run/adapter', make_base_model())
  ```

  """
  if not isinstance(base_model, nnx.Module):
    raise TypeError(
        f'base_model: expected an nnx.Module, got {type(base_model).__name__}'
    )
  if rngs is None:
    rngs = nnx.Rngs(0)
  elif not isinstance(rngs, nnx.Rngs):
    raise TypeError(f'rngs: expected nnx.Rngs, got {type(rngs).__name__}')
  directory = _abs(directory)
  config = read_adapter_config(directory)
  layers = config['layers']

  # 1. The targets exist, are not wrapped yet, and have the saved base.
  present = _layers_by_path(base_model)
  wrapper_types = _wrapper_types()
  problems = []
  for t in layers:
    key = _norm(tuple(t['path']))
    if key not in present:
      problems.append(f'{_show(t["path"])}: no such layer in base_model')
      continue
    _, layer = present[key]
    if isinstance(layer, wrapper_types):
      problems.append(f'{_show(t["path"])}: already has a LoRA adapter')
    elif check_method and _base_method(layer) != t['method']:
      problems.append(
          f'{_show(t["path"])}: adapter trained on a base with method'
          f' {t["method"]!r}, this base layer has {_base_method(layer)!r}'
          f' ({type(layer).__name__})'
      )
  if problems:
    raise ValueError(
        f'load_adapter: {directory} does not fit base_model:\n  '
        + '\n  '.join(problems)
        + '\n  build the same base model (same surgery: quantize /'
        ' simulate_quantization first if the adapter was trained on one),'
        ' or pass check_method=False to ignore quantization methods.'
    )

  # 2. Dry run on an abstract copy: the keys and shapes apply_lora creates.
  graphdef, state = nnx.split(base_model)

  def build():
    m = nnx.merge(graphdef, state, copy=True)
    return _apply(m, layers, nnx.Rngs(0))

  abstract = nnx.eval_shape(build)
  expected = nnx.to_pure_dict(nnx.state(abstract, nnx.LoRAParam))
  params_dir = os.path.join(directory, ADAPTER_PARAMS)
  saved = _flat(_saved_metadata(params_dir))
  _compare(
      saved, _flat(expected), f'adapter {directory}',
      'load it onto the base model it was trained with.',
  )

  # 3. The real surgery and restore.
  _apply(base_model, layers, rngs)
  lora = nnx.state(base_model, nnx.LoRAParam)
  restored = _read(params_dir, nnx.to_pure_dict(lora), f'adapter {directory}',
                   'load it onto the base model it was trained with.')
  nnx.replace_by_pure_dict(lora, restored)
  nnx.update(base_model, lora)
  return base_model

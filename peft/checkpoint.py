"""Checkpoints with orbax: LoRA adapters alone, and whole (quantized) models.

* `save_adapter(directory, model)` writes, atomically, only the LoRA
  parameters (`nnx.LoRAParam`) with orbax plus a small `adapter_config.json`
  (rank, alpha, each adapter's `LoRAScale`, the wrapped layers' paths, the
  base layers' quantization method, sha256 checksums of the arrays, a
  fingerprint of the base, the library version).
  `load_adapter(directory, base_model)` re-applies the same surgery
  (`apply_lora` on exactly those paths) to a fresh base model and restores the
  parameters and scales strictly, after reading and checking everything:
  damaged files, checksum mismatches, missing or unexpected keys and
  shape/dtype mismatches raise a `ValueError` (naming the file or listing the
  keys) and leave the model untouched; a base that differs from the recorded
  fingerprint gives a `BaseMismatchWarning` (`strict=True`: `ValueError`).
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

import hashlib
import importlib.metadata
import json
import os
import shutil
from typing import Any, Sequence
import uuid
import warnings

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
    'BaseMismatchWarning',
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


def _damaged(path: str, error: BaseException,
             what: str = 'checkpoint') -> ValueError:
  return ValueError(
      f'directory: {what} file {path} is damaged or truncated'
      f' ({type(error).__name__}: {error}); save it again (the model was not'
      ' changed)'
  )


def _load_json(path: str, what: str) -> Any:
  """json.load of `path`; a damaged file is a ValueError naming it."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _damaged(path, e, what) from e
  except OSError as e:
    raise ValueError(f'directory: cannot read {what} file {path}: {e}') from e


# orbax writes these as JSON; each is parsed before orbax reads it, so a
# damaged one is reported by name instead of as a raw JSONDecodeError.
_ORBAX_JSON = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding')


def _check_orbax_files(directory: str) -> None:
  if not os.path.isfile(os.path.join(directory, '_METADATA')):
    raise ValueError(
        f'directory: {directory} is not a complete orbax checkpoint (no'
        ' _METADATA file); save it again'
    )
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      if name in _ORBAX_JSON or os.path.basename(root) == 'array_metadatas':
        _load_json(path, 'orbax checkpoint')


def _guarded(directory: str, fn: Any) -> Any:
  """Runs an orbax read; any failure is a ValueError naming `directory`."""
  _check_orbax_files(directory)
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'directory: cannot read the orbax checkpoint {directory}'
        f' ({type(e).__name__}: {e}); it is damaged or was not written by'
        ' this library (the model was not changed)'
    ) from e


def _saved_metadata(directory: str) -> Any:
  def read():
    with _checkpointer() as ck:
      md = ck.metadata(directory)
    return getattr(getattr(md, 'item_metadata', md), 'tree', md)
  return _guarded(directory, read)


def _restore(directory: str, abstract: Any = None) -> Any:
  def read():
    with _checkpointer() as ck:
      return ck.restore(directory, abstract)
  return _guarded(directory, read)


# --------------------------------------------------------------------------
# Atomic replacement of a checkpoint directory
# --------------------------------------------------------------------------
#
# A checkpoint directory `parent/name` is written into `parent/.name.peft-new-*`
# and renamed into place. An existing one is first renamed aside to
# `parent/.name.peft-old-*`, then the new one is renamed in, then the old one
# is deleted. A process killed at any moment leaves `parent/name` whole (old or
# new), or -- between the two renames -- no `parent/name` and the old one
# aside: readers then read the one aside (`_resolve`), and the next save puts
# it back before doing anything else (`_recover`). One writer per directory.


def _leftovers(directory: str, kind: str) -> list[str]:
  parent, name = os.path.split(directory)
  prefix = f'.{name}.peft-{kind}-'
  try:
    entries = os.listdir(parent or '.')
  except FileNotFoundError:
    return []
  found = []
  for entry in entries:
    if entry.startswith(prefix):
      path = os.path.join(parent, entry)
      try:
        found.append((os.path.getmtime(path), path))
      except OSError:  # removed meanwhile
        pass
  return [path for _, path in sorted(found, reverse=True)]


def _resolve(directory: str) -> str:
  """`directory`, or the previous version a killed save left aside."""
  if os.path.isdir(directory):
    return directory
  aside = [p for p in _leftovers(directory, 'old') if os.path.isdir(p)]
  return aside[0] if aside else directory


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _recover(directory: str) -> None:
  """Finishes what a killed save left: the old version back, leftovers gone."""
  if not os.path.exists(directory):
    aside = [p for p in _leftovers(directory, 'old') if os.path.isdir(p)]
    if aside:
      os.rename(aside[0], directory)
  for path in _leftovers(directory, 'old') + _leftovers(directory, 'new'):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.remove(path)
      except OSError:
        pass


def _carry(src: str, dst: str, skip: Sequence[str]) -> None:
  """Hard-links (or copies) the entries of `src` not in `skip` into `dst`."""
  for entry in os.listdir(src):
    if entry in skip or os.path.exists(os.path.join(dst, entry)):
      continue
    s, d = os.path.join(src, entry), os.path.join(dst, entry)
    if os.path.isdir(s) and not os.path.islink(s):
      def link(a, b):
        try:
          os.link(a, b)
        except OSError:
          shutil.copy2(a, b)
      shutil.copytree(s, d, symlinks=True, copy_function=link)
    elif os.path.islink(s):
      os.symlink(os.readlink(s), d)
    else:
      try:
        os.link(s, d)
      except OSError:
        shutil.copy2(s, d)


def _swap_in(staging: str, directory: str) -> None:
  """Renames `staging` to `directory`, replacing it atomically if it exists."""
  parent = os.path.dirname(directory)
  _fsync_dir(staging)
  if os.path.exists(directory):
    aside = os.path.join(
        parent, f'.{os.path.basename(directory)}.peft-old-{uuid.uuid4().hex}')
    os.rename(directory, aside)
    os.rename(staging, directory)
    _fsync_dir(parent)
    shutil.rmtree(aside, ignore_errors=True)
  else:
    os.rename(staging, directory)
    _fsync_dir(parent)


def _staging(directory: str) -> str:
  """A fresh, not yet existing path beside `directory` to write into."""
  parent = os.path.dirname(directory)
  os.makedirs(parent or '.', exist_ok=True)
  return os.path.join(
      parent, f'.{os.path.basename(directory)}.peft-new-{uuid.uuid4().hex}')


def _orbax_save(directory: str, tree: Any) -> None:
  with _checkpointer() as ck:
    ck.save(directory, tree)
    ck.wait_until_finished()


def _write(directory: str, tree: Any, overwrite: bool) -> None:
  _recover(directory)
  if os.path.exists(directory) and not overwrite:
    raise ValueError(
        f'directory: {directory} already exists; pass overwrite=True to'
        ' replace it or choose a new directory'
    )
  staging = _staging(directory)
  try:
    _orbax_save(staging, tree)  # orbax creates the directory itself
    _swap_in(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _read(directory: str, target: Any, what: str, fix: str) -> Any:
  directory = _resolve(directory)
  if not os.path.isdir(directory):
    raise ValueError(f'directory: no checkpoint at {directory}')
  saved = _flat(_saved_metadata(directory))
  _compare(saved, _flat(target), what, fix)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target
  )
  return _restore(directory, abstract)


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
  directory = _resolve(_abs(directory))
  if target is None:
    if not os.path.isdir(directory):
      raise ValueError(f'directory: no checkpoint at {directory}')
    return _restore(directory)
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


class BaseMismatchWarning(UserWarning):
  """`load_adapter` found a base model that differs from the adapter's base.

  The adapter's `adapter_config.json` records a fingerprint of the layers it
  was trained on (paths, shapes, dtypes and a checksum of a sample of their
  values); loading onto a base whose fingerprint differs issues this warning
  (or raises `ValueError` with `strict=True`). Filter it by class.

  Examples:
    >>> issubclass(BaseMismatchWarning, UserWarning)
    True
  """


_SAMPLE = 1024  # values per array in the base fingerprint's checksum


def _sample_checksum(x: Any) -> float | None:
  """float64 weighted sum of a strided sample of `x` (None if abstract)."""
  if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, 'shape'):
    return None
  n = int(np.prod(x.shape, dtype=np.int64))
  if n == 0:
    return 0.0
  stride = max(1, n // _SAMPLE)
  try:
    if isinstance(x, jax.Array) and not (
        len(x.devices()) == 1 and next(iter(x.devices())).platform == 'cpu'
    ):
      # Sample on the device: only ~1024 values travel to the host.
      sample = np.asarray(jax.device_get(jax.numpy.ravel(x)[::stride]))
    else:  # numpy, or a CPU array numpy reads without a copy
      sample = np.ravel(np.asarray(x))[::stride]
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None  # traced: no values
  values = sample.astype(np.float64)
  values = np.where(np.isfinite(values), values, 0.0)
  weights = 1.0 + np.arange(values.size) % 7
  with np.errstate(over='ignore', invalid='ignore'):
    total = float(np.sum(values * weights))
  return total if np.isfinite(total) else None  # None: not compared


def _fingerprint(path: Path, layer: Any) -> list[dict[str, Any]]:
  """Paths, shapes, dtypes and checksums of the variables of a base layer."""
  from peft.nnx.lora import LoRAScale  # pylint: disable=g-import-not-at-top

  # Every variable of the base layer (float kernels and biases, quantized
  # storage and scales), not the adapter's and not RNG state.
  state = nnx.state(layer, nnx.Not(nnx.Any(nnx.LoRAParam, LoRAScale,
                                           nnx.RngState)))
  out = []
  for sub, leaf in sorted(_flat(nnx.to_pure_dict(state)).items(),
                          key=lambda kv: _norm(kv[0])):
    shape, dtype = _shape_dtype(leaf)
    out.append({
        'path': [_json_key(k) for k in tuple(path) + tuple(sub)],
        'shape': list(shape),
        'dtype': dtype,
        'checksum': _sample_checksum(leaf),
    })
  return out


def _fingerprint_diff(saved: list[dict[str, Any]],
                      current: list[dict[str, Any]]) -> list[str]:
  want = {_norm(tuple(e['path'])): e for e in saved}
  have = {_norm(tuple(e['path'])): e for e in current}
  diffs = []
  for k in sorted(want.keys() - have.keys()):
    diffs.append(f'{_show(k)}: in the adapter\'s base, not in this one')
  for k in sorted(have.keys() - want.keys()):
    diffs.append(f'{_show(k)}: in this base, not in the adapter\'s')
  for k in sorted(want.keys() & have.keys()):
    w, h = want[k], have[k]
    if (w.get('shape'), w.get('dtype')) != (h['shape'], h['dtype']):
      diffs.append(f'{_show(k)}: adapter\'s base {w.get("dtype")}'
                   f'{w.get("shape")}, this base {h["dtype"]}{h["shape"]}')
    elif (isinstance(w.get('checksum'), (int, float))
          and h.get('checksum') is not None
          and not np.isclose(w['checksum'], h['checksum'], rtol=1e-9,
                             atol=1e-30)):
      diffs.append(f'{_show(k)}: values differ (checksum {w["checksum"]!r}'
                   f' saved, {h["checksum"]!r} now)')
  return diffs


def _leaf_digest(x: Any) -> str:
  a = np.ascontiguousarray(np.asarray(x))
  h = hashlib.sha256()
  h.update(f'{a.dtype.str}{a.shape}'.encode())
  h.update(a.tobytes())
  return 'sha256:' + h.hexdigest()


def _digests(tree: Any) -> dict[str, str]:
  return {_show(p): _leaf_digest(v) for p, v in _flat(tree).items()}


def _scale_entry(scale: Any) -> Any:
  """The LoRAScale values for JSON: one float if uniform, else nested lists."""
  values = np.asarray(scale, np.float32)
  if values.size == 0:
    return None
  if values.ndim == 0 or np.all(values == values.reshape(-1)[0]):
    return float(values.reshape(-1)[0])
  return values.tolist()


def save_adapter(
    directory: Any,
    model: nnx.Module,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
  """Saves only the LoRA adapter of `model`, atomically: params and a config.

  With several named adapters per layer (`peft.nnx.adapters`), pass `name` to
  save that adapter; `load_adapter` re-creates it under the same name.

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
  several = [f'{_show(p)}: {list(_adapter_names(w))}' for p, w in wrappers
             if len(_adapter_names(w)) > 1 and name is None]
  if several:
    raise ValueError(
        'model: save_adapter saves one adapter per layer, and these layers'
        ' hold several named adapters: ' + '; '.join(several[:5])
        + ('; ...' if len(several) > 5 else '')
        + '; pass name=... to save one of them, or keep one per layer'
        ' (peft.nnx.delete_adapter, combine_adapters)'
    )
  targets, fingerprint = [], []
  state: dict[Any, Any] = {}
  for path, w in wrappers:
    ad = w.adapter(name) if name is not None else w.lora
    node = state
    for k in path:
      node = node.setdefault(k, {})
    node['lora'] = nnx.to_pure_dict(nnx.state(ad, nnx.LoRAParam))
    targets.append({
        'name': name if name is not None else _adapter_names(w)[0],
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
    })
    fingerprint.extend(_fingerprint(path, w.wrapped))

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
  for key, typ in (('checksums', dict), ('base_fingerprint', list)):
    if key in config and not isinstance(config[key], typ):
      problems.append(f'"{key}" must be a {typ.__name__}')
  if problems:
    raise ValueError(
        f'directory: {path} is malformed: ' + '; '.join(problems)
        + '; save the adapter again'
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
    name = t.get('name')
    key = (t['rank'], t['alpha'], t['use_rslora'],
           None if name in (None, 'default') else name)
    groups.setdefault(key, set()).add(_norm(tuple(t['path'])))
  for (rank, alpha, use_rslora, name), paths in groups.items():
    named = {} if name is None else {'name': name}
    surgery.apply_lora(
        model, rank=rank, alpha=alpha, use_rslora=use_rslora,
        where=lambda path, module, paths=paths: _norm(tuple(path)) in paths,
        expected_count=len(paths), rngs=rngs, **named,
    )
  return model


def _saved_scales(layers: Sequence[dict[str, Any]], abstract: Any,
                  config_path: str) -> dict[tuple[str, ...], np.ndarray]:
  """{target: LoRAScale values} from the config, shaped like the model's."""
  wrappers = {_norm(p): w for p, w in _wrappers(abstract)}
  out, problems = {}, []
  for t in layers:
    key = _norm(tuple(t['path']))
    value = t.get('scale')
    if value is None or key not in wrappers:
      continue
    shape = tuple(wrappers[key].lora.scale.get_value().shape)
    try:
      arr = np.asarray(value, np.float32)
      if not np.all(np.isfinite(arr)):
        raise ValueError('not finite')
      out[key] = np.broadcast_to(arr, shape).copy()
    except (TypeError, ValueError) as e:
      problems.append(f'{_show(t["path"])}: scale {value!r} does not fit the'
                      f' adapter\'s scale of shape {list(shape)} ({e})')
  if problems:
    raise ValueError(f'directory: {config_path} is malformed: '
                     + '; '.join(problems))
  return out


def load_adapter(
    directory: Any,
    base_model: nnx.Module,
    *,
    rngs: nnx.Rngs | None = None,
    check_method: bool = True,
    strict: bool = False,
) -> nnx.Module:
  """Re-applies a saved adapter's surgery to `base_model` and restores it.

  `apply_lora` is applied (in place) to exactly the saved target paths with
  the saved rank / alpha / use_rslora, then the LoRA parameters and each
  adapter's saved `LoRAScale` are restored. Everything is read and checked
  before the model is touched, so on any error `base_model` is unchanged:
  a damaged or truncated file is a `ValueError` naming it; arrays whose
  sha256 differs from the config's are an error; targets missing from the
  model, missing or unexpected parameter keys and shape/dtype mismatches raise
  one `ValueError` listing them all. With `check_method`, a base layer whose
  quantization method differs from the one the adapter was trained on (e.g.
  float vs `q4_0`) is an error too. A base whose params differ from the
  recorded fingerprint (other shapes, dtypes or values) issues a
  `BaseMismatchWarning`, or raises `ValueError` with `strict=True` (adapters
  saved without a fingerprint load without this check). `rngs` only seeds
  the (overwritten) initial values; default `nnx.Rngs(0)`. Returns
  `base_model`.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from peft.nnx import surgery
    >>> make = lambda: nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    >>> model = surgery.apply_lora(make(), rank=2, rngs=nnx.Rngs(1))
    >>> model.layers[0].lora.b[...] = jnp.ones((2, 4))
    >>> d = tempfile.mkdtemp() + '/adapter'
    >>> _ = save_adapter(d, model)
    >>> loaded = load_adapter(d, make())
    >>> bool(jnp.all(loaded(jnp.ones((1, 4))) == model(jnp.ones((1, 4)))))
    True
  """
  if not isinstance(base_model, nnx.Module):
    raise TypeError(
        f'base_model: expected an nnx.Module, got {type(base_model).__name__}'
    )
  if rngs is None:
    rngs = nnx.Rngs(0)
  elif not isinstance(rngs, nnx.Rngs):
    raise TypeError(f'rngs: expected nnx.Rngs, got {type(rngs).__name__}')
  for name, flag in (('check_method', check_method), ('strict', strict)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f'{name}: expected a bool, got {type(flag).__name__}')
  requested = _abs(directory)
  config = read_adapter_config(requested)
  directory = _resolve(requested)
  config_path = os.path.join(directory, ADAPTER_CONFIG)
  layers = config['layers']

  # 1. The targets exist, are not wrapped yet, and have the saved base.
  present = _layers_by_path(base_model)
  wrapper_types = _wrapper_types()
  problems, current = [], []
  for t in layers:
    key = _norm(tuple(t['path']))
    if key not in present:
      problems.append(f'{_show(t["path"])}: no such layer in base_model')
      continue
    path, layer = present[key]
    if isinstance(layer, wrapper_types):
      problems.append(f'{_show(t["path"])}: already has a LoRA adapter')
      continue
    if check_method and _base_method(layer) != t['method']:
      problems.append(
          f'{_show(t["path"])}: adapter trained on a base with method'
          f' {t["method"]!r}, this base layer has {_base_method(layer)!r}'
          f' ({type(layer).__name__})'
      )
    current.extend(_fingerprint(path, layer))
  if problems:
    raise ValueError(
        f'load_adapter: {requested} does not fit base_model:\n  '
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
  scales = _saved_scales(layers, abstract, config_path)

  # 3. Read every array before the first mutation (and verify it).
  fix = 'load it onto the base model it was trained with.'
  restored = _read(os.path.join(directory, ADAPTER_PARAMS), expected,
                   f'adapter {requested}', fix)
  saved_digests = config.get('checksums')
  if saved_digests is not None:
    got = _digests(restored)
    bad = sorted(k for k in got if saved_digests.get(k) != got[k])
    if bad or set(saved_digests) != set(got):
      raise ValueError(
          f'directory: the arrays in {os.path.join(directory, ADAPTER_PARAMS)}'
          f' do not match the checksums in {config_path} ({bad or "keys"});'
          ' the adapter is damaged: save it again (the model was not changed)'
      )

  # 4. The base fingerprint (adapters saved before it existed: skipped);
  #    only entries under the configured targets count.
  if 'base_fingerprint' in config:
    targets = [_norm(tuple(t['path'])) for t in layers]
    saved_fp = [e for e in config['base_fingerprint']
                if isinstance(e, dict) and isinstance(e.get('path'), list)
                and any(_norm(tuple(e['path']))[:len(t)] == t
                        for t in targets)]
    diffs = _fingerprint_diff(saved_fp, current)
    if diffs:
      shown = diffs[:10] + ([f'... and {len(diffs) - 10} more']
                            if len(diffs) > 10 else [])
      msg = (f'load_adapter: base_model differs from the base the adapter'
             f' {requested} was trained on:\n  ' + '\n  '.join(shown))
      if strict:
        raise ValueError(msg + '\n  load it onto the base it was trained on'
                         ' (strict=True).')
      warnings.warn(BaseMismatchWarning(
          msg + '\n  outputs will differ from the trained model; pass'
          ' strict=True to make this an error.'), stacklevel=2)

  # 5. The real surgery, the restore and the saved scales.
  _apply(base_model, layers, rngs)
  lora = nnx.state(base_model, nnx.LoRAParam)
  nnx.replace_by_pure_dict(lora, restored)
  nnx.update(base_model, lora)
  for p, w in _wrappers(base_model):
    if _norm(p) in scales:
      w.lora.scale[...] = jax.numpy.asarray(scales[_norm(p)])
  return base_model

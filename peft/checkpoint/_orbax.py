"""Reading orbax checkpoints strictly: paths, key comparison, damaged files.

Small helpers shared by the checkpoint modules: structured tree paths,
the strict key/shape/dtype comparison, and orbax reads that turn any
failure into a `ValueError` naming the directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any

import jax
import numpy as np

Path = tuple[Any, ...]


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

"""Atomic replacement of a checkpoint directory, and strict pytree I/O."""

from __future__ import annotations

import os
import shutil
from typing import Any, Sequence
import uuid

import jax

from peft.checkpoint._orbax import _checkpointer
from peft.checkpoint._orbax import _compare
from peft.checkpoint._orbax import _flat
from peft.checkpoint._orbax import _restore
from peft.checkpoint._orbax import _saved_metadata


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

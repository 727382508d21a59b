"""`load_adapter`: re-apply a saved adapter's surgery and restore it strictly."""

from __future__ import annotations

import os
from typing import Any, Sequence
import warnings

import jax
import numpy as np
from flax import nnx

from peft.checkpoint._atomic import _read
from peft.checkpoint._atomic import _resolve
from peft.checkpoint._orbax import Path
from peft.checkpoint._orbax import _abs
from peft.checkpoint._orbax import _norm
from peft.checkpoint._orbax import _show
from peft.checkpoint.config import ADAPTER_CONFIG
from peft.checkpoint.config import ADAPTER_PARAMS
from peft.checkpoint.config import _base_method
from peft.checkpoint.config import _wrapper_types
from peft.checkpoint.config import _wrappers
from peft.checkpoint.config import read_adapter_config
from peft.checkpoint.fingerprint import BaseMismatchWarning
from peft.checkpoint.fingerprint import _digests
from peft.checkpoint.fingerprint import _fingerprint
from peft.checkpoint.fingerprint import _fingerprint_diff

__all__ = ['load_adapter']


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
    >>> from peft.checkpoint import save_adapter
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

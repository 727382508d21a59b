"""`load_adapter`: re-apply a saved adapter's surgery and restore it strictly."""

from __future__ import annotations

import os
from typing import Any, Sequence
import warnings

import jax
import numpy as np
from flax import nnx

from peft.checkpoint._atomic import _resolve
from peft.checkpoint._orbax import Path
from peft.checkpoint._orbax import _abs
from peft.checkpoint._orbax import _compare
from peft.checkpoint._orbax import _flat
from peft.checkpoint._orbax import _restore
from peft.checkpoint._orbax import _saved_metadata
from peft.checkpoint._orbax import _norm
from peft.checkpoint._orbax import _show
from peft.checkpoint.config import ADAPTER_CONFIG
from peft.checkpoint.config import ADAPTER_PARAMS
from peft.checkpoint.config import _adapter_names
from peft.checkpoint.config import _base_method
from peft.checkpoint.config import _layout
from peft.checkpoint.config import _wrapper_types
from peft.checkpoint.config import _weights
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


def _apply(model: Any, creates: Sequence[tuple[dict[str, Any], int, bool]],
           rngs: nnx.Rngs) -> Any:
  """Creates the adapters `(entry, order, wrap)`: wrapping or adding one.

  All adapters of `order` 0 first (a layer's first adapter wraps it), then
  those of order 1, ...: each layer gets its adapters in the saved order.
  Also runs under `nnx.eval_shape` (the dry run).
  """
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top

  groups: dict[tuple[Any, ...], set[tuple[str, ...]]] = {}
  for t, order, wrap in creates:
    name = t.get('name')
    if wrap and name in (None, 'default'):
      name = None  # as the first release: the default adapter
    key = (order, wrap, t['rank'], t['alpha'], t['use_rslora'], name,
           bool(t.get('dora', False)), t.get('param_dtype'))
    groups.setdefault(key, set()).add(_norm(tuple(t['path'])))
  for key in sorted(groups, key=lambda k: k[0]):
    _, _, rank, alpha, use_rslora, name, dora, param_dtype = key
    paths = groups[key]
    kwargs: dict[str, Any] = {} if name is None else {'name': name}
    if dora:
      kwargs['dora'] = True
    if param_dtype is not None:
      kwargs['param_dtype'] = jax.numpy.dtype(param_dtype)
    surgery.apply_lora(
        model, rank=rank, alpha=alpha, use_rslora=use_rslora,
        where=lambda path, module, paths=paths: _norm(tuple(path)) in paths,
        expected_count=len(paths), rngs=rngs, **kwargs,
    )
  return model


def _at(tree: Any, keys: Sequence[Any]) -> Any:
  """The subtree of `tree` (restored by orbax: str keys) at `keys`."""
  for k in keys:
    tree = {str(kk): v for kk, v in tree.items()}[str(k)]
  return tree


def _saved_scale(t: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
  value = t.get('scale')
  try:
    arr = np.asarray(value, np.float32)
    if not np.all(np.isfinite(arr)):
      raise ValueError('not finite')
    return np.broadcast_to(arr, shape).copy()
  except (TypeError, ValueError) as e:
    raise ValueError(
        f'{_show(t["path"])}: scale {value!r} does not fit the adapter\'s'
        f' scale of shape {list(shape)} ({e})') from e


def _plan(layers, present, model_names, check_method):
  """Which entries wrap / add / restore in place; problems; base fingerprint."""
  wrapper_types = _wrapper_types()
  problems, current, creates, seen = [], [], [], set()
  created: dict[tuple[str, ...], int] = {}
  for t in layers:
    key = _norm(tuple(t['path']))
    if key not in present:
      problems.append(f'{_show(t["path"])}: no such layer in base_model')
      continue
    path, layer = present[key]
    wrapper = isinstance(layer, wrapper_types)
    base = layer.wrapped if wrapper else layer
    name = t.get('name', 'default')
    if check_method and _base_method(base) != t['method']:
      problems.append(
          f'{_show(t["path"])}: adapter trained on a base with method'
          f' {t["method"]!r}, this base layer has {_base_method(base)!r}'
          f' ({type(base).__name__})'
      )
    if key not in seen:
      current.extend(_fingerprint(path, base))
      seen.add(key)
    if wrapper and name in _adapter_names(layer):
      continue  # restored in place
    order = created.get(key, 0)
    created[key] = order + 1
    wrap = not wrapper and order == 0
    if t.get('dora') and not wrap:
      problems.append(
          f'{_show(t["path"])}: DoRA adapter {name!r} can only be a layer\'s'
          ' first adapter; load it into a layer without adapters')
    creates.append((t, order, wrap))
  saved_paths: dict[str, set[tuple[str, ...]]] = {}
  for t in layers:
    saved_paths.setdefault(t.get('name', 'default'), set()).add(
        _norm(tuple(t['path'])))
  for name, paths in saved_paths.items():
    if name in model_names and model_names[name] != paths:
      problems.append(
          f'adapter name clash: base_model already has an adapter {name!r}'
          f' on {sorted(_show(p) for p in model_names[name])}, the'
          f' checkpoint has it on {sorted(_show(p) for p in paths)};'
          f' delete_adapter(base_model, {name!r}) first, or load into a'
          ' fresh base model')
  return problems, current, creates


def _entry_adapter(model: Any, t: dict[str, Any]) -> Any:
  _, w = _layers_by_path(model)[_norm(tuple(t['path']))]
  return w.adapter(t.get('name', 'default')) if hasattr(w, 'adapter') else (
      w.lora)


def load_adapter(
    directory: Any,
    base_model: nnx.Module,
    *,
    rngs: nnx.Rngs | None = None,
    check_method: bool = True,
    strict: bool = False,
    name: str | None = None,
) -> nnx.Module:
  """Re-applies a saved adapter's surgery to `base_model` and restores it.

  `apply_lora` is applied (in place) to exactly the saved target paths with
  the saved rank / alpha / use_rslora, then the LoRA parameters and each
  adapter's saved `LoRAScale` are restored. Every saved named adapter is
  loaded (`name`: only that one), each layer's adapters in the saved order
  and with their saved weights. A layer that already has an adapter of a
  saved name gets its values restored in place (same rank required); a
  saved adapter the model lacks is added. An adapter name the model has on
  other layers than the checkpoint is a name clash, an error: the model is
  never left with a mix of two adapters under one name.

  Everything is read and checked before the model is touched, so on any
  error `base_model` is unchanged: a damaged or truncated file is a `ValueError` naming it; arrays whose
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
  for arg, flag in (('check_method', check_method), ('strict', strict)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f'{arg}: expected a bool, got {type(flag).__name__}')
  if name is not None and not isinstance(name, str):
    raise TypeError(f'name: expected an adapter name (str), got {name!r}')
  requested = _abs(directory)
  config = read_adapter_config(requested)
  directory = _resolve(requested)
  config_path = os.path.join(directory, ADAPTER_CONFIG)
  params_dir = os.path.join(directory, ADAPTER_PARAMS)
  layout = dict(zip(map(id, config['layers']), _layout(config['layers'])))
  layers = config['layers']
  if name is not None:
    layers = [t for t in layers if t.get('name', 'default') == name]
    if not layers:
      saved = list(dict.fromkeys(t.get('name', 'default')
                                 for t in config['layers']))
      raise ValueError(
          f'name: the checkpoint {requested} has no adapter named {name!r};'
          f' it has {saved}')

  # 1. The targets exist, have the saved base, and no name clashes.
  present = _layers_by_path(base_model)
  model_names: dict[str, set[tuple[str, ...]]] = {}
  for p, w in _wrappers(base_model):
    for n in _adapter_names(w):
      model_names.setdefault(n, set()).add(_norm(p))
  problems, current, creates = _plan(layers, present, model_names,
                                     check_method)
  if problems:
    raise ValueError(
        f'load_adapter: {requested} does not fit base_model:\n  '
        + '\n  '.join(problems)
        + '\n  build the same base model (same surgery: quantize /'
        ' simulate_quantization first if the adapter was trained on one),'
        ' or pass check_method=False to ignore quantization methods.'
    )

  # 2. Dry run on an abstract copy: the keys and shapes of every adapter.
  graphdef, state = nnx.split(base_model)

  def build():
    m = nnx.merge(graphdef, state, copy=True)
    return _apply(m, creates, nnx.Rngs(0))

  abstract = nnx.eval_shape(build)
  expected: dict[Path, Any] = {}
  scales, problems = [], []
  for t in layers:
    ad = _entry_adapter(abstract, t)
    prefix = tuple(t['path']) + layout[id(t)]
    for sub, leaf in _flat(nnx.to_pure_dict(nnx.state(ad, nnx.LoRAParam))
                           ).items():
      expected[prefix + sub] = leaf
    try:
      scales.append(None if t.get('scale') is None else _saved_scale(
          t, tuple(ad.scale.get_value().shape)))
    except ValueError as e:
      problems.append(str(e))
  if problems:
    raise ValueError(f'directory: {config_path} is malformed: '
                     + '; '.join(problems))

  # 3. Read every array before the first mutation (and verify it).
  if not os.path.isdir(params_dir):
    raise ValueError(f'directory: no checkpoint at {params_dir}')
  metadata = _saved_metadata(params_dir)
  saved = _flat(metadata)
  if name is not None:  # only the entries of that adapter
    prefixes = [_norm(tuple(t['path']) + layout[id(t)]) for t in layers]
    saved = {p: v for p, v in saved.items()
             if any(_norm(p)[:len(q)] == q for q in prefixes)}
  _compare(saved, expected, f'adapter {requested}',
           'load it onto the base model it was trained with.')
  restored = _restore(params_dir, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), metadata))
  saved_digests = config.get('checksums')
  if saved_digests is not None:
    got = _digests(restored)
    bad = sorted(k for k in got if saved_digests.get(k) != got[k])
    if bad or set(saved_digests) != set(got):
      raise ValueError(
          f'directory: the arrays in {params_dir}'
          f' do not match the checksums in {config_path} ({bad or "keys"});'
          ' the adapter is damaged: save it again (the model was not changed)'
      )
  values = [_at(restored, _norm(tuple(t['path']) + layout[id(t)]))
            for t in layers]

  # 4. The base fingerprint (adapters saved before it existed: skipped);
  #    only entries under the configured targets count.
  if 'base_fingerprint' in config:
    targets = list({_norm(tuple(t['path'])) for t in layers})
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

  # 5. The real surgery, the restore, the saved scales and weights.
  _apply(base_model, creates, rngs)
  weights: dict[tuple[str, ...], dict[str, float]] = {}
  for t, value, scale in zip(layers, values, scales):
    ad = _entry_adapter(base_model, t)
    lora = nnx.state(ad, nnx.LoRAParam)
    nnx.replace_by_pure_dict(lora, value)
    nnx.update(ad, lora)
    if scale is not None:
      ad.scale[...] = jax.numpy.asarray(scale)
    # Files of the first release hold no weights: their adapter was its
    # layer's only one, active with weight 1.
    weights.setdefault(_norm(tuple(t['path'])), {})[
        t.get('name', 'default')] = float(t.get('weight', 1.0))
  for key, saved_weights in weights.items():
    _, w = _layers_by_path(base_model)[key]
    now = dict(zip(_adapter_names(w), _weights(w)))
    new = {**now, **saved_weights}
    if new != now:
      w.set_weights(new)
  return base_model

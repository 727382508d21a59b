"""peft.hf for linen params trees (`lora: {a, b}` beside each kernel)."""

from __future__ import annotations

import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from peft.hf._config import _factors_from_hf, _nearby, _parse_adapter, _raise
from peft.hf._files import _PREFIX
from peft.hf._fused import _split_slot


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
  if config.get('use_dora'):
    raise ValueError(
        f'the adapter {directory!r} is a DoRA adapter (use_dora=true); DoRA'
        ' loads into NNX models (its magnitudes need a DoRA wrapper), not'
        ' into a linen params tree')
  prefix, root = _root_of(params)
  layers = {}
  for path, node in _tree_layers(root).items():
    layers[path] = node
  plan = {}
  for name, mod in modules.items():
    path = key_map.jax_path(name)
    if _split_slot(path)[1] is not None:
      errors.append(
          f'{_PREFIX}{name}: maps to {path!r}, a slot of a fused layer; fused'
          ' layers load into NNX models only')
      continue
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

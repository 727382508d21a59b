"""Hardening of params trees and checkpoint files: bad input, damaged files.

Rows in the style of the `Bad` table of tests/test_hardening.py: each call
raises the listed exception class whose message names every listed string.
One rule: `TypeError` for a wrong type, `ValueError` for a wrong value
(including a damaged or malformed file, named in the message).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import checkpoint
from peft import params as pp
from _bad import Bad
from _bad import check_bad
from _bad import param as _param
from test_hardening import _lora_mlp
from test_hardening import _MLP


def _layer(**changes):
  rng = np.random.default_rng(0)
  layer = {
      'kernel': rng.normal(size=(4, 3)).astype(np.float32),
      'bias': np.zeros((3,), np.float32),
      'lora': {'a': rng.normal(size=(4, 2)).astype(np.float32),
               'b': rng.normal(size=(2, 3)).astype(np.float32)},
  }
  layer.update(changes)
  return {'Dense_0': layer}


def _fused_and_lora():
  params = _layer()
  return pp.fuse_params(params), pp.split_params(params)[1]


def _with_adapter(damage, *, load_kwargs=None, base=None):
  """Saves an adapter of `_lora_mlp()`, damages it, loads it onto a base."""
  with tempfile.TemporaryDirectory() as d:
    root = pathlib.Path(d) / 'ad'
    checkpoint.save_adapter(root, _lora_mlp())
    damage(root)
    checkpoint.load_adapter(root, base if base is not None else _MLP(),
                            **(load_kwargs or {}))


def _truncate(name):
  def damage(root):
    path = root / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  return damage


def _edit_config(fn):
  def damage(root):
    path = root / 'adapter_config.json'
    config = json.loads(path.read_text())
    config = fn(config)
    path.write_text(json.dumps(config))
  return damage


def _set(key, value, layer=None):
  def fn(config):
    (config if layer is None else config['layers'][layer])[key] = value
    return config
  return fn


def _swap_arrays(root):
  """The arrays of another adapter (same shapes) under this config."""
  other = _lora_mlp()
  nnx.update(other, jax.tree.map(lambda v: v + 1.0,
                                 nnx.state(other, nnx.LoRAParam)))
  checkpoint.save_adapter(root.parent / 'other', other)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(root / 'lora')
  shutil.copytree(root.parent / 'other' / 'lora', root / 'lora')


def _other_base():
  model = _MLP()
  model.up.kernel[...] = model.up.kernel[...] + 1.0
  return model


def _save_twice(**kwargs):
  with tempfile.TemporaryDirectory() as d:
    checkpoint.save_adapter(d + '/ad', _lora_mlp())
    checkpoint.save_adapter(d + '/ad', _lora_mlp(), **kwargs)


def _save_nan_scale():
  model = _lora_mlp()
  model.up.lora.scale[...] = float('nan')
  with tempfile.TemporaryDirectory() as d:
    checkpoint.save_adapter(d + '/ad', model)


def _save_onto_file():
  with tempfile.TemporaryDirectory() as d:
    pathlib.Path(d, 'ad').write_text('a file')
    checkpoint.save_adapter(d + '/ad', _lora_mlp())


def _save_pytree_twice():
  with tempfile.TemporaryDirectory() as d:
    checkpoint.save_pytree(d + '/p', {'w': np.ones(3, np.float32)})
    checkpoint.save_pytree(d + '/p', {'w': np.ones(3, np.float32)})


def _restore_damaged_pytree():
  with tempfile.TemporaryDirectory() as d:
    path = checkpoint.save_pytree(d + '/p', {'w': np.ones(3, np.float32)})
    meta = os.path.join(path, '_METADATA')
    with open(meta, 'r+b') as f:
      f.truncate(os.path.getsize(meta) // 2)
    checkpoint.restore_pytree(path)


_BAD_IO = [
    # --- peft.params: wrong types are TypeErrors naming the argument
    Bad('params/fuse_scale_str', lambda: pp.fuse_params(_layer(), scale='x'),
        ('scale', 'real number'), (TypeError,)),
    Bad('params/fuse_scale_none', lambda: pp.fuse_params(_layer(), scale=None),
        ('scale', 'real number'), (TypeError,)),
    Bad('params/fuse_scale_bool', lambda: pp.fuse_params(_layer(), scale=True),
        ('scale', 'bool'), (TypeError,)),
    Bad('params/fuse_scale_complex',
        lambda: pp.fuse_params(_layer(), scale=1j), ('scale',), (TypeError,)),
    Bad('params/fuse_scale_list',
        lambda: pp.fuse_params(_layer(), scale=[0.5]), ('scale',),
        (TypeError,)),
    Bad('params/fuse_scale_nan',
        lambda: pp.fuse_params(_layer(), scale=float('nan')),
        ('scale', 'finite'), (ValueError,)),
    Bad('params/fuse_scale_vector',
        lambda: pp.fuse_params(_layer(), scale=np.ones(3, np.float32)),
        ('scale', 'scalar'), (ValueError,)),
    Bad('params/unfuse_scale_str',
        lambda: pp.unfuse_params(*_fused_and_lora(), scale='x'),
        ('scale', 'real number'), (TypeError,)),
    Bad('params/unfuse_scale_inf',
        lambda: pp.unfuse_params(*_fused_and_lora(), scale=float('inf')),
        ('scale', 'finite'), (ValueError,)),
    Bad('params/fuse_kernel_not_array',
        lambda: pp.fuse_params(_layer(kernel=[[1.0] * 3] * 4)),
        ('Dense_0/kernel', 'array'), (TypeError,)),
    Bad('params/fuse_lora_not_branch',
        lambda: pp.fuse_params(_layer(lora=3)), ('Dense_0/lora', 'branch'),
        (TypeError,)),
    Bad('params/fuse_factor_not_array',
        lambda: pp.fuse_params(_layer(lora={'a': 1.0, 'b': np.ones((2, 3))})),
        ('Dense_0/lora/a', 'array'), (TypeError,)),
    Bad('params/fuse_int_kernel',
        lambda: pp.fuse_params(_layer(kernel=np.ones((4, 3), np.int8))),
        ('Dense_0', 'float'), (TypeError,)),
    Bad('params/fuse_int_factor',
        lambda: pp.fuse_params(_layer(lora={'a': np.ones((4, 2), np.int32),
                                            'b': np.ones((2, 3))})),
        ('Dense_0/lora/a', 'int32'), (TypeError,)),
    Bad('params/merge_original_not_tree',
        lambda: pp.merge_params(None, {}), ('original',), (TypeError,)),
    Bad('params/unfuse_fused_not_tree',
        lambda: pp.unfuse_params([1], _fused_and_lora()[1]), ('fused',),
        (TypeError,)),
    Bad('params/fuse_not_tree', lambda: pp.fuse_params('params'),
        ('params',), (TypeError,)),
    # --- peft.checkpoint: arguments
    Bad('checkpoint/save_adapter_directory_type',
        lambda: checkpoint.save_adapter(3, _lora_mlp()), ('directory',),
        (TypeError,)),
    Bad('checkpoint/save_adapter_model_type',
        lambda: checkpoint.save_adapter('/tmp/x', {'up': 1}), ('model',),
        (TypeError,)),
    Bad('checkpoint/save_adapter_no_lora',
        lambda: checkpoint.save_adapter(tempfile.mkdtemp() + '/a', _MLP()),
        ('model', 'apply_lora'), (ValueError,)),
    Bad('checkpoint/save_adapter_metadata_type',
        lambda: checkpoint.save_adapter(tempfile.mkdtemp() + '/a', _lora_mlp(),
                                        metadata=['x']),
        ('metadata', 'dict'), (TypeError,)),
    Bad('checkpoint/save_adapter_metadata_not_json',
        lambda: checkpoint.save_adapter(tempfile.mkdtemp() + '/a', _lora_mlp(),
                                        metadata={'f': object()}),
        ('metadata', 'JSON'), (TypeError,)),
    Bad('checkpoint/save_adapter_nan_scale', _save_nan_scale,
        ('model', 'up', 'scale', 'finite'), (ValueError,)),
    Bad('checkpoint/save_adapter_exists', _save_twice, ('overwrite=True',),
        (ValueError,)),
    Bad('checkpoint/save_adapter_onto_file', _save_onto_file,
        ('directory', 'not a directory'), (ValueError,)),
    Bad('checkpoint/save_pytree_exists', _save_pytree_twice,
        ('overwrite=True',), (ValueError,)),
    Bad('checkpoint/load_adapter_base_type',
        lambda: checkpoint.load_adapter('/tmp/x', None), ('base_model',),
        (TypeError,)),
    Bad('checkpoint/load_adapter_rngs_type',
        lambda: checkpoint.load_adapter('/tmp/x', _MLP(), rngs=0), ('rngs',),
        (TypeError,)),
    Bad('checkpoint/load_adapter_strict_type',
        lambda: checkpoint.load_adapter('/tmp/x', _MLP(), strict='yes'),
        ('strict', 'bool'), (TypeError,)),
    Bad('checkpoint/load_adapter_check_method_type',
        lambda: checkpoint.load_adapter('/tmp/x', _MLP(), check_method=None),
        ('check_method', 'bool'), (TypeError,)),
    Bad('checkpoint/load_adapter_directory_type',
        lambda: checkpoint.load_adapter(7, _MLP()),
        ('directory',), (TypeError,)),
    Bad('checkpoint/load_adapter_nothing_there',
        lambda: checkpoint.load_adapter(tempfile.mkdtemp(), _MLP()),
        ('directory', 'adapter_config.json'), (ValueError,)),
    Bad('checkpoint/restore_model_type',
        lambda: checkpoint.restore_model('/tmp/x', 'model'), ('model',),
        (TypeError,)),
    # --- peft.checkpoint: damaged or malformed files, named
    Bad('checkpoint/load_truncated_array_metadata',
        lambda: _with_adapter(_truncate('lora/array_metadatas/process_0')),
        ('lora/array_metadatas/process_0', 'damaged'), (ValueError,)),
    Bad('checkpoint/load_truncated_orbax_metadata',
        lambda: _with_adapter(_truncate('lora/_METADATA')),
        ('lora/_METADATA', 'damaged'), (ValueError,)),
    Bad('checkpoint/load_truncated_config',
        lambda: _with_adapter(_truncate('adapter_config.json')),
        ('adapter_config.json', 'damaged'), (ValueError,)),
    Bad('checkpoint/load_config_not_an_object',
        lambda: _with_adapter(_edit_config(lambda c: [c])),
        ('adapter_config.json', 'format'), (ValueError,)),
    Bad('checkpoint/load_config_bad_format_version',
        lambda: _with_adapter(_edit_config(_set('format_version', 'v2'))),
        ('adapter_config.json', 'format_version'), (ValueError,)),
    Bad('checkpoint/load_config_newer_format_version',
        lambda: _with_adapter(_edit_config(_set('format_version', 99))),
        ('adapter_config.json', 'upgrade'), (ValueError,)),
    Bad('checkpoint/load_config_layers_not_list',
        lambda: _with_adapter(_edit_config(_set('layers', {}))),
        ('adapter_config.json', 'layers'), (ValueError,)),
    Bad('checkpoint/load_config_rank_str',
        lambda: _with_adapter(_edit_config(_set('rank', '2', layer=0))),
        ('adapter_config.json', 'layers[0].rank'), (ValueError,)),
    Bad('checkpoint/load_config_scale_not_number',
        lambda: _with_adapter(_edit_config(_set('scale', 'x', layer=1))),
        ('adapter_config.json', 'scale'), (ValueError,)),
    Bad('checkpoint/load_config_scale_not_finite',
        lambda: _with_adapter(_edit_config(_set('scale', 'NaN', layer=0))),
        ('adapter_config.json', 'scale'), (ValueError,)),
    Bad('checkpoint/load_arrays_not_matching_checksums',
        lambda: _with_adapter(_swap_arrays),
        ('checksums', 'adapter_config.json', 'damaged'), (ValueError,)),
    Bad('checkpoint/load_onto_other_base_strict',
        lambda: _with_adapter(lambda root: None, base=_other_base(),
                              load_kwargs={'strict': True}),
        ('up/kernel', 'differs', 'strict=True'), (ValueError,)),
    Bad('checkpoint/restore_pytree_truncated_metadata',
        _restore_damaged_pytree, ('_METADATA', 'damaged'), (ValueError,)),
]


def test_bad_io_table_ids_are_unique():
  import test_hardening  # pylint: disable=g-import-not-at-top
  ids = [c.id for c in _BAD_IO]
  assert len(ids) == len(set(ids))
  assert not set(ids) & {c.id for c in test_hardening._BAD}


@pytest.mark.parametrize('case', [_param(c) for c in _BAD_IO])
def test_bad_io_input_raises_clear_error(case):
  check_bad(case)


def test_load_adapter_onto_other_base_warns_by_default():
  with pytest.warns(checkpoint.BaseMismatchWarning, match='up/kernel'):
    _with_adapter(lambda root: None, base=_other_base())


def test_failed_loads_leave_the_base_model_untouched():
  """Every failing load of the table above leaves its base as it was."""
  damages = [_truncate('lora/array_metadatas/process_0'),
             _truncate('adapter_config.json'), _swap_arrays,
             _edit_config(_set('scale', 'x', layer=0))]
  for damage in damages:
    base = _MLP()
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base)))
    with pytest.raises(ValueError):
      _with_adapter(damage, base=base)
    assert type(base.up).__name__ == 'Linear'
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base)))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_params_functions_do_not_mutate_on_error():
  params = _layer(kernel=np.ones((4, 3), np.int8))
  before = jax.tree.map(np.copy, params)
  with pytest.raises(TypeError):
    pp.fuse_params(params)
  jax.tree.map(np.testing.assert_array_equal, before, params)
  assert jnp.asarray(params['Dense_0']['kernel']).dtype == jnp.int8

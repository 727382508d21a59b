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

# The package's modules, one concept each: _orbax (strict orbax reads),
# _atomic (atomic directory replacement), trees (pytrees and models),
# config (the adapter format), fingerprint (what an adapter records of its
# base), save (save_adapter), load (load_adapter). Every name below, private
# ones included, stays importable from `peft.checkpoint` as before the split.

# pylint: disable=unused-import,g-importing-member
from peft.checkpoint._orbax import Path
from peft.checkpoint._orbax import _ORBAX_JSON
from peft.checkpoint._orbax import _abs
from peft.checkpoint._orbax import _check_orbax_files
from peft.checkpoint._orbax import _checkpointer
from peft.checkpoint._orbax import _compare
from peft.checkpoint._orbax import _damaged
from peft.checkpoint._orbax import _flat
from peft.checkpoint._orbax import _guarded
from peft.checkpoint._orbax import _key_name
from peft.checkpoint._orbax import _load_json
from peft.checkpoint._orbax import _norm
from peft.checkpoint._orbax import _restore
from peft.checkpoint._orbax import _saved_metadata
from peft.checkpoint._orbax import _shape_dtype
from peft.checkpoint._orbax import _show
from peft.checkpoint._orbax import _version
from peft.checkpoint._atomic import _carry
from peft.checkpoint._atomic import _fsync_dir
from peft.checkpoint._atomic import _leftovers
from peft.checkpoint._atomic import _orbax_save
from peft.checkpoint._atomic import _read
from peft.checkpoint._atomic import _recover
from peft.checkpoint._atomic import _resolve
from peft.checkpoint._atomic import _staging
from peft.checkpoint._atomic import _swap_in
from peft.checkpoint._atomic import _write
from peft.checkpoint.trees import restore_model
from peft.checkpoint.trees import restore_pytree
from peft.checkpoint.trees import save_model
from peft.checkpoint.trees import save_pytree
from peft.checkpoint.config import ADAPTER_CONFIG
from peft.checkpoint.config import ADAPTER_PARAMS
from peft.checkpoint.config import _FORMAT
from peft.checkpoint.config import _FORMAT_VERSION
from peft.checkpoint.config import _LAYER_KEYS
from peft.checkpoint.config import _adapter_names
from peft.checkpoint.config import _base_method
from peft.checkpoint.config import _json_key
from peft.checkpoint.config import _scale_entry
from peft.checkpoint.config import _wrapper_types
from peft.checkpoint.config import _wrappers
from peft.checkpoint.config import adapter_targets
from peft.checkpoint.config import read_adapter_config
from peft.checkpoint.fingerprint import BaseMismatchWarning
from peft.checkpoint.fingerprint import _SAMPLE
from peft.checkpoint.fingerprint import _digests
from peft.checkpoint.fingerprint import _fingerprint
from peft.checkpoint.fingerprint import _fingerprint_diff
from peft.checkpoint.fingerprint import _leaf_digest
from peft.checkpoint.fingerprint import _sample_checksum
from peft.checkpoint.save import save_adapter
from peft.checkpoint.load import _apply
from peft.checkpoint.load import _layers_by_path
from peft.checkpoint.load import _saved_scale
from peft.checkpoint.load import load_adapter

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

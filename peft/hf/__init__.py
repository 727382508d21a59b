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
embedding LoRA, PiSSA-style initialisations that change the base
weights, ...) are errors naming the field, never silently dropped. Factors are
copied bit for bit in their own dtype, both ways.

DoRA adapters (`use_dora: true`, a `lora_magnitude_vector [out]` per module)
load into NNX models as `peft.nnx.apply_lora(..., dora=True)` wrappers with
the magnitude in `layer.lora.magnitude`, and NNX models with DoRA adapters
save as such.

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

# The package is split by concern (pure moves from the former peft/hf.py):
# _files (file names, config file, safetensors shards), _keymaps (HF names <->
# JAX paths), _config (what a PEFT config means, the factors' 2-D view, the
# parsed adapter), _nnx (NNX models), _tree (linen params trees), _api (the
# public load_adapter / save_adapter). Every name, private ones included, is
# re-exported here.

from peft.hf._files import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_INDEX,
    _PREFIX,
    _SHARD,
    _LAYERS_PATTERNS,
    _safetensors_numpy,
    _check_directory,
    read_adapter_config,
    _weight_files,
    _read_tensors,
)
from peft.hf._keymaps import (  # noqa: F401
    Rules,
    MapFn,
    KeyMap,
    _check_rules,
    TUNIX_LLAMA3,
    TUNIX_QWEN,
    _gemma_rules,
    TUNIX_GEMMA,
    TUNIX_GEMMA_QKV,
    _apply_map,
    _as_key_map,
)
from peft.hf._config import (  # noqa: F401
    _BASE_CHANGING_INITS,
    _config_problems,
    _pattern_value,
    _is_targeted,
    _target_matches,
    _scale,
    _factor_matrix_shapes,
    _factors_from_hf,
    _factors_to_hf,
    _Module,
    _parse_adapter,
    _raise,
    _nearby,
)
from peft.hf._fused import (  # noqa: F401
    _SLOT,
    _split_slot,
    _fuse,
    _fused_slot_count,
    _split_fused,
)
from peft.hf._nnx import (  # noqa: F401
    _is_nnx,
    _lora_of,
    _nnx_layers,
    _layer_geometry,
    _lead_shape,
    _check_geometry,
    _check_stacked,
    _adapter_of,
    _load_nnx,
    _check_shapes,
    _check_magnitude,
    _alpha_of,
    _collect_nnx,
)
from peft.hf._tree import (  # noqa: F401
    _root_of,
    _tree_layers,
    _kernel_split,
    _set_path,
    _get_key,
    _load_tree,
    _get_node,
    _collect_tree,
)
from peft.hf._api import (  # noqa: F401
    load_adapter,
    _common,
    _pattern,
    _number,
    _write_atomic,
    save_adapter,
)

__all__ = [
    'ADAPTER_CONFIG',
    'ADAPTER_WEIGHTS',
    'ADAPTER_INDEX',
    'KeyMap',
    'TUNIX_LLAMA3',
    'TUNIX_QWEN',
    'TUNIX_GEMMA',
    'TUNIX_GEMMA_QKV',
    'read_adapter_config',
    'load_adapter',
    'save_adapter',
]

"""The NNX-first API: LoRA and quantization modules, and graph surgery.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import peft.nnx as pnnx
  >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)),
  ...                        nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  >>> model = pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(2))
  >>> [type(layer).__name__ for layer in model.layers]
  ['LoRALinear', 'LoRALinear']
  >>> model(jnp.ones((1, 8))).shape
  (1, 4)
"""

from peft.nnx.adapters import adapter_filter
from peft.nnx.adapters import combine_adapters
from peft.nnx.adapters import delete_adapter
from peft.nnx.adapters import disable_adapters
from peft.nnx.adapters import list_adapters
from peft.nnx.adapters import set_active_adapters
from peft.nnx.adapters import set_adapter_ids
from peft.nnx.dora import DoRABaseNorm
from peft.nnx.dora import refresh_base_norms
from peft.nnx.lora import LoRA
from peft.nnx.lora import LoRAAdapter
from peft.nnx.lora import LoRAEinsum
from peft.nnx.lora import LoRAEinsumAdapter
from peft.nnx.lora import LoRALinear
from peft.nnx.lora import LoRALinearAdapter
from peft.nnx.lora import LoRALinearGeneral
from peft.nnx.lora import LoRALinearGeneralAdapter
from peft.nnx.lora import LoRAScale
from peft.nnx.quantized import Int4Einsum
from peft.nnx.quantized import Int4Linear
from peft.nnx.quantized import Int4LinearGeneral
from peft.nnx.quantized import QuantizedWeight
from peft.nnx.quantized import QuantizedLayer
from peft.nnx.quantized import SimulateQuantized
from peft.nnx.quantized import SimulateQuantizedEinsum
from peft.nnx.quantized import SimulateQuantizedLinear
from peft.nnx.quantized import SimulateQuantizedLinearGeneral
from peft.nnx.registry import LayerType
from peft.nnx.registry import register_layer
from peft.nnx.surgery import ParamSummary
from peft.nnx.surgery import apply_lora
from peft.nnx.surgery import lora_state
from peft.nnx.surgery import merge_lora
from peft.nnx.surgery import quantize
from peft.nnx.surgery import replace
from peft.nnx.surgery import select
from peft.nnx.surgery import simulate_quantization
from peft.nnx.surgery import summary

__all__ = [
    'LoRA',
    'LoRAAdapter',
    'SimulateQuantized',
    'QuantizedLayer',
    'register_layer',
    'LayerType',
    'LoRALinear',
    'LoRAEinsum',
    'LoRALinearGeneral',
    'LoRALinearAdapter',
    'LoRAEinsumAdapter',
    'LoRALinearGeneralAdapter',
    'LoRAScale',
    'DoRABaseNorm',
    'refresh_base_norms',
    'SimulateQuantizedLinear',
    'SimulateQuantizedEinsum',
    'SimulateQuantizedLinearGeneral',
    'Int4Linear',
    'Int4Einsum',
    'Int4LinearGeneral',
    'QuantizedWeight',
    'replace',
    'select',
    'apply_lora',
    'simulate_quantization',
    'quantize',
    'merge_lora',
    'lora_state',
    'summary',
    'ParamSummary',
    'adapter_filter',
    'list_adapters',
    'set_active_adapters',
    'disable_adapters',
    'delete_adapter',
    'combine_adapters',
    'set_adapter_ids',
]

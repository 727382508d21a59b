"""The document's Flax linen API, built on the NNX core through `flax.nnx.bridge`.

LoRA wrappers and adapters (`LoRADense`, `LoRAEinsum`, `LoRADenseGeneral`,
`LoRA*Adapter`), quantization wrappers (`SimulateQuantizedDense/Einsum`,
`Int4Dense/Int4Einsum`, `quantize_checkpoint`) and model surgery by method
interception (`Interceptor`, `ModuleInterceptor`). `import peft` re-exports
all of them.

Examples:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> from peft import linen as peft_linen
  >>> layer = peft_linen.LoRADense(rank=2, wrapped=nn.Dense(3))
  >>> params = layer.init(jax.random.key(0), jnp.ones((1, 4)))['params']
  >>> sorted(params)
  ['bias', 'kernel', 'lora']
"""

from peft.linen.interceptor import Interceptor
from peft.linen.interceptor import ModuleInterceptor
from peft.linen.lora import LoRADense
from peft.linen.lora import LoRADenseAdapter
from peft.linen.lora import LoRADenseGeneral
from peft.linen.lora import LoRADenseGeneralAdapter
from peft.linen.lora import LoRAEinsum
from peft.linen.lora import LoRAEinsumAdapter
from peft.linen.quantized import Int4Dense
from peft.linen.quantized import Int4Einsum
from peft.linen.quantized import SimulateQuantizedDense
from peft.linen.quantized import SimulateQuantizedEinsum
from peft.linen.quantized import quantize_checkpoint

__all__ = [
    'Interceptor',
    'ModuleInterceptor',
    'LoRADense',
    'LoRAEinsum',
    'LoRADenseGeneral',
    'LoRADenseAdapter',
    'LoRAEinsumAdapter',
    'LoRADenseGeneralAdapter',
    'SimulateQuantizedDense',
    'SimulateQuantizedEinsum',
    'Int4Dense',
    'Int4Einsum',
    'quantize_checkpoint',
]

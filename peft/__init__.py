"""flax-peft: LoRA and quantization for JAX/Flax.

The top level is the linen API of the original `gemma.peft` document (LoRA and
quantization wrappers for `flax.linen`, `ModuleInterceptor`, params-tree
surgery) plus the framework-free functions. The NNX-first API is `peft.nnx`.

Examples:
  >>> import peft
  >>> peft.QuantizationMethod('INT4')
  <QuantizationMethod.INT4: 'int4'>
  >>> original, lora = peft.split_params({'d': {'kernel': 0, 'lora': {'a': 1, 'b': 2}}})
  >>> original, lora
  ({'d': {'kernel': 0}}, {'d': {'lora': {'a': 1, 'b': 2}}})
"""

__version__ = '0.1.0'

from peft.linen import Int4Dense
from peft.linen import Int4Einsum
from peft.linen import Interceptor
from peft.linen import LoRADense
from peft.linen import LoRADenseAdapter
from peft.linen import LoRADenseGeneral
from peft.linen import LoRADenseGeneralAdapter
from peft.linen import LoRAEinsum
from peft.linen import LoRAEinsumAdapter
from peft.linen import ModuleInterceptor
from peft.linen import SimulateQuantizedDense
from peft.linen import SimulateQuantizedEinsum
from peft.linen import quantize_checkpoint
from peft.params import fuse_params
from peft.params import merge_params
from peft.params import split_params
from peft.params import unfuse_params
from peft.quantization import QuantizationMethod
from peft.quantization import simulate_quantize

__all__ = [
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
    'QuantizationMethod',
    'simulate_quantize',
    'Interceptor',
    'ModuleInterceptor',
    'split_params',
    'merge_params',
    'fuse_params',
    'unfuse_params',
]

"""Quantization numerics: fake (simulated) and real quantization of arrays.

Everything here is pure `jax.numpy` on one array; the layers that use it live in
`peft.nnx.quantized` and `peft.linen`.

* `simulate_quantize(x, method)` returns `x` rounded onto the grid of `method`
  (same shape and dtype), with a straight-through estimator: its derivative
  with respect to `x` is exactly the identity, in reverse mode (`jax.grad`,
  `jax.vjp`) and forward mode (`jax.jvp`, `jax.jacfwd`, `jax.linearize`),
  which is what quantization-aware training needs.
* `quantize(x, method)` stores the same numbers compactly in a `QArray`
  (`jnp.int4` / `jnp.int8` / `float8_e4m3fn` values with float32 scales per
  channel or per group, or ggml's Q4_0 blocks of 32 four-bit values and one
  float16 scale); `dequantize` inverts it, and `dequantize(quantize(x, m))`
  equals `simulate_quantize(x, m)` bit for bit.
* `check_quantizable(x, method)` runs the checks of an eager `quantize` (NaN /
  inf, Q4_0's float16 range, shapes) without quantizing: call it on a
  concrete array before a jitted `quantize`, which cannot check values.
* `to_ggml_bytes` gives the byte stream llama.cpp / ggml writes for Q4_0.

Scales (INT4, INT8, FP8, SFP8) are per output channel by default: the max is
taken over `axis_to_reduce` (default: every axis but the last, the contracted
axes of a Dense kernel). With `group_size=g` (INT4, INT8, FP8, SFP8), the
contracted axes are flattened (row-major, in axis order) and every `g`
consecutive values of one output channel share a scale; the scale array keeps
the rank of `x`, each contracted axis divided by the part of a group lying
along it (see `QArray`).

All arithmetic is done in float32 (bfloat16 and float16 inputs are upcast and
the result is cast back to the input dtype). XLA on CPU flushes float32
subnormals to zero, so a Q4_0 block whose largest magnitude is below
8 * 2**-126 (about 9.4e-38) gets d = 0 (all codes 8) where ggml keeps a
subnormal d; both dequantize to zeros.

Special values (every method, independent of shapes and backends):

* NaN and +-inf pass through `simulate_quantize` unchanged, exactly where
  they were; the scale of their channel or group (INT4, INT8, FP8, SFP8) or
  block (Q4_0) is computed from the finite values only, as if the non-finite
  ones were 0.
* A channel or block whose largest finite magnitude is 0, or so small that
  its step is a float32 subnormal (below qmax * 2**-126 for INT4 / INT8 /
  FP8, about 2.4e-7 for Q4_0's float16 d), gives zeros, never NaN; float32
  subnormal inputs are flushed to zero by XLA.
* Huge values: INT4 / INT8 / FP8 / SFP8 give finite results for every finite
  input, up to float32's max. The scale `qmax / max|w|` is float32 and never
  subnormal for these methods; where `qmax * (1 / scale)` would round past
  float32's max (a channel max within a few ulps of it), the scale is raised
  to the smallest float32 for which it does not (`_safe_min_scale`). SFP8,
  whose scale `1.875 / max|w|` would be subnormal above 1.59e38, scales such
  a channel in two exact steps (by 1/4, then by `1.875 / (max|w| / 4)`).
  Below these extremes the formulas hold bit for bit.
* Q4_0 stores d = max / -8 as float16: a block holding a magnitude of at
  least 524160 (= 8 * 65520) gets d = +-inf, exactly as ggml / gguf, and
  dequantizes to +-inf (NaN where the code is 8, i.e. 0 * inf).
* `quantize` of a concrete array raises a `ValueError` if `x` holds a NaN or
  an inf (the codes cannot represent them) or, for Q4_0, a magnitude of at
  least 524160. Under tracing (inside `jax.jit`) nothing can be checked:
  non-finite values are stored as the code of 0 (they dequantize to 0) and
  an overflowing Q4_0 block keeps ggml's infinite d. `check_quantizable`
  runs the same checks on their own.
* Zero-size arrays give zero-size results (`simulate_quantize` returns `x`).

Examples:
  >>> import jax.numpy as jnp
  >>> from peft import quantization as q
  >>> w = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
  >>> w_int4 = q.simulate_quantize(w, 'int4')
  >>> qa = q.quantize(w, q.QuantizationMethod.Q4_0)
  >>> qa.nbytes  # 2 blocks of 32 weights, 18 bytes each
  36
  >>> bool((q.dequantize(qa) == q.simulate_quantize(w, 'q4_0')).all())
  True
"""

from __future__ import annotations

# The implementation lives in one module per concept; this module is the
# public face and re-exports every public name.
from peft.quant_array import QArray
from peft.quant_array import kernel_names
from peft.quant_array import storage_names
from peft.quant_array import to_ggml_bytes
from peft.quant_ggml import pack_q4_0
from peft.quant_ggml import unpack_q4_0
from peft.quant_methods import FP8_MAX
from peft.quant_methods import NF4_BLOCK_SIZE
from peft.quant_methods import Q4_0_BLOCK_SIZE
from peft.quant_methods import QuantizationMethod
from peft.quant_methods import scale_shape
from peft.quant_real import check_quantizable
from peft.quant_real import dequantize
from peft.quant_real import quantize
from peft.quant_simulate import simulate_quantize

__all__ = [
    'QuantizationMethod',
    'QArray',
    'simulate_quantize',
    'quantize',
    'dequantize',
    'check_quantizable',
    'scale_shape',
    'to_ggml_bytes',
    'storage_names',
    'kernel_names',
    'pack_q4_0',
    'unpack_q4_0',
    'Q4_0_BLOCK_SIZE',
    'FP8_MAX',
    'NF4_BLOCK_SIZE',
]

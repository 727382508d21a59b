"""NF4 (4-bit NormalFloat, QLoRA) block codec, bit-exact with bitsandbytes on CPU.

Pure `jax.numpy`; every function jit-compiles (shapes and options are static).
The format is the one `bitsandbytes.functional.quantize_4bit(w, blocksize=64,
quant_type='nf4', compress_statistics=...)` writes:

* The tensor is read in row-major order and cut into blocks of `block_size`
  (64) consecutive elements; the last block may be shorter. For a PyTorch
  `[out, in]` weight that means blocks along `in`, the contracted axis.
* Each block stores its absmax (float32) and one 4-bit code per element: the
  index of the `NF4_CODEBOOK` value nearest to `x / absmax` (computed as
  `x * (1 / absmax)`, or `x / absmax` for a short last block, as
  bitsandbytes does). Ties, i.e. values exactly at the float32 midpoint of
  two codebook values, go to the lower code.
* Codes are packed two per byte, the first element in the HIGH nibble; an
  odd number of elements is padded with code 7 (the codebook's 0.0).
* Double quantization (`double_quant=True`, bitsandbytes'
  `compress_statistics=True`) replaces the float32 absmax by
  `offset = mean(absmax)` and the 8-bit codes of `absmax - offset` in
  bitsandbytes' dynamic code map, blockwise in blocks of 256 with one float32
  scale per block.

JAX layout: a JAX kernel is `[in, out]`, the transpose of PyTorch's weight.
`axis` names the contracted axis the blocks run along: `quantize_nf4(kernel,
axis=0)` gives exactly the codes bitsandbytes writes for `kernel.T`
(internally the axis is moved last and the result flattened row-major), and
`dequantize_nf4` returns the `[in, out]` kernel again.

Storage per weight (`nf4_bits_per_weight`): 4 bits of code, plus 32 / 64 =
0.5 bit of absmax (4.5 bits), or with double quantization 8 / 64 + 32 /
(64 * 256) = 0.127 bit (about 4.127 bits), plus a negligible offset.

Exactness notes. Codes, absmax, 8-bit absmax codes, their scales and the
dequantized values equal bitsandbytes 0.50.2's CPU results bit for bit
(golden fixtures in `tests/fixtures/nf4_golden.npz`). The double quantization
offset is torch's float32 `absmax.mean()`, whose summation order is
reproduced here (torch 2.13's CPU cascade sum with 8-lane vectors, as
measured on the x86 machine that made the fixtures, with 1 and 2 threads); a
torch build or CPU that sums in another order can differ from it by an ulp. XLA flushes float32 subnormals to zero: subnormal
inputs count as zeros and a block whose absmax is at least 2**126 (whose
reciprocal is subnormal) is not reproduced; neither occurs in real weights.
Zeros give zeros and finite input never gives NaN. bitsandbytes 0.50.2's C
CPU kernel for `dequantize_4bit` indexes blocks per row (`row * (cols // 64) +
col // 64`), which disagrees with its own quantization when an even number of
columns is not a multiple of the block size; `dequantize_nf4` uses the flat
block index, as bitsandbytes' generic (torch) path and its odd-column fallback
do, so that it inverts `quantize_nf4` for every shape.

Examples:
  >>> import jax.numpy as jnp
  >>> from peft import nf4
  >>> w = jnp.linspace(-1.0, 1.0, 256).reshape(2, 128)  # PyTorch [out, in]
  >>> q = nf4.quantize_nf4(w)
  >>> q.codes.shape, q.codes.dtype, q.absmax.shape
  ((128,), dtype('uint8'), (4,))
  >>> w_hat = nf4.dequantize_nf4(q)
  >>> bool(jnp.abs(w_hat - w).max() <= 0.16)  # half the widest codebook gap
  True
  >>> bool((nf4.simulate_nf4(w) == w_hat).all())
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft.nf4_double_quant import _DQ_BLOCK
from peft.nf4_double_quant import _DYNAMIC_CODE  # noqa: F401 (tests)
from peft.nf4_double_quant import _blocks
from peft.nf4_double_quant import _dequantize_dynamic
from peft.nf4_double_quant import _no_fma
from peft.nf4_double_quant import _quantize_dynamic
from peft.nf4_double_quant import _runtime_constant
from peft.nf4_double_quant import _torch_sum

__all__ = [
    'NF4_CODEBOOK',
    'NF4Array',
    'quantize_nf4',
    'dequantize_nf4',
    'simulate_nf4',
    'nf4_bits_per_weight',
]

NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_CODEBOOK.setflags(write=False)
"""The 16 NormalFloat4 values (float32), sorted; code 7 is exactly 0.0."""

# Decision thresholds: float32 midpoints of neighbouring codebook values.
_NF4_MIDPOINTS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / np.float32(2)

_F32_TINY = np.float32(1e-38)  # bitsandbytes' clamp of a short block's absmax.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Array:
  """Packed NF4 storage of one tensor (a pytree; the metadata fields are static).

  Attributes:
    codes: uint8 `[ceil(n / 2)]`, two 4-bit codes per byte, first element in
      the high nibble (n = number of elements).
    absmax: float32 `[n_blocks]` (no double quantization), or uint8
      `[n_blocks]` 8-bit codes of `absmax - offset` (double quantization).
    absmax_scale: float32 `[ceil(n_blocks / 256)]` (double quantization
      only, else None): the absmax of `absmax - offset` per block of 256.
    offset: float32 `[]` (double quantization only, else None): the mean of
      the absmax.
    shape: shape of the original tensor.
    block_size: elements per block.
    axis: the axis the blocks run along (non-negative), moved last before
      flattening.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft import nf4
    >>> q = nf4.quantize_nf4(jnp.ones((4, 64)), double_quant=True)
    >>> q.absmax.dtype, q.absmax_scale.shape, q.nbytes  # 128 + 4 + 4 + 4
    (dtype('uint8'), (1,), 140)
  """
  codes: jax.Array
  absmax: jax.Array
  absmax_scale: jax.Array | None
  offset: jax.Array | None
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  block_size: int = dataclasses.field(metadata=dict(static=True))
  axis: int = dataclasses.field(metadata=dict(static=True))

  @property
  def double_quant(self) -> bool:
    """Whether the absmax is double-quantized."""
    return self.absmax_scale is not None

  @property
  def size(self) -> int:
    """Number of elements of the original tensor."""
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of storage: codes, absmax (or its pieces)."""
    return sum(int(a.size) * a.dtype.itemsize for a in
               (self.codes, self.absmax, self.absmax_scale, self.offset)
               if a is not None)


def nf4_bits_per_weight(block_size: int = 64, double_quant: bool = False,
                        size: int | None = None) -> float:
  """Storage bits per weight of NF4: codes plus block statistics.

  Without `size`, the asymptotic value `4 + 32 / block_size` (4.5 for 64), or
  with double quantization `4 + 8 / block_size + 32 / (256 * block_size)`
  (4.127 for 64). With `size` (number of weights) the exact value of
  `NF4Array.nbytes * 8 / size`, counting the short last blocks, the padding
  nibble and the offset.

  Args:
    block_size: elements per block.
    double_quant: whether the absmax is double-quantized.
    size: number of weights, or None for the large-tensor limit.

  Returns:
    Bits per weight (float).

  Examples:
    >>> from peft import nf4
    >>> nf4.nf4_bits_per_weight()
    4.5
    >>> round(nf4.nf4_bits_per_weight(double_quant=True), 3)
    4.127
    >>> nf4.nf4_bits_per_weight(64, size=32)  # 16 bytes of codes + 1 float32
    5.0
  """
  block_size = _check_block_size(block_size)
  double_quant = _check_bool(double_quant, 'double_quant')
  if size is None:
    if double_quant:
      return 4 + 8 / block_size + 32 / (_DQ_BLOCK * block_size)
    return 4 + 32 / block_size
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
    raise TypeError(f'size must be an int or None, got {type(size).__name__}.')
  if size <= 0:
    raise ValueError(f'size must be positive, got {size}.')
  n_blocks = -(-size // block_size)
  total = 8 * (-(-size // 2))
  if double_quant:
    total += 8 * n_blocks + 32 * (-(-n_blocks // _DQ_BLOCK)) + 32
  else:
    total += 32 * n_blocks
  return total / size


def _check_block_size(block_size: Any) -> int:
  if isinstance(block_size, bool) or not isinstance(block_size,
                                                    (int, np.integer)):
    raise TypeError('block_size must be an int (bitsandbytes uses 64), got '
                    f'{type(block_size).__name__}.')
  if block_size <= 0:
    raise ValueError(f'block_size must be positive (e.g. 64), got {block_size}.')
  return int(block_size)


def _check_bool(value: Any, name: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name} must be a bool, got {type(value).__name__}.')
  return bool(value)


def _check_axis(axis: Any, ndim: int) -> int:
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
    raise TypeError(f'axis must be an int, got {type(axis).__name__}.')
  if ndim == 0:
    raise ValueError('quantize_nf4 needs an array with at least one axis, got '
                     'a scalar; reshape it to (1,).')
  if not -ndim <= axis < ndim:
    raise ValueError(f'axis {axis} is out of range for an array with {ndim} '
                     f'axes; use one of {-ndim}..{ndim - 1}.')
  return int(axis) % ndim


def _as_float_array(x: Any, name: str) -> jax.Array:
  if not isinstance(x, (jax.Array, np.ndarray, np.generic, float, int, list,
                        tuple)) or isinstance(x, bool):
    raise TypeError(f'{name} must be an array of floats, got '
                    f'{type(x).__name__}.')
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{name} must have a floating dtype (float32, bfloat16, '
                    f'float16), got {x.dtype}; cast it first, e.g. '
                    f'x.astype(jnp.float32).')
  return x


def _to_rows(x: jax.Array, axis: int) -> jax.Array:
  """Moves `axis` last and flattens row-major (bitsandbytes' element order)."""
  return jnp.moveaxis(x, axis, -1).reshape(-1)


def _from_rows(flat: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
  moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
  return jnp.moveaxis(flat.reshape(moved), -1, axis)



def _nf4_codes(scaled: jax.Array) -> jax.Array:
  """Number of NF4 midpoints strictly below each value (ties go to the lower code)."""
  codes = jnp.zeros(scaled.shape, jnp.uint8)
  for mid in _NF4_MIDPOINTS:  # 15 thresholds of the codebook, fused by XLA
    codes = codes + (scaled > mid).astype(jnp.uint8)
  return codes


def _pack(codes: jax.Array) -> jax.Array:
  if codes.shape[0] % 2:
    codes = jnp.pad(codes, (0, 1), constant_values=7)
  return (codes[0::2] << 4) | codes[1::2]


def _unpack(packed: jax.Array, n: int) -> jax.Array:
  return jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n]


def _raise_on_non_finite(x: jax.Array):
  try:
    finite = bool(np.isfinite(np.asarray(x)).all())
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return  # abstract under tracing: checked by the caller, if at all
  if not finite:
    raise ValueError('quantize_nf4 got NaN or inf values; NF4 codes can only '
                     'represent finite numbers. Replace them first (e.g. '
                     'jnp.nan_to_num).')


def quantize_nf4(x: Any, *, block_size: int = 64, double_quant: bool = False,
                 axis: int = -1) -> NF4Array:
  """Quantizes `x` to NF4 blocks exactly as bitsandbytes' `quantize_4bit` does.

  Args:
    x: float array (float32, bfloat16 or float16; computed in float32).
    block_size: elements per block (bitsandbytes' `blocksize`, QLoRA uses 64).
    double_quant: quantize the absmax too (bitsandbytes'
      `compress_statistics=True`): 8-bit codes of `absmax - mean(absmax)` in
      blocks of 256, one float32 scale per block of 256, and the mean.
    axis: the contracted axis the blocks run along. The default -1 is
      bitsandbytes' order for a PyTorch `[out, in]` weight; use `axis=0` for a
      JAX `[in, out]` kernel to get the codes bitsandbytes writes for
      `kernel.T`. Elements are taken in row-major order of `x` with `axis`
      moved last; if its length is not a multiple of `block_size`, blocks
      continue into the next row and the last block is short, as in
      bitsandbytes.

  Returns:
    An `NF4Array` (a pytree: usable inside and outside `jax.jit`).

  Raises:
    TypeError: `x` is not a float array, or an option has the wrong type.
    ValueError: bad `block_size` / `axis`, an empty `x`, or (outside jit)
      NaN / inf in `x`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from peft import nf4
    >>> w = jnp.array([[0.0, 0.5, -1.0, 2.0]])
    >>> q = nf4.quantize_nf4(w, block_size=4)
    >>> [hex(int(b)) for b in q.codes], q.absmax.tolist()
    (['0x7a', '0x2f'], [2.0])
    >>> kernel = jax.random.normal(jax.random.key(0), (128, 32))  # [in, out]
    >>> qk = jax.jit(lambda k: nf4.quantize_nf4(k, axis=0))(kernel)
    >>> bool((qk.codes == nf4.quantize_nf4(kernel.T).codes).all())
    True
  """
  x = _as_float_array(x, 'x')
  block_size = _check_block_size(block_size)
  double_quant = _check_bool(double_quant, 'double_quant')
  axis = _check_axis(axis, x.ndim)
  if x.size == 0:
    raise ValueError(f'quantize_nf4 needs a non-empty array, got shape {x.shape}.')
  _raise_on_non_finite(x)
  return _quantize(x, block_size, double_quant, axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x: jax.Array, block_size: int, double_quant: bool,
              axis: int) -> NF4Array:
  flat = _to_rows(x.astype(jnp.float32), axis)
  n = flat.shape[0]
  blocks = _blocks(flat, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  scaled = blocks * (1.0 / safe)[:, None]
  if n % block_size:  # bitsandbytes divides (not multiplies) in a short block
    scaled = scaled.at[-1].set(blocks[-1] / safe[-1])
    tiny = jax.lax.bitcast_convert_type(  # a subnormal: no float arithmetic
        jnp.int32(np.float32(_F32_TINY).view(np.int32)), jnp.float32)
    absmax = absmax.at[-1].set(jnp.where(absmax[-1] > 0, absmax[-1], tiny))
  codes = _pack(_nf4_codes(jnp.clip(scaled, -1.0, 1.0)).reshape(-1)[:n])
  if not double_quant:
    return NF4Array(codes, absmax, None, None, tuple(x.shape), block_size, axis)
  total = _torch_sum(absmax)
  offset = total / _runtime_constant(total, absmax.shape[0])
  absmax_codes, absmax_scale = _quantize_dynamic(absmax - offset)
  return NF4Array(codes, absmax_codes, absmax_scale, offset, tuple(x.shape),
                  block_size, axis)


def _absmax_f32(q: NF4Array) -> jax.Array:
  if not q.double_quant:
    return q.absmax.astype(jnp.float32)
  return _no_fma(_dequantize_dynamic(q.absmax, q.absmax_scale)) + q.offset


def _check_nf4_array(q: Any):
  if not isinstance(q, NF4Array):
    raise TypeError('dequantize_nf4 expects the NF4Array returned by '
                    f'quantize_nf4, got {type(q).__name__}.')
  n = q.size
  n_blocks = -(-n // q.block_size)
  expected = {'codes': (-(-n // 2),), 'absmax': (n_blocks,)}
  if q.double_quant:
    expected['absmax_scale'] = (-(-n_blocks // _DQ_BLOCK),)
    expected['offset'] = ()
  for name, shape in expected.items():
    got = getattr(q, name).shape
    if tuple(got) != shape:
      raise ValueError(f'NF4Array.{name} has shape {tuple(got)} but a tensor '
                       f'of shape {q.shape} in blocks of {q.block_size} '
                       f'needs {shape}.')


def dequantize_nf4(q: NF4Array, dtype: Any = jnp.float32) -> jax.Array:
  """Returns the tensor stored in `q`: codebook value x block absmax.

  Equal, bit for bit, to bitsandbytes' `dequantize_4bit` (computed in float32,
  then cast to `dtype`).

  Args:
    q: an `NF4Array` from `quantize_nf4`.
    dtype: dtype of the result.

  Returns:
    An array of shape `q.shape` (the original layout, `axis` in place).

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft import nf4
    >>> w = jnp.array([[0.0, 0.5, -1.0, 2.0]])
    >>> nf4.dequantize_nf4(nf4.quantize_nf4(w, block_size=4)).tolist()
    [[0.0, 0.49222..., -1.05014..., 2.0]]
  """
  _check_nf4_array(q)
  return _dequantize(q, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize(q: NF4Array, dtype: Any) -> jax.Array:
  n = q.size
  values = jnp.asarray(NF4_CODEBOOK)[_unpack(q.codes, n).astype(jnp.int32)]
  absmax = _absmax_f32(q)
  out = (_blocks(values, q.block_size) * absmax[:, None]).reshape(-1)[:n]
  return _from_rows(out, q.shape, q.axis).astype(dtype)


def simulate_nf4(x: Any, *, block_size: int = 64, double_quant: bool = False,
                 axis: int = -1) -> jax.Array:
  """`dequantize_nf4(quantize_nf4(x, ...))` in `x`'s dtype (no gradient rule).

  Args:
    x: float array.
    block_size: elements per block.
    double_quant: whether the absmax is double-quantized.
    axis: the contracted axis the blocks run along (see `quantize_nf4`).

  Returns:
    `x` rounded onto the NF4 grid, same shape and dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft import nf4
    >>> x = jnp.array([0.3, -0.6, 1.2, 0.0])
    >>> [round(v, 4) for v in nf4.simulate_nf4(x, block_size=4).tolist()]
    [0.2953, -0.6301, 1.2, 0.0]
  """
  x = _as_float_array(x, 'x')
  q = quantize_nf4(x, block_size=block_size, double_quant=double_quant,
                   axis=axis)
  return dequantize_nf4(q, x.dtype)

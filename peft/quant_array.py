"""`QArray`, the container of really quantized storage, and its layout helpers.

`storage_names` / `kernel_names` map sharding names between a float kernel
and its storage; `to_ggml_bytes` writes a Q4_0 `QArray` as ggml's bytes.

Examples:
  >>> import jax.numpy as jnp
  >>> qa = QArray(jnp.zeros((4, 2), jnp.int8), jnp.ones((1, 2)), 'int8', (4, 2))
  >>> qa.nbytes  # 8 int8 values + 2 float32 scales
  16
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from peft.quant_methods import QuantizationMethod
from peft.quant_methods import _as_method
from peft.quant_methods import _check_group_size
from peft.quant_methods import _scale_layout

__all__ = ['QArray', 'storage_names', 'kernel_names', 'to_ggml_bytes']


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=['values', 'scale', 'stats'],
    meta_fields=['method', 'shape', 'group_size', 'axes'],
)
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: packed `values`, their `scale`, `method` and `shape`.

  A jax pytree whose leaves are `values` and `scale` (`method`, `shape`, the
  float array's shape, and `group_size` are static metadata), so it can pass
  through `jax.jit`, be stored in a checkpoint or held by a module. Layouts:

  * INT4 / INT8 / FP8: `values` is `jnp.int4` / `jnp.int8` /
    `jnp.float8_e4m3fn` with `shape`; `scale` is float32 of the same rank;
    the array is `values / scale` (computed as `values * (1 / scale)`, see
    `QuantizationMethod`). Per channel (`group_size` None) the scale has
    size 1 on the reduced axes (`(1, N)` for a `[K, N]` kernel). With groups
    it has, on each contracted axis, that axis's size divided by the part of
    a group lying along it (`(K // group_size, N)` for `[K, N]`): scale `i`
    of an axis of size `d` with `s` scales applies to elements
    `[i * d // s, (i + 1) * d // s)`, so the scales split along the same
    axes as the values (`scale_shape` computes it; `storage_names` names
    its axes).
  * Q4_0: `values` uint8 `(*lead, K // 32, 16)` packed nibbles (ggml layout),
    `scale` float16 `(*lead, K // 32)`.
  * Q4_0_TRANSPOSE: Q4_0 of `swapaxes(x, -1, -2)`: for `shape = (*lead, K, N)`,
    `values` is `(*lead, N, K // 32, 16)` and `scale` `(*lead, N, K // 32)`.
  * NF4: `values` uint8 with `shape` but the last contracted axis halved
    (two codes per byte), `scale` the float32 absmax per block of
    `group_size` (64) in the layout of grouped INT4 scales, or with double
    quantization its uint8 codes, and `stats` the float32 offset and
    256-block scales of those codes (see `peft.quant_nf4`). `axes` holds the
    contracted axes, counted from the end (negative), so that they stay
    right when `nnx.vmap` slices leading axes off. `stats` is None for
    every other method.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft.quantization import quantize
    >>> from peft.quantization import quantize
    >>> qa = quantize(jnp.ones((64, 8)), 'int4')
    >>> qa.values.dtype, qa.scale.shape, qa.nbytes  # 64*8/2 + 8*4 bytes
    (dtype(int4), (1, 8), 288)
    >>> qg = quantize(jnp.ones((64, 8)), 'fp8', group_size=32)
    >>> qg.values.dtype, qg.scale.shape, qg.nbytes  # 64*8 + 2*8*4 bytes
    (dtype(float8_e4m3fn), (2, 8), 576)
  """

  values: jax.Array
  scale: jax.Array
  method: QuantizationMethod
  shape: tuple[int, ...]
  group_size: int | None = None
  stats: jax.Array | None = None
  axes: tuple[int, ...] | None = None

  @property
  def double_quant(self) -> bool:
    """Whether the NF4 absmax is double-quantized (`stats` is set)."""
    return self.stats is not None

  def __post_init__(self):
    if not isinstance(self.method, QuantizationMethod):
      object.__setattr__(self, 'method', QuantizationMethod(self.method))
    if not isinstance(self.shape, tuple):
      object.__setattr__(self, 'shape', tuple(int(s) for s in self.shape))
    if self.group_size is not None:
      object.__setattr__(
          self,
          'group_size',
          _check_group_size(self.group_size, self.method, 'QArray'),
      )

  @property
  def ndim(self) -> int:
    """Number of dimensions of the float array."""
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Real storage in bytes (int4 counts half a byte per element).

    Examples:
      >>> import jax.numpy as jnp
      >>> from peft.quantization import quantize
      >>> from peft.quantization import quantize
      >>> quantize(jnp.ones((4, 64)), 'q4_0').nbytes  # 8 blocks * 18 bytes
      144
    """
    values_size = int(np.prod(self.values.shape))
    scale_size = int(np.prod(self.scale.shape))
    if jnp.dtype(self.values.dtype) == jnp.dtype(jnp.int4):
      values_bytes = (values_size + 1) // 2
    else:
      values_bytes = values_size * jnp.dtype(self.values.dtype).itemsize
    stats_bytes = 0 if self.stats is None else 4 * int(np.prod(
        self.stats.shape))
    return (values_bytes + scale_size * jnp.dtype(self.scale.dtype).itemsize
            + stats_bytes)

def storage_names(method, names, reduced_axes=(), *, group_size=None,
                  shape=None):
  """Names (e.g. sharding axes) of a `QArray`'s arrays from the kernel's names.

  `names` has one entry per axis of the float array (`None` for unnamed
  axes); the result is `(values_names, scale_names)`, one entry per axis of
  `QArray.values` and `QArray.scale`. INT4 / INT8 / FP8: values keep the
  names and the scale drops them on `reduced_axes` where it has size 1; with
  `group_size` (then `shape`, the float array's shape, is required) a
  reduced axis holding several groups keeps its name, since its scales split
  along it as the values do. Q4_0: values `(*lead, K // 32, 16)` get
  `(*names, None)` and the scale `(*lead, K // 32)` gets `names`: the
  block-count axis is named after the blocked axis. Q4_0_TRANSPOSE: the same
  with the last two axes swapped.

  Examples:
    >>> storage_names('int4', ('embed', 'mlp'), reduced_axes=(0,))
    (('embed', 'mlp'), (None, 'mlp'))
    >>> storage_names('int4', ('embed', 'mlp'), reduced_axes=(0,),
    ...               group_size=128, shape=(4096, 1024))
    (('embed', 'mlp'), ('embed', 'mlp'))
    >>> storage_names('q4_0_transpose', ('embed', 'mlp'))
    (('mlp', 'embed', None), ('mlp', 'embed'))
  """
  method = _as_method(method)
  names = tuple(names)
  group_size = _check_group_size(group_size, method, 'storage_names')
  if method is QuantizationMethod.Q4_0:
    return (*names, None), names
  if method is QuantizationMethod.Q4_0_TRANSPOSE:
    swapped = (*names[:-2], names[-1], names[-2])
    return (*swapped, None), swapped
  reduced = {a % len(names) for a in reduced_axes} if names else set()
  if group_size is None:
    return names, tuple(
        None if i in reduced else n for i, n in enumerate(names)
    )
  if shape is None:
    raise ValueError(
        'storage_names: with `group_size`, pass `shape` (the float array\'s'
        ' shape): which axes keep their names depends on it.'
    )
  shape = tuple(int(d) for d in shape)
  if len(shape) != len(names):
    raise ValueError(
        f'storage_names: `shape` {shape} and `names` {names} must have one'
        ' entry per axis each.'
    )
  layout = _scale_layout(
      shape, tuple(sorted(reduced)), group_size, 'storage_names', 'shape'
  )
  return names, tuple(
      None if i in reduced and layout[i] == 1 else n
      for i, n in enumerate(names)
  )


def kernel_names(method, values_names):
  """The float kernel's axis names from those of `QArray.values`.

  The inverse of `storage_names` on the values.

  Examples:
    >>> kernel_names('q4_0_transpose', ('mlp', 'embed', None))
    ('embed', 'mlp')
  """
  method = QuantizationMethod(method)
  v = tuple(values_names)
  if method is QuantizationMethod.Q4_0:
    return v[:-1]
  if method is QuantizationMethod.Q4_0_TRANSPOSE:
    return (*v[:-3], v[-2], v[-3])
  return v


def to_ggml_bytes(q: QArray) -> np.ndarray:
  """The exact ggml Q4_0 byte stream of a Q4_0 / Q4_0_TRANSPOSE `QArray`.

  Each block of 32 values is 18 bytes: the float16 scale (little-endian), then
  the 16 packed bytes. The result is shaped like ggml's (and
  `gguf.quants.quantize`'s) output: `(*lead, K // 32 * 18)` uint8. For
  Q4_0_TRANSPOSE the stream is that of `swapaxes(x, -1, -2)`, i.e.
  `(*lead, N, K // 32 * 18)`.

  Examples:
    >>> import numpy as np
    >>> from peft.quantization import quantize
    >>> from peft.quantization import quantize
    >>> qa = quantize(np.ones((2, 64), np.float32), 'q4_0')
    >>> to_ggml_bytes(qa).shape  # 2 rows of 2 blocks of 18 bytes
    (2, 36)
  """
  if not isinstance(q, QArray) or q.method not in (
      QuantizationMethod.Q4_0,
      QuantizationMethod.Q4_0_TRANSPOSE,
  ):
    got = q.method.name if isinstance(q, QArray) else type(q).__name__
    raise ValueError(
        '`to_ggml_bytes` needs a QArray quantized with Q4_0 or Q4_0_TRANSPOSE,'
        f' got {got}.'
    )
  values = np.asarray(q.values, dtype=np.uint8)
  scale = np.asarray(q.scale).astype('<f2').view(np.uint8)
  scale = scale.reshape(*values.shape[:-1], 2)
  blocks = np.concatenate([scale, values], axis=-1)  # (*lead, nb, 18)
  return blocks.reshape(*blocks.shape[:-2], -1)

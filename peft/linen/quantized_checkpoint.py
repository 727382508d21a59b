"""`quantize_checkpoint`: real quantization of a linen params tree.

Each `{'kernel': w, ...}` of the tree becomes `{'kernel': values, 'scale':
scale, ...}` (`peft.quantization.quantize`); boxed kernels
(`nn.Partitioned`) give storage boxed like them. Q4_0 and Q4_0_TRANSPOSE add a
one-byte marker leaf named after the method (see `LAYOUT_MARKERS`), which the
linen `Int4Dense` / `Int4Einsum` check.

Examples:
  >>> import jax.numpy as jnp
  >>> q = quantize_checkpoint({'kernel': jnp.ones((64, 32))}, method='q4_0')
  >>> sorted(q), q['q4_0'].dtype
  (['kernel', 'q4_0', 'scale'], dtype('uint8'))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp

from peft import quantization as _q
from peft.quant_methods import _REAL_METHODS
from peft.linen.lora import _unboxed

__all__ = ['LAYOUT_MARKERS', 'quantize_checkpoint']

QuantizationMethod = _q.QuantizationMethod

# Methods with packed storage (what `quantize` writes).
_PACKED_METHODS = _REAL_METHODS


# Q4_0 and Q4_0_TRANSPOSE storage of a square kernel have the same shapes and
# dtypes, so reading one as the other would silently give garbage.
# `quantize_checkpoint` (and `Int4Dense/Int4Einsum.init`) record the layout in
# a one-byte sibling leaf named after the method, `{'kernel', 'scale',
# 'q4_0': uint8[1]}`; the layers check it. A leaf key (not a value) is static
# under `jax.jit`, so the check runs at trace time. INT4 / INT8 storage needs
# no marker (their dtypes differ from each other and from Q4_0's).
#: The marker leaf's key for each method that needs one.
LAYOUT_MARKERS = {
    QuantizationMethod.Q4_0: 'q4_0',
    QuantizationMethod.Q4_0_TRANSPOSE: 'q4_0_transpose',
}


def layout_marker(*_):
  """The marker leaf's value: one byte (its key is what matters).

  Examples:
    >>> layout_marker().shape
    (1,)
  """
  return jnp.ones((1,), jnp.uint8)


# ---------------------------------------------------------------------------
# Checkpoint quantization.
# ---------------------------------------------------------------------------


def _path_str(path) -> str:
  return '/'.join(str(p) for p in path) or '<root>'


def as_method(method: Any, what: str, packed: bool) -> QuantizationMethod:
  """`method` checked (TypeError / ValueError naming `what`).

  Examples:
    >>> as_method('INT4', 'f', packed=True).value
    'int4'
  """
  if not isinstance(method, (QuantizationMethod, str)):
    raise TypeError(
        f'{what}: `method` must be a peft.QuantizationMethod or its name'
        f" (e.g. 'int4'), got {type(method).__name__}"
    )
  method = QuantizationMethod(method)  # ValueError listing valid names
  if packed and method not in _PACKED_METHODS:
    raise ValueError(
        f'{what}: method={method.value!r} has no packed storage; use one of'
        f' {[m.value for m in _PACKED_METHODS]} (SimulateQuantized* layers'
        ' accept every method).'
    )
  return method


def _mesh_axis_size(name, mesh) -> int | None:
  """Devices along the mesh axis (or axes) `name`; None when unknown."""
  if mesh is None or name is None:
    return None
  axes = (name,) if isinstance(name, str) else tuple(name)
  sizes = dict(mesh.shape)
  if not all(isinstance(a, str) and a in sizes for a in axes):
    return None  # e.g. logical names (nn.LogicallyPartitioned)
  size = 1
  for a in axes:
    size *= int(sizes[a])
  return size


def _known_mesh(box: nn.Partitioned, value):
  """The mesh the storage will be placed on, if it can be known here."""
  if box.mesh is not None:
    return box.mesh
  sharding = getattr(value, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return sharding.mesh
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _block_name(name, n_blocks: int, mesh):
  """The block axis keeps the kernel axis' name if the mesh splits it evenly.

  Sharding the `K // 32` blocks like the kernel's `K` axis keeps whole blocks
  on each device; it only works when the mesh axis size divides the number
  of blocks (unknown mesh: the name is kept).
  """
  size = _mesh_axis_size(name, mesh)
  if size is not None and n_blocks % size:
    return None
  return name


def _storage_names(names, method, kernel_shape, scale_shape, mesh,
                   group_size=None):
  """(values names, scale names) of the storage of a kernel named `names`.

  The layout rule is `peft.quantization.storage_names`; here the Q4_0 block
  axis keeps its name only when the mesh divides the block count.
  """
  if group_size is not None:  # groups / NF4 blocks: all axes but the last
    return _q.storage_names(method, names, tuple(range(len(names) - 1)),
                            group_size=group_size, shape=kernel_shape)
  reduced = tuple(i for i, (s, d) in enumerate(zip(scale_shape, kernel_shape))
                  if s != d)
  values, scale = _q.storage_names(method, names, reduced)
  if method in (QuantizationMethod.Q4_0, QuantizationMethod.Q4_0_TRANSPOSE):
    axis = -1 if method == QuantizationMethod.Q4_0 else -2
    block = _block_name(scale[-1], kernel_shape[axis] // 32, mesh)
    scale = (*scale[:-1], block)
    values = (*scale, None)
  return values, scale


def box_storage(box, qarray, kernel):
  """`qarray`'s values and scale boxed like the kernel's `box`.

  NF4 with double quantization also has `stats` (see `box_stats`).

  Examples:
    >>> import jax.numpy as jnp
    >>> q = _q.quantize(jnp.ones((4, 2)), 'int8')
    >>> [v.shape for v in box_storage(None, q, None)]
    [(4, 2), (1, 2)]
  """
  if not isinstance(box, nn.Partitioned):
    return qarray.values, qarray.scale
  values_names, scale_names = _storage_names(
      box.names, qarray.method, tuple(qarray.shape), tuple(qarray.scale.shape),
      _known_mesh(box, kernel), qarray.group_size)
  return (box.replace(value=qarray.values, names=values_names),
          box.replace(value=qarray.scale, names=scale_names))


def box_stats(box, qarray):
  """NF4's double-quantization `stats` (a few floats), replicated.

  Examples:
    >>> import jax.numpy as jnp
    >>> q = _q.quantize(jnp.ones((64, 2)), 'nf4', double_quant=True)
    >>> box_stats(None, q).shape
    (2,)
  """
  if not isinstance(box, nn.Partitioned):
    return qarray.stats
  return box.replace(value=qarray.stats, names=(None,))


def _quantize_tree(node: Mapping, method, path, options) -> Mapping:
  out = {}
  for key, value in node.items():
    if isinstance(value, Mapping):
      out[key] = _quantize_tree(value, method, path + (key,), options)
    else:
      out[key] = value
  box = kernel = node.get('kernel')
  if isinstance(kernel, nn.meta.AxisMetadata):  # e.g. nn.Partitioned
    kernel = _unboxed(kernel)
  if kernel is not None and not isinstance(kernel, Mapping):
    where = _path_str(path + ('kernel',))
    if 'scale' in node:
      raise ValueError(
          f'quantize_checkpoint: {where!r} already has a sibling'
          " 'scale'; the params look quantized already (quantize the float"
          ' checkpoint once)'
      )
    if getattr(kernel, 'ndim', 0) < 2:
      raise ValueError(
          f'quantize_checkpoint: {where!r} is not an array with at least 2'
          f' axes (got {type(kernel).__name__} of shape'
          f' {getattr(kernel, "shape", None)}); only layer kernels can be'
          ' quantized'
      )
    try:
      qarray = _q.quantize(jnp.asarray(kernel), method, **options)
    except ValueError as e:
      raise ValueError(f'quantize_checkpoint: {where!r}: {e}') from e
    out['kernel'], out['scale'] = box_storage(box, qarray, kernel)
    if qarray.stats is not None:
      out['stats'] = box_stats(box, qarray)
    if method in LAYOUT_MARKERS:
      out[LAYOUT_MARKERS[method]] = layout_marker()
  if type(node) is dict:  # pylint: disable=unidiomatic-typecheck
    return out
  try:
    return type(node)(out)
  except Exception:  # pylint: disable=broad-except
    return out


def quantize_checkpoint(
    params: Mapping[str, Any],
    method: QuantizationMethod | str = QuantizationMethod.INT4,
    *,
    group_size: int | None = None,
    double_quant: bool = False,
) -> Mapping[str, Any]:
  """Really quantizes every `kernel` of a linen params tree.

  Each `{'kernel': w, ...}` becomes `{'kernel': values, 'scale': scale, ...}`
  with the layout of `peft.quantization.quantize(w, method)`:

  * INT4 / INT8: `values` int4 / int8 with `w`'s shape, `scale` float32 of
    shape `[1, ..., 1, out]` (per output channel); the kernel is
    `values / scale`.
  * Q4_0: blocks of 32 along the last axis, 4.5 bits per weight: `values`
    uint8 `(*lead, K // 32, 16)` (packed nibbles, ggml layout) and `scale`
    float16 `(*lead, K // 32)`. Q4_0_TRANSPOSE: blocks along axis -2. Both
    add a one-byte marker leaf named after the method (`'q4_0'` or
    `'q4_0_transpose'`), because the two layouts have the same shapes for a
    square kernel: `Int4Dense` / `Int4Einsum` raise a ValueError when the
    marker names another method than theirs.
  * FP8: `values` float8_e4m3fn with `w`'s shape, float32 scales as INT8.
  * `group_size=g` (INT4 / INT8 / FP8): one scale per `g` values along the
    contracted axes (all but the last): `scale` `(K // g, N)` for `[K, N]`.
  * NF4 (bitsandbytes' QLoRA format): `values` uint8 `(K // 2, N)` (two
    codes per byte), `scale` the float32 absmax per block of 64 (or
    `group_size`) `(K // 64, N)`; with `double_quant=True` the absmax is
    stored as uint8 codes and a `'stats'` leaf holds their float32 offset
    and scales.

  Other leaves (biases, norms, LoRA `a`/`b`) are untouched; the input is not
  modified. A kernel boxed in `nn.Partitioned` (`nn.with_partitioning`) gives
  boxed `kernel` and `scale` of the same box class and mesh, so
  `nn.get_partition_spec` shards the storage like the kernel: INT4 / INT8
  values take the kernel's names and the scale `(None, ..., out_name)`; Q4_0
  values `(*lead_names, K_name, None)` and scale `(*lead_names, K_name)`,
  where the block axis keeps `K_name` only when the mesh (if known) divides
  the number of blocks `K // 32` (Q4_0_TRANSPOSE: the same along axis -2).
  `Int4Dense` / `Int4Einsum` read the result, boxed or not.

  Examples:
    >>> import jax.numpy as jnp
    >>> import peft
    >>> params = {'dense': {'kernel': jnp.ones((64, 32)), 'bias': jnp.zeros(32)}}
    >>> q = peft.quantize_checkpoint(params, method=peft.QuantizationMethod.Q4_0)
    >>> q['dense']['kernel'].shape, q['dense']['scale'].dtype
    ((64, 1, 16), dtype('float16'))

  Args:
    params: nested mapping of params (e.g. `model.init(...)['params']`).
    method: INT4 (default), INT8, FP8, NF4, Q4_0 or Q4_0_TRANSPOSE.
    group_size: INT4 / INT8 / FP8: scales per group of contracted values
      (None: per output channel); NF4: the block size (None: 64).
    double_quant: NF4 only: 8-bit absmax (bitsandbytes').

  Returns:
    A new tree of the same mapping kind.

  Raises:
    ValueError: for a method without packed storage, a kernel whose block
      axis is not a multiple of 32 (Q4_0), or an already quantized tree.
  """
  method = as_method(method, 'quantize_checkpoint', packed=True)
  if not isinstance(params, Mapping):
    raise TypeError(
        'quantize_checkpoint: `params` must be a nested mapping (dict /'
        f' FrozenDict) of arrays, got {type(params).__name__}'
    )
  options = dict(group_size=group_size, double_quant=double_quant)
  return _quantize_tree(params, method, (), options)

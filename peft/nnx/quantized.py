"""Quantized versions of `nnx.Linear`, `nnx.Einsum` and `nnx.LinearGeneral`.

Two families:

* `SimulateQuantizedLinear / Einsum / LinearGeneral(wrapped, method=...)`:
  quantization-aware training. The wrapped float layer keeps its params (they
  are the trainable params); the forward pass uses
  `simulate_quantize(kernel, method)` and the gradient flows straight through
  to the float kernel.
* `Int4Linear / Int4Einsum / Int4LinearGeneral.from_float(layer, method=...)`:
  inference layers holding real packed storage (per-channel int4 / int8, or
  ggml Q4_0 blocks) in a `QuantizedWeight` variable, which is not an
  `nnx.Param`, so wrapping one in a LoRA layer gives QLoRA: only the LoRA
  params train. Their output equals the simulate-quantized float layer's
  (to float32 rounding), but the matmul dequantizes the weight chunk by chunk
  inside a `lax.fori_loop`, so the float32 weight is never materialised.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from peft.nnx.quantized import Int4Linear
  >>> layer = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  >>> q = Int4Linear.from_float(layer, method='q4_0')
  >>> q(jnp.ones((2, 64))).shape, q.nbytes  # 64*32 weights in 18-byte blocks
  ((2, 32), 1152)

Storage: two `QuantizedWeight` variables, `values` and `scale`, the leaves
of the `peft.quantization.QArray` of the float kernel (the codec's own layout,
with any stacking axes from `nnx.vmap` in front); `layer.qarray` rebuilds the
QArray and `layer.weight` is a `QuantizedWeight` view holding it. Each
variable has its own `out_sharding` metadata derived from the float kernel's
names, so `nnx.get_partition_spec` and `nnx.eval_shape` under a mesh work,
and storage created under a mesh is sharded like the kernel it replaces:

* INT4 / INT8: `values` = the kernel's names, `scale` = the same with None on
  the reduced (contracted) axes;
* Q4_0: `values` `(*lead, K // 32, 16)` = `(*names, None)`, `scale`
  `(*lead, K // 32)` = `names`; Q4_0_TRANSPOSE: the same on the kernel with
  its last two axes swapped. A mesh axis that does not divide the number of
  blocks is dropped (that axis is replicated).

The forward pass never trusts the QArray's static `shape` metadata (it goes
stale when `nnx.vmap`/`nnx.scan` slice the leaves); shapes are derived from
the `values` array instead.
"""

from __future__ import annotations

import math
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from peft import einsum as _einsum
from peft.quantization import QArray
from peft.quantization import QuantizationMethod
from peft.quantization import dequantize
from peft.quantization import quantize
from peft.quantization import simulate_quantize
from peft.quantization import storage_names

__all__ = [
    'QuantizedWeight',
    'SimulateQuantizedLinear',
    'SimulateQuantizedEinsum',
    'SimulateQuantizedLinearGeneral',
    'Int4Linear',
    'Int4Einsum',
    'Int4LinearGeneral',
]

_LINEAR = 'linear'
_EINSUM = 'einsum'
_LINEAR_GENERAL = 'linear_general'

_FLOAT_TYPES = {
    _LINEAR: nnx.Linear,
    _EINSUM: nnx.Einsum,
    _LINEAR_GENERAL: nnx.LinearGeneral,
}

# Configuration attributes of each flax layer (read by `_layer_call`).
_GEOMETRY = {
    _LINEAR: (
        'in_features', 'out_features', 'use_bias', 'dtype', 'param_dtype',
        'precision', 'dot_general', 'promote_dtype', 'preferred_element_type',
    ),
    _LINEAR_GENERAL: (
        'in_features', 'out_features', 'axis', 'batch_axis', 'use_bias',
        'dtype', 'param_dtype', 'precision', 'dot_general', 'dot_general_cls',
        'promote_dtype', 'preferred_element_type',
    ),
    _EINSUM: (
        'einsum_str', 'bias_shape', 'dtype', 'param_dtype', 'precision',
        'promote_dtype', 'einsum_op', 'preferred_element_type',
    ),
}

_INT4_METHODS = (
    QuantizationMethod.INT4,
    QuantizationMethod.INT8,
    QuantizationMethod.Q4_0,
    QuantizationMethod.Q4_0_TRANSPOSE,
)
_Q4_0_BLOCK = 32
# One compiled program per kernel shape instead of dozens of eager ops.
_quantize = jax.jit(quantize, static_argnames=('method', 'axis_to_reduce'))
# Elements of the float32 weight chunk dequantized per loop step (4 MiB): big
# enough for an efficient matmul, small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------
# Layer geometry.


def _kind_of(layer: Any) -> str | None:
  kind = getattr(type(layer), '_peft_kind', None)
  if kind is not None:
    return kind
  for kind, cls in _FLOAT_TYPES.items():
    if isinstance(layer, cls):
      return kind
  return None


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
  return tuple(sorted(a if a >= 0 else ndim + a for a in axes))


def _layer_einsum_str(layer: Any, einsum_str: str | None) -> str:
  s = einsum_str if einsum_str is not None else layer.einsum_str
  if s is None:
    raise ValueError(
        'No `einsum_str` was given to the Einsum layer, neither as a'
        ' constructor attribute nor as a call argument; pass one.'
    )
  return s.replace(' ', '')


def _kernel_ndim(layer: Any, kind: str, einsum_str: str | None = None) -> int:
  """Number of kernel axes of one (unstacked) layer."""
  if kind == _LINEAR:
    return 2
  if kind == _LINEAR_GENERAL:
    return (
        len(layer.batch_axis) + len(layer.in_features) + len(layer.out_features)
    )
  return len(_einsum.parse_einsum_str(_layer_einsum_str(layer, einsum_str)).weights)


def _reduced_axes(layer: Any, kind: str, einsum_str: str | None = None):
  """Contracted kernel axes of one (unstacked) layer: the per-channel axes."""
  if kind == _LINEAR:
    return (0,)
  if kind == _LINEAR_GENERAL:
    nb = len(layer.batch_axis)
    return tuple(range(nb, nb + len(layer.in_features)))
  return _einsum.reduced_weight_axes(_layer_einsum_str(layer, einsum_str))


def _stack_depth(layer: Any, kind: str, kernel_shape, what: str) -> int:
  """Leading stacking axes (from `nnx.vmap`) of a kernel; checks the rank."""
  lead = len(kernel_shape) - _kernel_ndim(layer, kind)
  if lead < 0:
    raise ValueError(
        f'{what}: the kernel has shape {tuple(kernel_shape)}, fewer axes than'
        f' the {kind} layer geometry needs ({_kernel_ndim(layer, kind)});'
        ' the layer is inconsistent.'
    )
  return lead


def _expand_ellipsis(einsum_str: str, x_ndim: int) -> tuple[str, str, str]:
  """Einsum subscripts with `...` replaced by fresh letters (as opt_einsum)."""
  parts = _einsum.parse_einsum_str(einsum_str)
  ins, ws, outs = parts
  if '...' not in ins:
    return ins, ws, outs
  used = set(ins + ws + outs)
  n = x_ndim - (len(ins) - 3)
  if n < 0:
    raise ValueError(
        f'einsum_str={einsum_str!r} names {len(ins) - 3} input axes besides'
        f' "...", but the inputs have only {x_ndim} dimensions.'
    )
  fresh = ''.join([c for c in string.ascii_letters if c not in used][:n])
  return ins.replace('...', fresh), ws, outs.replace('...', fresh)


def _bias_shape(layer, kind, x_shape, y_ndim, kernel_shape, einsum_str):
  """The shape the bias is reshaped to before it is added to the output."""
  if kind == _LINEAR:
    return (1,) * (y_ndim - 1) + (-1,)
  if kind == _LINEAR_GENERAL:
    ndim = len(x_shape)
    axis = _normalize_axes(layer.axis, ndim)
    batch = _normalize_axes(tuple(layer.batch_axis.keys()), ndim)
    expanded = tuple(
        x_shape[a] if a in batch else 1 for a in range(ndim) if a not in axis
    )
    return expanded + tuple(layer.out_features)
  ins, ws, outs = _expand_ellipsis(einsum_str, len(x_shape))
  del ins
  return tuple(
      kernel_shape[ws.index(c)] if c in ws else 1 for c in outs
  )


def _dot_kwargs(layer, out_sharding) -> dict[str, Any]:
  kw: dict[str, Any] = {'out_sharding': out_sharding}
  if layer.preferred_element_type is not None:
    kw['preferred_element_type'] = layer.preferred_element_type
  return kw


def _contract(layer, kind, x, kernel, einsum_str, out_sharding):
  """The layer's contraction of promoted `x` with a float `kernel` (flax's)."""
  kw = _dot_kwargs(layer, out_sharding)
  if kind == _LINEAR:
    return layer.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
        precision=layer.precision, **kw,
    )
  if kind == _LINEAR_GENERAL:
    axis = _normalize_axes(layer.axis, x.ndim)
    batch = _normalize_axes(tuple(layer.batch_axis.keys()), x.ndim)
    nb = len(batch)
    batch_ind = tuple(range(nb))
    contract_ind = tuple(range(nb, nb + len(axis)))
    if layer.dot_general_cls is not None:
      dot_general = layer.dot_general_cls()
    elif layer.dot_general is not None:
      dot_general = layer.dot_general
    else:
      dot_general = lax.dot_general
    return dot_general(
        x, kernel, ((axis, contract_ind), (batch, batch_ind)),
        precision=layer.precision, **kw,
    )
  return layer.einsum_op(einsum_str, x, kernel, precision=layer.precision, **kw)


def _layer_call(layer, kind, inputs, kernel, *, einsum_str=None,
                out_sharding=None):
  """Output of a `kind` layer configured like `layer`, for a given kernel.

  The one place for the layer math (dtype promotion, contraction, bias
  broadcast), shared by the SimulateQuantized* and Int4* modules. `layer`
  supplies the configuration attributes (those of the flax layer) and the
  `bias` variable. `kernel` is a float array (flax's contraction is used), or
  a `QArray` (blockwise dequantizing contraction, see `_quantized_contract`).
  """
  if kind == _EINSUM:
    einsum_str = _layer_einsum_str(layer, einsum_str)
  bias = layer.bias[...] if layer.bias is not None else None
  if isinstance(kernel, QArray):
    kernel_shape = _qarray_kernel_shape(kernel)
    probe = jnp.zeros((), layer.param_dtype)
    x, probe, bias = layer.promote_dtype(
        (inputs, probe, bias), dtype=layer.dtype
    )
    y = _quantized_contract(
        layer, kind, x, kernel, probe.dtype, einsum_str, out_sharding
    )
  else:
    kernel_shape = kernel.shape
    x, kernel, bias = layer.promote_dtype(
        (inputs, kernel, bias), dtype=layer.dtype
    )
    y = _contract(layer, kind, x, kernel, einsum_str, out_sharding)
  if bias is not None:
    shape = _bias_shape(layer, kind, x.shape, y.ndim, kernel_shape, einsum_str)
    y = y + jnp.reshape(bias, shape)
  return y


# ----------------------------------------------------------------------------
# Blockwise dequantizing contraction.


def _qarray_kernel_shape(q: QArray) -> tuple[int, ...]:
  """The float kernel shape, derived from the leaves (not `q.shape`)."""
  v = q.values.shape
  if q.method is QuantizationMethod.Q4_0:
    return (*v[:-2], v[-2] * _Q4_0_BLOCK)
  if q.method is QuantizationMethod.Q4_0_TRANSPOSE:
    return (*v[:-3], v[-2] * _Q4_0_BLOCK, v[-3])
  return tuple(v)


def _with_shape(q: QArray) -> QArray:
  """`q` with its static shape re-derived from the leaves."""
  shape = _qarray_kernel_shape(q)
  if tuple(q.shape) == shape:
    return q
  return QArray(values=q.values, scale=q.scale, method=q.method, shape=shape)


class _Plan(NamedTuple):
  """How to see a contraction as `(B, M, K) x (B, K, N) -> (B, M, N)`."""

  x_perm: tuple[int, ...]  # x axes ordered batch, free, contracted
  nb: int  # kernel batch axes
  nk: int  # kernel contracted axes
  out_perm: tuple[int, ...] | None  # canonical (B, F, N) axes -> output


def _plan(layer, kind, x_ndim, kernel_ndim, einsum_str) -> _Plan | None:
  """The canonical view, or None when the kernel axes are not ordered
  (batch, contracted, output) or the contraction sums input-only axes."""
  if kind == _LINEAR:
    return _Plan(tuple(range(x_ndim)), 0, 1, None)
  if kind == _LINEAR_GENERAL:
    axis = _normalize_axes(layer.axis, x_ndim)
    batch = _normalize_axes(tuple(layer.batch_axis.keys()), x_ndim)
    free = tuple(a for a in range(x_ndim) if a not in axis and a not in batch)
    return _Plan(batch + free + axis, len(batch), len(axis), None)
  ins, ws, outs = _expand_ellipsis(einsum_str, x_ndim)
  if len(ins) != x_ndim or len(ws) != kernel_ndim:
    return None
  batch = [c for c in ws if c in ins and c in outs]
  red = [c for c in ws if c in ins and c not in outs]
  out = [c for c in ws if c in outs and c not in ins]
  free = [c for c in ins if c not in ws]
  if ''.join(batch + red + out) != ws or not red or not out:
    return None
  if any(c not in outs for c in free):
    return None  # an input-only axis is summed over
  canon = batch + free + out
  if len(outs) != len(canon) or set(outs) != set(canon):
    return None
  x_perm = tuple(ins.index(c) for c in batch + free + red)
  out_perm = tuple(canon.index(c) for c in outs)
  if out_perm == tuple(range(len(out_perm))):
    out_perm = None
  return _Plan(x_perm, len(batch), len(red), out_perm)


def _sum_chunks(total, size, fn, init):
  """`init + sum(fn(start, n))` over chunks of `size` covering `[0, total)`.

  `fn` is rematerialised in the backward pass (`jax.checkpoint`), so a
  gradient through the loop does not save every dequantized chunk (which
  would add up to the whole float kernel).
  """
  fn = jax.checkpoint(fn, static_argnums=(1,))
  count, tail = divmod(total, size)
  acc = init
  add = lambda a, b: jax.tree.map(jnp.add, a, b)
  if count == 1:
    acc = add(acc, fn(0, size))
  elif count > 1:
    acc = lax.fori_loop(
        0, count, lambda i, a: add(a, fn(i * size, size)), acc
    )
  if tail:
    acc = add(acc, fn(count * size, tail))
  return acc


def _map_chunks(total, size, fn, out, axis):
  """Writes `fn(start, n)` into `out` along `axis`, chunk by chunk."""
  fn = jax.checkpoint(fn, static_argnums=(1,))
  count, tail = divmod(total, size)
  put = lambda o, start, n: lax.dynamic_update_slice_in_dim(
      o, fn(start, n), start, axis
  )
  if count == 1:
    out = put(out, 0, size)
  elif count > 1:
    out = lax.fori_loop(0, count, lambda i, o: put(o, i * size, size), out)
  if tail:
    out = put(out, count * size, tail)
  return out


def _chunk(total: int, per_row: int) -> int:
  return max(1, min(total, _CHUNK_ELEMENTS // max(1, per_row)))


def _bmm(x, w, precision, acc_dtype):
  """`(B, M, K) x (B, K, N) -> (B, M, N)`."""
  return lax.dot_general(
      x, w, (((2,), (1,)), ((0,), (0,))),
      precision=precision, preferred_element_type=acc_dtype,
  )


def _int_matmul(xc, q, dims, cdt, acc, precision):
  """Per-channel INT4/INT8: `sum_k x[k] * values[k]`, then divide by scale."""
  b, k, n = dims
  values = q.values.reshape(b, k, n)
  scale = q.scale.astype(jnp.float32).reshape(b, 1, n)
  m = xc.shape[1]
  if q.method is QuantizationMethod.INT4 and n % 2 == 0:
    # Two int4 per byte (low nibble = even column): unpack with shifts,
    # which XLA vectorises, instead of converting int4 element by element.
    packed = lax.bitcast_convert_type(values.reshape(b, k, n // 2, 2), jnp.int8)

    def part(start, size):
      xs = lax.dynamic_slice_in_dim(xc, start, size, 2)
      p = lax.dynamic_slice_in_dim(packed, start, size, 1)
      lo = lax.shift_right_arithmetic(lax.shift_left(p, jnp.int8(4)), jnp.int8(4))
      hi = lax.shift_right_arithmetic(p, jnp.int8(4))
      return (_bmm(xs, lo.astype(cdt), precision, acc),
              _bmm(xs, hi.astype(cdt), precision, acc))

    zero = jnp.zeros((b, m, n // 2), acc)
    lo, hi = _sum_chunks(k, _chunk(k, b * n), part, (zero, zero))
    y = jnp.stack([lo, hi], axis=-1).reshape(b, m, n)
  else:

    def part(start, size):
      xs = lax.dynamic_slice_in_dim(xc, start, size, 2)
      v = lax.dynamic_slice_in_dim(values, start, size, 1)
      return _bmm(xs, v.astype(cdt), precision, acc)

    y = _sum_chunks(k, _chunk(k, b * n), part, jnp.zeros((b, m, n), acc))
  return y / scale.astype(acc)


def _nibbles(v, d, cdt):
  """Q4_0 bytes and scales -> the dequantized low and high halves of blocks."""
  d = d.astype(jnp.float32)[..., None]
  lo = (v & 0x0F).astype(jnp.float32) - jnp.float32(8.0)
  hi = (v >> 4).astype(jnp.float32) - jnp.float32(8.0)
  return (d * lo).astype(cdt), (d * hi).astype(cdt)


def _q4_0_matmul(xc, q, dims, cdt, acc, precision):
  """Q4_0 with blocks along N: chunk over K, split each block in halves."""
  b, k, n = dims
  g = n // _Q4_0_BLOCK
  values = q.values.reshape(b, k, g, _Q4_0_BLOCK // 2)
  scale = q.scale.reshape(b, k, g)
  m = xc.shape[1]

  def part(start, size):
    xs = lax.dynamic_slice_in_dim(xc, start, size, 2)
    v = lax.dynamic_slice_in_dim(values, start, size, 1)
    d = lax.dynamic_slice_in_dim(scale, start, size, 1)
    lo, hi = _nibbles(v, d, cdt)
    half = (b, size, n // 2)
    return (_bmm(xs, lo.reshape(half), precision, acc),
            _bmm(xs, hi.reshape(half), precision, acc))

  zero = jnp.zeros((b, m, n // 2), acc)
  lo, hi = _sum_chunks(k, _chunk(k, b * n), part, (zero, zero))
  half = (b, m, g, _Q4_0_BLOCK // 2)
  return jnp.concatenate([lo.reshape(half), hi.reshape(half)], -1).reshape(
      b, m, n
  )


def _q4_0_transpose_matmul(xc, q, dims, k_shape, cdt, acc, precision):
  """Q4_0_TRANSPOSE (blocks along the last contracted axis, one output axis).

  The storage holds the kernel's columns as rows of blocks, so the loop runs
  over chunks of output columns, each a full contraction.
  """
  b, k, n = dims
  k_last = k_shape[-1]
  k1 = k // k_last
  g = k_last // _Q4_0_BLOCK
  h = _Q4_0_BLOCK // 2
  values = q.values.reshape(b, k1, n, g, h)
  scale = q.scale.reshape(b, k1, n, g)
  m = xc.shape[1]
  x6 = xc.reshape(b, m, k1, g, 2, h)
  x_lo = x6[:, :, :, :, 0].reshape(b, m, k1, g * h)
  x_hi = x6[:, :, :, :, 1].reshape(b, m, k1, g * h)
  dims_ = (((1, 3), (2, 3)), ((0,), (0,)))  # w (b,k1,nc,gh) . x (b,m,k1,gh)

  def part(start, size):
    v = lax.dynamic_slice_in_dim(values, start, size, 2)
    d = lax.dynamic_slice_in_dim(scale, start, size, 2)
    lo, hi = _nibbles(v, d, cdt)
    shape = (b, k1, size, g * h)
    y = lax.dot_general(lo.reshape(shape), x_lo, dims_, precision=precision,
                        preferred_element_type=acc)
    return y + lax.dot_general(hi.reshape(shape), x_hi, dims_,
                               precision=precision, preferred_element_type=acc)

  out = jnp.zeros((b, n, m), acc)
  out = _map_chunks(n, _chunk(n, b * k), part, out, 1)
  return jnp.swapaxes(out, 1, 2)


def _quantized_contract(layer, kind, x, q, cdt, einsum_str, out_sharding):
  """Contraction of promoted `x` with the quantized kernel `q`.

  Dequantizes chunk by chunk inside the matmul when the layer uses the
  default dot_general / einsum and its kernel axes are ordered (batch,
  contracted, output); otherwise (custom dot_general or einsum_op, other axis
  orders, Q4_0_TRANSPOSE whose block axis is not contracted) it dequantizes
  the whole kernel and uses the flax contraction.
  """
  k_shape = _qarray_kernel_shape(q)
  if len(k_shape) != _kernel_ndim(layer, kind, einsum_str):
    raise ValueError(
        f'The quantized kernel has shape {k_shape} with leading stacking axes'
        ' (the layer was built under nnx.vmap); call it inside'
        ' nnx.vmap / nnx.scan, which slice the stacking axes off.'
    )
  plan = None
  default_op = (
      (kind == _LINEAR and layer.dot_general is lax.dot_general)
      or (kind == _LINEAR_GENERAL and layer.dot_general_cls is None
          and layer.dot_general in (None, lax.dot_general))
      or (kind == _EINSUM and layer.einsum_op is jnp.einsum)
  )
  if default_op and out_sharding is None:
    plan = _plan(layer, kind, x.ndim, len(k_shape), einsum_str)
  if plan is not None:
    kb = k_shape[:plan.nb]
    kk = k_shape[plan.nb:plan.nb + plan.nk]
    kn = k_shape[plan.nb + plan.nk:]
    if q.method is QuantizationMethod.Q4_0_TRANSPOSE and len(kn) != 1:
      plan = None
  if plan is None:
    kernel = dequantize(_with_shape(q), jnp.float32).astype(cdt)
    return _contract(layer, kind, x, kernel, einsum_str, out_sharding)

  xt = jnp.transpose(x, plan.x_perm)
  xb = xt.shape[:plan.nb]
  xf = xt.shape[plan.nb:xt.ndim - plan.nk]
  xk = xt.shape[xt.ndim - plan.nk:]
  if tuple(xb) != tuple(kb) or tuple(xk) != tuple(kk):
    raise ValueError(
        f'inputs of shape {x.shape} do not fit the quantized kernel of shape'
        f' {k_shape}: batch axes {tuple(xb)} vs {tuple(kb)}, contracted axes'
        f' {tuple(xk)} vs {tuple(kk)}.'
    )
  b, m, k, n = math.prod(kb), math.prod(xf), math.prod(kk), math.prod(kn)
  xc = xt.reshape(b, m, k).astype(cdt)
  acc = jnp.promote_types(cdt, jnp.float32)
  dims = (b, k, n)
  if q.method is QuantizationMethod.Q4_0:
    y = _q4_0_matmul(xc, q, dims, cdt, acc, layer.precision)
  elif q.method is QuantizationMethod.Q4_0_TRANSPOSE:
    y = _q4_0_transpose_matmul(xc, q, dims, kk, cdt, acc, layer.precision)
  else:
    y = _int_matmul(xc, q, dims, cdt, acc, layer.precision)
  out_dtype = layer.preferred_element_type or cdt
  y = y.astype(out_dtype).reshape(*xb, *xf, *kn)
  if plan.out_perm is not None:
    y = jnp.transpose(y, plan.out_perm)
  return y


# ----------------------------------------------------------------------------
# Modules.


def _as_method(method: Any, what: str) -> QuantizationMethod:
  if isinstance(method, QuantizationMethod):
    return method
  if not isinstance(method, str):
    raise TypeError(
        f'{what}: `method` must be a QuantizationMethod or its name (e.g.'
        f" 'int4'), got {type(method).__name__}."
    )
  return QuantizationMethod(method)  # ValueError listing the valid names


def _check_float_layer(cls, layer, what):
  kind = cls._peft_kind
  float_type = _FLOAT_TYPES[kind]
  if not isinstance(layer, float_type):
    raise TypeError(
        f'{what}: `wrapped` must be an nnx.{float_type.__name__}, got'
        f' {type(layer).__name__}; use the'
        ' SimulateQuantized*/Int4* class matching the layer type'
        ' (Linear, Einsum or LinearGeneral).'
    )


def _check_block_axis(method, kernel_shape, layer, what):
  """Q4_0 / Q4_0_TRANSPOSE need the block axis to be a multiple of 32."""
  if method is QuantizationMethod.Q4_0:
    axis, which = len(kernel_shape) - 1, 'last'
  elif method is QuantizationMethod.Q4_0_TRANSPOSE:
    axis, which = len(kernel_shape) - 2, 'second-to-last'
  else:
    return
  n = kernel_shape[axis] if axis >= 0 else 0
  if axis < 0 or n % _Q4_0_BLOCK:
    raise ValueError(
        f'{what}: method={method.value!r} quantizes the kernel in blocks of'
        f' {_Q4_0_BLOCK} along its {which} axis (axis {axis}), but the'
        f' kernel of the wrapped nnx.{type(layer).__name__} has shape'
        f' {tuple(kernel_shape)}: length {n} on that axis is not a multiple'
        f' of {_Q4_0_BLOCK}. Use a layer whose axis {axis} is a multiple of'
        f' {_Q4_0_BLOCK}, or a per-channel method (int4, int8).'
    )


# ----------------------------------------------------------------------------
# Sharding of the quantized storage.


def _kernel_names(meta, ndim: int) -> tuple[Any, ...] | None:
  """The float kernel's sharding names, one per axis (None if unnamed)."""
  names = meta.get('out_sharding')
  if not names or not isinstance(names, (tuple, list, PartitionSpec)):
    return None
  names = tuple(names)
  if len(names) < ndim:  # stacking axes added without a name
    names = (None,) * (ndim - len(names)) + names
  return names if len(names) == ndim else None


def _current_mesh(meta):
  mesh = meta.get('mesh')
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      mesh = None
  return mesh


def _mesh_axes(name, meta) -> tuple[str, ...]:
  """The mesh axes a (possibly logical) sharding name maps to."""
  from flax.core import spmd as core_spmd  # pylint: disable=g-import-not-at-top
  context = core_spmd.get_logical_axis_rules()
  local = meta.get('sharding_rules') or ()
  if context or local:
    rules = core_spmd.composite_rules(context, local)
    name = core_spmd.from_sharding_rules((name,), rules)[0]
  if isinstance(name, str):
    return (name,)
  if isinstance(name, (tuple, list)):
    return tuple(n for n in name if isinstance(n, str))
  return ()


def _fit_names(names, shape, meta, mesh):
  """`names` with None where the mesh axes do not divide the storage axis.

  The float kernel fits its mesh, but Q4_0 storage has K // 32 blocks on the
  blocked axis, which a mesh axis may not divide (e.g. K = 64 on 4 devices):
  that axis is then replicated instead of failing.
  """
  if mesh is None:
    return names
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  out = []
  for name, dim in zip(names, shape):
    n = math.prod(sizes.get(a, 1) for a in _mesh_axes(name, meta))
    out.append(name if dim % n == 0 else None)
  return tuple(out)


def _concrete_mesh(value):
  """The mesh of a concrete array placed with a NamedSharding, else None."""
  if isinstance(value, jax.core.Tracer):
    return None
  sharding = getattr(value, 'sharding', None)
  if isinstance(sharding, NamedSharding):
    return sharding.mesh
  return None


def _sharded_variable(var_type, value, names, source_meta, like=None,
                      **extra):
  """A `var_type` holding `value`, annotated and placed with `names`.

  `names` (or None) are the storage's sharding names, `source_meta` the float
  kernel's metadata (its `mesh`, `sharding_rules` and `eager_sharding` are
  kept). With eager sharding the value is placed like a flax Param created
  with `out_sharding`; when no mesh is current (the model was built under
  `jax.set_mesh` and is converted outside it), it is placed on the mesh of the
  array `like` (the float kernel).
  """
  if names is None:
    return var_type(value, **extra)
  meta = dict(extra)
  for key in ('mesh', 'sharding_rules'):
    if source_meta.get(key):
      meta[key] = source_meta[key]
  mesh = _current_mesh(meta)
  shape = getattr(value, 'shape', ())
  if mesh is None:
    mesh_of_like = _concrete_mesh(like)
    names = _fit_names(names, shape, meta, mesh_of_like)
  else:
    mesh_of_like = None
    names = _fit_names(names, shape, meta, mesh)
  meta['out_sharding'] = tuple(names)
  eager = source_meta.get('eager_sharding')
  if eager is None:
    eager = nnx.using_eager_sharding()
  if eager and mesh is not None:
    try:
      return var_type(value, eager_sharding=True, **meta)
    except TypeError:  # e.g. a single-device array under an abstract mesh
      mesh_of_like = _concrete_mesh(like)
  var = var_type(value, eager_sharding=False, **meta)
  if eager and mesh_of_like is not None:
    from flax.nnx import spmd  # pylint: disable=g-import-not-at-top
    spec = spmd.get_var_pspec(var)
    var.set_value(jax.device_put(value, NamedSharding(mesh_of_like, spec)))
  return var


class QuantizedWeight(nnx.Variable):
  """A variable holding quantized storage: packed values or their scales.

  Not an `nnx.Param`, so optimizers built with `wrt=nnx.Param` (or
  `nnx.LoRAParam`) leave it alone: the base of a QLoRA model stays frozen.
  An `Int4*` layer keeps its kernel in two of them, `values` and `scale`
  (the leaves of a `peft.quantization.QArray`), each an array with its own
  `out_sharding` metadata, so the usual flax sharding recipes
  (`nnx.get_partition_spec`, `nnx.eval_shape` under `jax.set_mesh`) work.
  The layer's `weight` property gives a `QuantizedWeight` view holding the
  whole `QArray`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from peft.quantization import quantize
    >>> w = QuantizedWeight(quantize(jnp.ones((32, 4)), 'int4').values)
    >>> w.get_value().dtype
    dtype(int4)
  """


def _geometry_property(name):
  return property(
      lambda self: getattr(self.wrapped, name),
      doc=f'`{name}` of the wrapped layer.',
  )


class _SimulateBase(nnx.Module):

  def __treescope_repr__(self, path, subtree_renderer):
    from peft.nnx import visual  # pylint: disable=g-import-not-at-top
    return visual.simulated_treescope_repr(self, path, subtree_renderer)
  _peft_kind: str = ''

  def __init__(self, wrapped, *, method=QuantizationMethod.INT4):
    what = type(self).__name__
    _check_float_layer(type(self), wrapped, what)
    method = _as_method(method, what)
    _check_block_axis(method, tuple(wrapped.kernel.shape), wrapped, what)
    self.wrapped = wrapped
    self.method = method

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    for name in _GEOMETRY.get(cls._peft_kind, ()):
      if name not in cls.__dict__:
        setattr(cls, name, _geometry_property(name))

  @property
  def kernel(self):
    """The wrapped layer's (float, trainable) kernel variable."""
    return self.wrapped.kernel

  @property
  def bias(self):
    """The wrapped layer's bias variable (or None)."""
    return self.wrapped.bias

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the kernel (with any leading `nnx.vmap` stacking axes)."""
    return tuple(self.wrapped.kernel.shape)

  def _quantized_kernel(self, einsum_str=None):
    kernel = self.wrapped.kernel[...]
    kind = self._peft_kind
    lead = _stack_depth(self.wrapped, kind, kernel.shape, type(self).__name__)
    axes = tuple(
        a + lead for a in _reduced_axes(self.wrapped, kind, einsum_str)
    )
    return simulate_quantize(kernel, self.method, axis_to_reduce=axes)


class SimulateQuantizedLinear(_SimulateBase):
  """`nnx.Linear` whose kernel is fake-quantized in the forward pass.

  The params are the wrapped layer's; the forward uses
  `simulate_quantize(kernel, method)` (per output channel for INT4 / INT8)
  and the gradient passes straight through to the float kernel.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = SimulateQuantizedLinear(
    ...     nnx.Linear(64, 32, rngs=nnx.Rngs(0)), method='q4_0')
    >>> layer(jnp.ones((2, 64))).shape
    (2, 32)
  """

  _peft_kind = _LINEAR

  def __call__(self, inputs, out_sharding=None):
    """Applies the layer with the fake-quantized kernel."""
    return _layer_call(
        self.wrapped, _LINEAR, inputs, self._quantized_kernel(),
        out_sharding=out_sharding,
    )


class SimulateQuantizedEinsum(_SimulateBase):
  """`nnx.Einsum` whose kernel is fake-quantized in the forward pass.

  INT4 / INT8 scales are per channel, reduced over the contracted kernel
  axes (`peft.einsum.reduced_weight_axes`); batch axes such as experts get
  their own scales.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> inner = nnx.Einsum('bd,dnh->bnh', (64, 2, 32), rngs=nnx.Rngs(0))
    >>> layer = SimulateQuantizedEinsum(inner, method='int4')
    >>> layer(jnp.ones((3, 64))).shape
    (3, 2, 32)
  """

  _peft_kind = _EINSUM

  def __call__(self, inputs, einsum_str=None, out_sharding=None):
    """Applies the layer with the fake-quantized kernel."""
    return _layer_call(
        self.wrapped, _EINSUM, inputs, self._quantized_kernel(einsum_str),
        einsum_str=einsum_str, out_sharding=out_sharding,
    )


class SimulateQuantizedLinearGeneral(_SimulateBase):
  """`nnx.LinearGeneral` whose kernel is fake-quantized in the forward pass.

  INT4 / INT8 scales are per output channel and per `batch_axis` index,
  reduced over the contracted (`axis`) kernel axes.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> inner = nnx.LinearGeneral(64, (2, 32), rngs=nnx.Rngs(0))
    >>> layer = SimulateQuantizedLinearGeneral(inner, method='q4_0')
    >>> layer(jnp.ones((3, 64))).shape
    (3, 2, 32)
  """

  _peft_kind = _LINEAR_GENERAL

  def __call__(self, inputs, out_sharding=None):
    """Applies the layer with the fake-quantized kernel."""
    return _layer_call(
        self.wrapped, _LINEAR_GENERAL, inputs, self._quantized_kernel(),
        out_sharding=out_sharding,
    )


class _Int4Base(nnx.Module):

  def __treescope_repr__(self, path, subtree_renderer):
    from peft.nnx import visual  # pylint: disable=g-import-not-at-top
    return visual.quantized_treescope_repr(self, path, subtree_renderer)
  _peft_kind: str = ''

  def __init__(self, layer, *, method=None):
    what = f'{type(self).__name__}.from_float'
    if isinstance(layer, _SimulateBase) and layer._peft_kind == self._peft_kind:
      if method is None:
        method = layer.method
      layer = layer.wrapped
    if method is None:
      method = QuantizationMethod.INT4
    _check_float_layer(type(self), layer, what)
    method = _as_method(method, what)
    if method not in _INT4_METHODS:
      raise ValueError(
          f'{what}: `method`={method.value!r} has no packed storage; use one'
          f' of {[m.value for m in _INT4_METHODS]} (or SimulateQuantized* for'
          ' fake quantization).'
      )
    kind = self._peft_kind
    kernel = layer.kernel[...]
    lead = _stack_depth(layer, kind, kernel.shape, what)
    _check_block_axis(method, tuple(kernel.shape), layer, what)
    for name in _GEOMETRY[kind]:
      setattr(self, name, getattr(layer, name))
    self.param_dtype = jnp.dtype(kernel.dtype)
    self.method = method
    axes = tuple(a + lead for a in _reduced_axes(layer, kind))
    try:
      qarray = _quantize(kernel, method=method, axis_to_reduce=axes)
    except ValueError as e:
      raise ValueError(f'{what}: kernel of shape {kernel.shape}: {e}') from e
    meta = layer.kernel.get_metadata()
    self._store(qarray, _kernel_names(meta, kernel.ndim), meta, like=kernel)
    if layer.bias is not None:
      self.bias = layer.bias.copy()
    else:
      self.bias = nnx.data(None)

  def _store(self, qarray, names, source_meta, like=None):
    """Sets the `values` / `scale` storage Variables from a `QArray`.

    `names`: the float kernel's sharding names (or None); the storage gets
    the matching `out_sharding` (see `storage_partition_specs`) and keeps
    them as `kernel_sharding` metadata (read by LoRA wrappers, which shard
    their factors like the kernel).
    """
    qarray = _with_shape(qarray)
    self.method = qarray.method
    if names is not None and len(names) != len(qarray.shape):
      names = None
    extra = {}
    if names is not None:
      lead = len(qarray.shape) - _kernel_ndim(self, self._peft_kind)
      reduced = {a + lead for a in _reduced_axes(self, self._peft_kind)}
      vnames, snames = storage_names(qarray.method, names, reduced)
      extra['kernel_sharding'] = tuple(names)
    else:
      vnames = snames = None
    self.values = _sharded_variable(
        QuantizedWeight, qarray.values, vnames, source_meta, like, **extra)
    self.scale = _sharded_variable(
        QuantizedWeight, qarray.scale, snames, source_meta, like)

  def __setattr__(self, name, value):
    if name == 'weight':
      self._set_weight(value)
    else:
      super().__setattr__(name, value)

  def _set_weight(self, value):
    """`layer.weight = QuantizedWeight(qarray)` replaces the storage."""
    meta = {}
    if isinstance(value, nnx.Variable):
      meta = dict(value.get_metadata())
      value = value.get_value()
    if not isinstance(value, QArray):
      raise TypeError(
          f'{type(self).__name__}.weight must be set to a QArray (or a'
          f' QuantizedWeight holding one), got {type(value).__name__}.'
      )
    names = meta.get('kernel_sharding')
    if names is None and 'values' in vars(self):
      old = self.values.get_metadata()
      if _qarray_kernel_shape(value) == self.kernel_shape:
        names = old.get('kernel_sharding')
        meta = {**old, **meta}
    self._store(value, None if names is None else tuple(names), meta)

  @classmethod
  def from_float(cls, layer, *, method=None):
    """Quantizes a float layer (or its SimulateQuantized* wrapper).

    The storage is created sharded like the float kernel (when the kernel has
    `out_sharding` names, e.g. from `nnx.with_partitioning`, under a mesh).

    Args:
      layer: the flax layer of the matching type (stacked by `nnx.vmap` is
        fine), or a SimulateQuantized* wrapper of one (then `method` defaults
        to the wrapper's method).
      method: INT4 (default), INT8, Q4_0 or Q4_0_TRANSPOSE, as an enum or
        name (case-insensitive).

    Returns:
      The quantized layer; `layer` is not modified.
    """
    return cls(layer, method=method)

  @property
  def qarray(self) -> QArray:
    """The quantized kernel as a `QArray` rebuilt from `values` and `scale`."""
    return _with_shape(QArray(
        values=self.values.get_value(), scale=self.scale.get_value(),
        method=self.method, shape=(),
    ))

  @property
  def kernel_sharding(self) -> tuple[Any, ...] | None:
    """The float kernel's sharding names (None when it had none)."""
    names = self.values.get_metadata().get('kernel_sharding')
    return None if names is None else tuple(names)

  @property
  def weight(self) -> QuantizedWeight:
    """A read-only view of the kernel: a `QuantizedWeight` holding `qarray`.

    Its metadata has the float kernel's names as `kernel_sharding` (and the
    `mesh` if any). Assigning `layer.weight = QuantizedWeight(qarray)` (or a
    `QArray`) replaces the `values` / `scale` storage.
    """
    meta = {}
    vmeta = self.values.get_metadata()
    for key in ('kernel_sharding', 'mesh', 'sharding_rules'):
      if vmeta.get(key) is not None:
        meta[key] = vmeta[key]
    return QuantizedWeight(self.qarray, eager_sharding=False, **meta)

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the float kernel (with any leading stacking axes)."""
    return _qarray_kernel_shape(self.qarray)

  @property
  def nbytes(self) -> int:
    """Bytes of the quantized kernel: packed values plus scales (no bias).

    INT4: 0.5 byte per weight plus float32 per-channel scales; Q4_0 and
    Q4_0_TRANSPOSE: 18 bytes per 32 weights (0.5625 byte per weight).
    """
    return int(self.qarray.nbytes)

  def storage_partition_specs(self, kernel_names=None) -> QArray:
    """PartitionSpecs for the packed storage, shaped like the `QArray`.

    Maps the float kernel's sharding names (default: `kernel_sharding`)
    onto `values` and `scale`, as done for the storage's own `out_sharding`
    metadata: int4 / int8 `values` take the kernel's names and `scale` None
    on the reduced axes; Q4_0 blocks take the blocked axis's name on their
    block-count axis and None on the 16-byte axis.

    Examples:
      >>> from flax import nnx
      >>> q = Int4Linear.from_float(nnx.Linear(64, 32, rngs=nnx.Rngs(0)),
      ...                           method='q4_0')
      >>> specs = q.storage_partition_specs(('embed', 'mlp'))
      >>> specs.values, specs.scale
      (P('embed', 'mlp', None), P('embed', 'mlp'))
    """
    shape = self.kernel_shape
    if kernel_names is None:
      kernel_names = self.kernel_sharding
    if kernel_names is None:
      kernel_names = (None,) * len(shape)
    names = tuple(kernel_names)
    if len(names) != len(shape):
      raise ValueError(
          f'kernel_names={names} must name each of the {len(shape)} axes of'
          f' the kernel (shape {shape}); use None for unsharded axes.'
      )
    lead = len(shape) - _kernel_ndim(self, self._peft_kind)
    red = {a + lead for a in _reduced_axes(self, self._peft_kind)}
    values, scale = storage_names(self.method, names, red)
    return QArray(values=PartitionSpec(*values), scale=PartitionSpec(*scale),
                  method=self.method, shape=shape)

  def _float_kwargs(self):
    return {
        name: getattr(self, name)
        for name in _GEOMETRY[self._peft_kind]
        if name not in ('in_features', 'out_features', 'einsum_str',
                        'bias_shape', 'use_bias')
    }

  def _finish_float(self, layer):
    kernel = dequantize(self.qarray, self.param_dtype)
    layer.kernel = _sharded_variable(
        nnx.Param, kernel, self.kernel_sharding, self.values.get_metadata(),
        like=self.values.get_value())
    if self.bias is not None:
      layer.bias = self.bias.copy()
    return layer

  def __call__(self, inputs, out_sharding=None):
    """Applies the layer, dequantizing the kernel chunk by chunk."""
    return _layer_call(
        self, self._peft_kind, inputs, self.qarray, out_sharding=out_sharding,
    )


_ZEROS = nnx.initializers.zeros_init()


class Int4Linear(_Int4Base):
  """`nnx.Linear` with a really quantized (int4 / int8 / Q4_0) kernel.

  Build it with `Int4Linear.from_float(linear, method=...)`. Attributes:
  `weight` (a `QuantizedWeight`, not trainable), `bias` (an `nnx.Param` copy
  of the float bias, or None), `method`, and the float layer's geometry
  (`in_features`, `out_features`, `dtype`, ...). `to_float()` gives back an
  `nnx.Linear` with the dequantized kernel.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = Int4Linear.from_float(nnx.Linear(64, 32, rngs=nnx.Rngs(0)))
    >>> layer(jnp.ones((2, 64))).shape, layer.nbytes  # 64*32/2 + 32*4
    ((2, 32), 1152)
  """

  _peft_kind = _LINEAR

  def to_float(self) -> nnx.Linear:
    """An `nnx.Linear` holding the dequantized kernel and the same bias."""
    layer = nnx.Linear(
        self.in_features, self.out_features, use_bias=self.bias is not None,
        kernel_init=_ZEROS, bias_init=_ZEROS, rngs=nnx.Rngs(0),
        **self._float_kwargs(),
    )
    return self._finish_float(layer)


class Int4Einsum(_Int4Base):
  """`nnx.Einsum` with a really quantized (int4 / int8 / Q4_0) kernel.

  Build it with `Int4Einsum.from_float(einsum, method=...)`. Q4_0 blocks run
  along the kernel's last axis, Q4_0_TRANSPOSE along its second-to-last.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> inner = nnx.Einsum('bd,dnh->bnh', (64, 2, 32), rngs=nnx.Rngs(0))
    >>> layer = Int4Einsum.from_float(inner, method='q4_0')
    >>> layer(jnp.ones((3, 64))).shape
    (3, 2, 32)
  """

  _peft_kind = _EINSUM

  def __call__(self, inputs, einsum_str=None, out_sharding=None):
    """Applies the layer, dequantizing the kernel chunk by chunk."""
    return _layer_call(
        self, _EINSUM, inputs, self.qarray,
        einsum_str=einsum_str, out_sharding=out_sharding,
    )

  def to_float(self) -> nnx.Einsum:
    """An `nnx.Einsum` holding the dequantized kernel and the same bias."""
    layer = nnx.Einsum(
        self.einsum_str, self.kernel_shape,
        self.bias.shape if self.bias is not None else None,
        kernel_init=_ZEROS, bias_init=_ZEROS, rngs=nnx.Rngs(0),
        **self._float_kwargs(),
    )
    layer.bias_shape = self.bias_shape
    return self._finish_float(layer)


class Int4LinearGeneral(_Int4Base):
  """`nnx.LinearGeneral` with a really quantized (int4 / int8 / Q4_0) kernel.

  INT4 / INT8 scales are per output channel and `batch_axis` index. The
  kernel is `(*batch, *in_features, *out_features)`; Q4_0 blocks run along
  its last axis, Q4_0_TRANSPOSE along its second-to-last (the blockwise fast
  path needs that axis contracted, i.e. a single output axis).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> inner = nnx.LinearGeneral(64, (2, 32), rngs=nnx.Rngs(0))
    >>> layer = Int4LinearGeneral.from_float(inner, method='int4')
    >>> layer(jnp.ones((3, 64))).shape
    (3, 2, 32)
  """

  _peft_kind = _LINEAR_GENERAL

  def to_float(self) -> nnx.LinearGeneral:
    """An `nnx.LinearGeneral` holding the dequantized kernel and the bias."""
    kwargs = self._float_kwargs()
    return self._finish_float(nnx.LinearGeneral(
        self.in_features, self.out_features, use_bias=self.bias is not None,
        kernel_init=_ZEROS, bias_init=_ZEROS, rngs=nnx.Rngs(0), **kwargs,
    ))


# --- TEMPORARY shim until the geometry-based rewrite lands (lead) -----------
SimulateQuantized = _SimulateBase
QuantizedLayer = _Int4Base


def _tmp_geometry(self):
  from peft.geometry import Geometry  # pylint: disable=g-import-not-at-top
  from peft.nnx import registry  # pylint: disable=g-import-not-at-top
  if isinstance(self, _SimulateBase):
    return registry.geometry_of(self.wrapped)
  kind = self._peft_kind
  if kind == _LINEAR:
    return Geometry.linear(self.in_features, self.out_features)
  if kind == _LINEAR_GENERAL:
    return Geometry.linear_general(self.in_features, self.out_features,
                                   axis=self.axis,
                                   batch_axis=dict(self.batch_axis))
  n = _kernel_ndim(self, kind)
  return Geometry.from_einsum(self.einsum_str, self.kernel_shape[-n:])


_SimulateBase.geometry = property(_tmp_geometry)
_Int4Base.geometry = property(_tmp_geometry)

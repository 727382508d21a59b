"""Parameter counts of an NNX model: trainable LoRA, frozen, real bytes.

Examples:
  >>> from flax import nnx
  >>> import peft.nnx as pnnx
  >>> pnnx.summary(nnx.Linear(4, 4, rngs=nnx.Rngs(0))).total
  20
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft.nnx import graph
from peft.nnx.selection import kind_of
from peft.nnx.visual import format_bytes

__all__ = ['ParamSummary', 'summary', 'param_counts']


def _array_bytes(x: Any) -> int:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return int(jax.random.key_data(x).nbytes)
  dtype = jnp.dtype(x.dtype)
  size = int(np.prod(x.shape, dtype=np.int64))
  if jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits < 8:
    return math.ceil(size * jnp.iinfo(dtype).bits / 8)
  return size * dtype.itemsize


def _value_counts(value: Any) -> tuple[int, int]:
  """(number of weights, real bytes) of a Variable's value."""
  elems, nbytes = 0, 0
  for leaf in jax.tree.leaves(value):
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      elems += int(np.prod(leaf.shape, dtype=np.int64))
      nbytes += _array_bytes(leaf)
  return elems, nbytes


@dataclasses.dataclass(frozen=True)
class ParamSummary:
  """Parameter counts and real storage of a model (see `summary`).

  Attributes:
    total: number of weights (`trainable + frozen`).
    trainable: weights in `nnx.LoRAParam` (what LoRA fine-tuning trains).
    frozen: the other `nnx.Param` weights plus the (logical) weights held
      quantized by `Int4*` layers.
    total_bytes / trainable_bytes / frozen_bytes: real storage; int4 counts
      0.5 byte per value (JAX reports 1), quantized weights count their values
      plus scales.
    other: elements of non-parameter variables (LoRA scales, batch stats, RNG
      state, ...); `other_bytes` their bytes (not in `total_bytes`).
    layers: number of layers per kind, wrappers spelled out, e.g.
      `{'LoRALinear(Int4Linear)': 4, 'Linear': 2}`.

  Examples:
    >>> s = ParamSummary(10, 2, 8, 40, 8, 32, 0, 0, {})
    >>> s.trainable_fraction
    0.2
  """

  total: int
  trainable: int
  frozen: int
  total_bytes: int
  trainable_bytes: int
  frozen_bytes: int
  other: int
  other_bytes: int
  layers: dict[str, int]

  @property
  def trainable_fraction(self) -> float:
    """`trainable / total` (0 for an empty model)."""
    return self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    rows = [
        ('trainable (LoRA)', self.trainable, self.trainable_bytes),
        ('frozen', self.frozen, self.frozen_bytes),
        ('total', self.total, self.total_bytes),
    ]
    lines = [f'{"":<18}{"params":>14}{"bytes":>14}']
    for name, n, b in rows:
      lines.append(f'{name:<18}{n:>14,}{format_bytes(b):>14}')
    lines.append(f'trainable fraction: {100 * self.trainable_fraction:.3f}%')
    if self.other:
      lines.append(
          f'non-parameter variables: {self.other:,} values,'
          f' {format_bytes(self.other_bytes)}'
      )
    if self.layers:
      lines.append(
          'layers: ' + ', '.join(f'{k} x{v}' for k, v in sorted(self.layers.items()))
      )
    return '\n'.join(lines)


def _describe(layer: Any) -> str:
  """'LoRALinear(Int4Linear)'-style name of a (wrapped) layer (', dora'
  added for a DoRA wrapper)."""
  name = type(layer).__name__
  if kind_of(layer) in ('lora', 'simulate'):
    dora = ''
    if getattr(getattr(layer, 'lora', None), 'magnitude', None) is not None:
      dora = ', dora'  # DoRA: LoRA plus a trained magnitude per channel
    return f'{name}({_describe(layer.wrapped)}{dora})'
  return name


def summary(model: Any) -> ParamSummary:
  """Counts parameters (total / trainable LoRA / frozen) and real bytes.

  Each `Variable` is counted once even if shared. Int4 values count 0.5 byte
  (JAX's `nbytes` reports 1 byte for `jnp.int4`); quantized weights count their
  packed values plus scales (`QArray.nbytes`). `print(summary(model))` shows a
  small table.

  Examples:
    >>> from flax import nnx
    >>> import peft.nnx as pnnx
    >>> model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    >>> s = pnnx.summary(model)
    >>> s.total, s.trainable, s.total_bytes
    (20, 0, 80)
  """
  from peft.nnx.quantized import QuantizedLayer  # pylint: disable=g-import-not-at-top
  from peft.nnx.quantized import QuantizedWeight  # pylint: disable=g-import-not-at-top

  if model is None or not isinstance(model, nnx.Module) and not isinstance(
      model, (list, tuple, dict)):
    raise TypeError(
        f'summary: model must be an nnx.Module, got {type(model).__name__}'
    )
  idx = graph.index(model, kind_of)
  trainable = frozen = other = 0
  trainable_b = frozen_b = other_b = 0
  storage: set[int] = set()
  for m in idx.modules:  # Int4* layers: logical weights + packed bytes
    values = getattr(m, 'values', None)
    if isinstance(m, QuantizedLayer) and id(values) not in storage:
      storage.add(id(values))
      frozen += int(np.prod(m.kernel_shape, dtype=np.int64))
      frozen_b += int(m.nbytes)
  for var in idx.variables:
    if isinstance(var, QuantizedWeight):
      continue  # counted with its layer above
    n, b = _value_counts(var.get_value())
    if isinstance(var, nnx.LoRAParam):
      trainable += n
      trainable_b += b
    elif isinstance(var, nnx.Param):
      frozen += n
      frozen_b += b
    else:
      other += n
      other_b += b
  layers: dict[str, int] = {}
  for m in idx.tops:
    name = _describe(m)
    layers[name] = layers.get(name, 0) + 1
  return ParamSummary(
      total=trainable + frozen,
      trainable=trainable,
      frozen=frozen,
      total_bytes=trainable_b + frozen_b,
      trainable_bytes=trainable_b,
      frozen_bytes=frozen_b,
      other=other,
      other_bytes=other_b,
      layers=layers,
  )


def param_counts(model: Any) -> ParamSummary:
  """Same as `summary` (an alias kept for discoverability).

  Examples:
    >>> from flax import nnx
    >>> import peft.nnx as pnnx
    >>> pnnx.surgery.param_counts(nnx.Linear(2, 2, rngs=nnx.Rngs(0))).total
    6
  """
  return summary(model)

"""Einsum strings for LoRA: parsing, low-rank decomposition, reduced axes.

A layer such as `nnx.Einsum('bi,imn->bmn', ...)` computes
`outputs = einsum(inputs, weights)`. LoRA replaces the weights by the product of
two small factors, so the adapter computes `einsum(inputs, a, b)` with

* `a`: the weight's batch axes, then its reduced (contracted) axes, then the
  rank axis;
* `b`: the weight's batch axes, then the rank axis, then its output axes.

Examples:
  >>> from peft import einsum
  >>> d = einsum.lora_einsum('bi,imn->bmn', (4, 2, 3), rank=5)
  >>> d.lora_str, d.a_shape, d.b_shape
  ('bi,ir,rmn->bmn', (4, 5), (5, 2, 3))
"""

from __future__ import annotations

import string
from typing import NamedTuple, Sequence

__all__ = [
    'EinsumParts',
    'LoRAEinsum',
    'parse_einsum_str',
    'lora_einsum',
    'reduced_weight_axes',
]

_EXPECTED_FORM = (
    "expected the form 'inputs,weights->outputs' with two operands, e.g."
    " 'bi,io->bo' or '...d,dhk->...hk' (ellipsis allowed in inputs and"
    ' outputs only)'
)


class EinsumParts(NamedTuple):
  """The three subscripts of a two-operand einsum string."""

  inputs: str
  weights: str
  outputs: str


class LoRAEinsum(NamedTuple):
  """The LoRA decomposition of an `inputs,weights->outputs` einsum.

  Attributes:
    lora_str: `'inputs,a,b->outputs'`, the adapter's forward.
    a_str: subscripts of `a` (batch + reduced + rank letters).
    b_str: subscripts of `b` (batch + rank + output letters).
    a_shape: shape of `a`.
    b_shape: shape of `b`.
    delta_str: `'a,b->weights'`, the full-rank update shaped like the weights.
    rank_letter: the letter used for the rank axis.
  """

  lora_str: str
  a_str: str
  b_str: str
  a_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  delta_str: str
  rank_letter: str


def _strip_ellipsis(subscripts: str) -> str:
  return subscripts.replace('...', '')


def parse_einsum_str(einsum_str: str) -> EinsumParts:
  """Splits and validates `'inputs,weights->outputs'`.

  Examples:
    >>> parse_einsum_str('bi,io->bo')
    EinsumParts(inputs='bi', weights='io', outputs='bo')

  Args:
    einsum_str: a two-operand einsum string with an explicit output.

  Returns:
    The three subscripts, whitespace removed.

  Raises:
    TypeError: if `einsum_str` is not a string.
    ValueError: if it is malformed, has other than two operands, repeats a
      letter within one operand, puts an ellipsis in the weights, or has an
      output letter that no operand provides.
  """
  if not isinstance(einsum_str, str):
    raise TypeError(
        f'einsum_str must be a str, got {type(einsum_str).__name__}; '
        + _EXPECTED_FORM
    )
  s = ''.join(einsum_str.split())
  if s.count('->') != 1:
    raise ValueError(
        f'einsum_str={einsum_str!r} must contain exactly one "->"; '
        + _EXPECTED_FORM
    )
  lhs, outputs = s.split('->')
  operands = lhs.split(',')
  if len(operands) != 2:
    raise ValueError(
        f'einsum_str={einsum_str!r} has {len(operands)} operand(s); '
        + _EXPECTED_FORM
    )
  inputs, weights = operands
  for name, sub in (('inputs', inputs), ('weights', weights),
                    ('outputs', outputs)):
    rest = sub.replace('...', '', 1)
    if '.' in rest:
      raise ValueError(
          f'einsum_str={einsum_str!r}: bad ellipsis in the {name} subscripts'
          f' {sub!r}; ' + _EXPECTED_FORM
      )
    if not all(c in string.ascii_letters for c in rest):
      raise ValueError(
          f'einsum_str={einsum_str!r}: the {name} subscripts {sub!r} may only'
          ' hold letters and one "..."; ' + _EXPECTED_FORM
      )
    if len(set(rest)) != len(rest):
      raise ValueError(
          f'einsum_str={einsum_str!r}: a letter repeats within the {name}'
          f' subscripts {sub!r}; each operand must name each axis once'
      )
    if name == 'weights' and '...' in sub:
      raise ValueError(
          f'einsum_str={einsum_str!r}: ellipsis in the weights subscripts is'
          ' not supported (the weight shape must be explicit); '
          + _EXPECTED_FORM
      )
    if not rest and name != 'outputs' and '...' not in sub:
      raise ValueError(
          f'einsum_str={einsum_str!r}: the {name} subscripts are empty; '
          + _EXPECTED_FORM
      )
  if ('...' in outputs) and ('...' not in inputs):
    raise ValueError(
        f'einsum_str={einsum_str!r}: the outputs use "..." but the inputs do'
        ' not'
    )
  known = set(_strip_ellipsis(inputs)) | set(weights)
  unknown = sorted(set(_strip_ellipsis(outputs)) - known)
  if unknown:
    raise ValueError(
        f'einsum_str={einsum_str!r}: output letter(s) {unknown} appear in no'
        ' operand'
    )
  return EinsumParts(inputs, weights, outputs)


def _axis_roles(parts: EinsumParts) -> tuple[str, str, str]:
  """Returns the weight letters that are batch, reduced and output axes."""
  inputs = set(_strip_ellipsis(parts.inputs))
  outputs = set(_strip_ellipsis(parts.outputs))
  batch = ''.join(c for c in parts.weights if c in inputs and c in outputs)
  reduced = ''.join(
      c for c in parts.weights if c in inputs and c not in outputs
  )
  out = ''.join(c for c in parts.weights if c in outputs and c not in inputs)
  return batch, reduced, out


def reduced_weight_axes(einsum_str: str) -> tuple[int, ...]:
  """Positions, within the weights operand, of the contracted axes.

  Per-channel quantization scales reduce over these axes.

  Examples:
    >>> reduced_weight_axes('bi,imn->bmn')
    (0,)
    >>> reduced_weight_axes('ebd,edf->ebf')
    (1,)
  """
  parts = parse_einsum_str(einsum_str)
  _, reduced, _ = _axis_roles(parts)
  return tuple(parts.weights.index(c) for c in reduced)


def _check_roles(einsum_str: str, parts: EinsumParts) -> tuple[str, str, str]:
  batch, reduced, out = _axis_roles(parts)
  lonely = [c for c in parts.weights if c not in batch + reduced + out]
  if lonely:
    raise ValueError(
        f'einsum_str={einsum_str!r}: weight axes {lonely} appear in neither'
        ' the inputs nor the outputs; LoRA needs every weight axis to be'
        ' contracted with the inputs or kept in the outputs'
    )
  if not reduced:
    raise ValueError(
        f'einsum_str={einsum_str!r}: no weight axis is contracted with the'
        ' inputs, so there is nothing for a low-rank adapter to factor'
    )
  if not out:
    raise ValueError(
        f'einsum_str={einsum_str!r}: no weight axis reaches the outputs, so'
        ' there is nothing for a low-rank adapter to factor'
    )
  return batch, reduced, out


def lora_einsum(
    einsum_str: str, weights_shape: Sequence[int], rank: int
) -> LoRAEinsum:
  """Decomposes `inputs,weights->outputs` into `inputs,a,b->outputs`.

  The rank axis is called `r`, or the first free letter when `r` is taken.

  Examples:
    >>> d = lora_einsum('ebd,edf->ebf', (8, 16, 32), rank=4)
    >>> d.lora_str, d.a_shape, d.b_shape, d.delta_str
    ('ebd,edr,erf->ebf', (8, 16, 4), (8, 4, 32), 'edr,erf->edf')

  Args:
    einsum_str: the wrapped layer's einsum string.
    weights_shape: the wrapped layer's kernel shape.
    rank: the LoRA rank, a positive int.

  Returns:
    A `LoRAEinsum` with the adapter's einsum string and factor shapes.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(f'rank must be a positive int, got rank={rank!r}')
  parts = parse_einsum_str(einsum_str)
  weights_shape = tuple(int(d) for d in weights_shape)
  if len(weights_shape) != len(parts.weights):
    raise ValueError(
        f'weights_shape={weights_shape} has {len(weights_shape)} axes but the'
        f' weights subscripts {parts.weights!r} of einsum_str={einsum_str!r}'
        f' name {len(parts.weights)}'
    )
  batch, reduced, out = _check_roles(einsum_str, parts)
  used = set(_strip_ellipsis(parts.inputs) + parts.weights + parts.outputs)
  if 'r' not in used:
    r = 'r'
  else:
    r = next(c for c in string.ascii_letters if c not in used)
  size = dict(zip(parts.weights, weights_shape))
  a_str = batch + reduced + r
  b_str = batch + r + out
  a_shape = tuple(size[c] for c in batch + reduced) + (rank,)
  b_shape = tuple(size[c] for c in batch) + (rank,) + tuple(size[c] for c in out)
  return LoRAEinsum(
      lora_str=f'{parts.inputs},{a_str},{b_str}->{parts.outputs}',
      a_str=a_str,
      b_str=b_str,
      a_shape=a_shape,
      b_shape=b_shape,
      delta_str=f'{a_str},{b_str}->{parts.weights}',
      rank_letter=r,
  )

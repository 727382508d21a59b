"""The geometry of a layer's kernel: which axes are contracted, kept or batched.

Every layer this library wraps computes `outputs = einsum(inputs, kernel)` for
some einsum string, plus an optional bias. A `Geometry` records that string
and the kernel shape of one layer (without the stacking axes `nnx.vmap` adds)
and answers every question the wrappers, the surgery, the params functions
and the adapter converters ask:

* the roles of the kernel axes: `batch` (shared with inputs and outputs, such
  as experts), `contracted` (summed with the inputs) and `output`;
* the LoRA factors: `a` holds the batch axes, the contracted axes and the rank
  axis; `b` the batch axes, the rank axis and the output axes
  (`lora_shapes`, `lora_einsum_str`, `delta_einsum_str`);
* the axes that per-channel quantization scales reduce over
  (`contracted_axes`) and the shape of those scales (`channel_scale_shape`);
* the shape the bias broadcasts to (`bias_broadcast_shape`);
* the reshape between a kernel and a 2-D `[in, out]` matrix per batch slice
  (`to_matrix`, `from_matrix`), which is how PyTorch and Hugging Face see a
  weight (transposed: `[out, in]`).

The geometry is framework-free (plain strings and ints): flax modules are
mapped to geometries by `peft.nnx.registry`.

Examples:
  >>> from peft.geometry import Geometry
  >>> g = Geometry.from_einsum('btd,dnh->btnh', (64, 4, 16))
  >>> g.batch, g.contracted, g.output
  ('', 'd', 'nh')
  >>> g.lora_shapes(rank=8)
  ((64, 8), (8, 4, 16))
  >>> g.lora_einsum_str(rank=8)
  'btd,dr,rnh->btnh'
  >>> g.matrix_shape
  (64, 64)
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Mapping, Sequence

import numpy as np

from peft import einsum as _einsum

__all__ = ['Geometry']

# Letters for the kernels of Linear / LinearGeneral ('r' is kept for the rank).
_POOL = ''.join(c for c in string.ascii_letters if c != 'r')


def _ints(x, what: str) -> tuple[int, ...]:
  if isinstance(x, (str, bytes, bool)) or (
      not isinstance(x, (int, np.integer)) and not hasattr(x, '__iter__')):
    raise TypeError(
        f'{what} must be an int or a sequence of ints, got {x!r}'
    )
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return (int(x),)
  try:
    out = tuple(int(d) for d in x)
  except TypeError:
    raise TypeError(
        f'{what} must be an int or a sequence of ints, got {x!r}'
    ) from None
  return out


def _check_sizes(shape: tuple[int, ...], what: str) -> None:
  if any(d < 0 for d in shape):
    raise ValueError(f'{what}={shape} must not hold negative sizes')


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The einsum a layer computes and the shape of its kernel (one layer).

  Build one with `Geometry.linear`, `Geometry.linear_general` or
  `Geometry.from_einsum`; all three give the same kind of object, so nothing
  downstream needs to know which layer it came from.

  Attributes:
    inputs: subscripts of the inputs; may start with `'...'` (any leading
      axes). `None` for a `linear_general` layout with non-negative `axis`,
      whose subscripts depend on the input rank (see `subscripts`).
    kernel: one letter per kernel axis.
    outputs: subscripts of the outputs.
    kernel_shape: sizes of the kernel axes of one layer.
    bias_shape: the shape of the layer's bias parameter, or None.

  Examples:
    >>> g = Geometry.linear(3, 5)
    >>> g.einsum_str, g.kernel_shape, g.contracted_axes
    ('...i,io->...o', (3, 5), (0,))
  """

  inputs: str | None
  kernel: str
  outputs: str | None
  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...] | None = None
  # linear_general with some non-negative input axis: (input axis, letter)
  # pairs pinned in the inputs; batch letters pin axes 0, 1, ...
  _pinned: tuple[tuple[int, str], ...] | None = dataclasses.field(
      default=None, repr=False
  )
  _n_batch: int = dataclasses.field(default=0, repr=False)

  # -- constructors -----------------------------------------------------------

  @classmethod
  def linear(cls, in_features: int, out_features: int, *,
             use_bias: bool = True) -> Geometry:
    """The geometry of `nnx.Linear` / `nn.Dense`: kernel `[in, out]`.

    Examples:
      >>> Geometry.linear(4, 2).lora_shapes(rank=3)
      ((4, 3), (3, 2))
    """
    (i,), (o,) = _ints(in_features, 'in_features'), _ints(
        out_features, 'out_features')
    _check_sizes((i, o), 'linear (in_features, out_features)')
    return cls('...i', 'io', '...o', (i, o), (o,) if use_bias else None)

  @classmethod
  def linear_general(
      cls,
      in_features: int | Sequence[int],
      out_features: int | Sequence[int],
      *,
      axis: int | Sequence[int] = -1,
      batch_axis: Mapping[int, int] | None = None,
      use_bias: bool = True,
  ) -> Geometry:
    """The geometry of `nnx.LinearGeneral` / `nn.DenseGeneral`.

    The kernel is `(*batch sizes, *in_features, *out_features)`; input axis
    `axis[j]` contracts with kernel axis `nb + j`; `batch_axis` maps leading
    input axes `0, 1, ...` to kernel batch axes; the output is the batch axes,
    the other input axes, then the output features (as flax's layer).

    Examples:
      >>> g = Geometry.linear_general((2, 3), 4, axis=(-2, -1))
      >>> g.einsum_str, g.matrix_shape
      ('...ab,abc->...c', (6, 4))
      >>> Geometry.linear_general(3, 4, batch_axis={0: 5}).einsum_str
      'a...b,abc->a...c'
    """
    in_f = _ints(in_features, 'in_features')
    out_f = _ints(out_features, 'out_features')
    axes = _ints(axis, 'axis')
    if len(axes) != len(in_f):
      raise ValueError(
          f'in_features={in_f} and axis={axes} must have the same length'
      )
    batch = {int(k): int(v) for k, v in dict(batch_axis or {}).items()}
    if sorted(batch) != list(range(len(batch))):
      raise ValueError(
          f'batch_axis={batch} must name consecutive leading input axes 0, 1,'
          ' ... (as in nnx.LinearGeneral)'
      )
    nb, ni, no = len(batch), len(in_f), len(out_f)
    letters = _POOL[: nb + ni + no]
    bl, il, ol = letters[:nb], letters[nb:nb + ni], letters[nb + ni:]
    shape = (*(batch[k] for k in range(nb)), *in_f, *out_f)
    _check_sizes(shape, 'linear_general kernel shape')
    bias = (*shape[:nb], *out_f) if use_bias else None
    if all(a < 0 for a in axes):
      ins = ['.'] * max(-a for a in axes)
      for a, c in zip(axes, il):
        ins[a] = c
      if '.' in ins:  # a gap between contracted axes: pin positions instead
        pinned = tuple(zip(range(nb), bl)) + tuple(zip(axes, il))
        return cls(None, bl + il + ol, None, shape, bias, pinned, nb)
      inputs = bl + '...' + ''.join(ins)
      return cls(inputs, bl + il + ol, bl + '...' + ol, shape, bias)
    pinned = tuple(zip(range(nb), bl)) + tuple(zip(axes, il))
    return cls(None, bl + il + ol, None, shape, bias, pinned, nb)

  @classmethod
  def from_einsum(
      cls,
      einsum_str: str,
      kernel_shape: Sequence[int],
      bias_shape: Sequence[int] | None = None,
  ) -> Geometry:
    """The geometry of `nnx.Einsum` / `nn.Einsum` (or any einsum layer).

    Every kernel axis must be contracted with the inputs or kept in the
    outputs (`peft.einsum.parse_einsum_str` checks the string).

    Examples:
      >>> g = Geometry.from_einsum('ebd,edf->ebf', (8, 16, 32))
      >>> g.batch, g.contracted, g.output, g.contracted_axes
      ('e', 'd', 'f', (1,))
    """
    parts = _einsum.parse_einsum_str(einsum_str)
    shape = _ints(kernel_shape, 'kernel_shape')
    if len(shape) != len(parts.weights):
      raise ValueError(
          f'kernel_shape={shape} has {len(shape)} axes but the kernel'
          f' subscripts {parts.weights!r} of einsum_str={einsum_str!r} name'
          f' {len(parts.weights)}'
      )
    _check_sizes(shape, 'kernel_shape')
    bias = None if bias_shape is None else _ints(bias_shape, 'bias_shape')
    return cls(parts.inputs, parts.weights, parts.outputs, shape, bias)

  # -- axis roles -------------------------------------------------------------

  def _input_letters(self) -> set[str]:
    if self._pinned is not None:
      return {c for _, c in self._pinned}
    return set(self.inputs.replace('...', ''))

  def _output_letters(self) -> set[str]:
    if self._pinned is not None:
      # batch letters (pinned to axes 0, 1, ... first) and the output letters
      batch = self.kernel[:self._n_batch]
      pinned = {c for _, c in self._pinned}
      return set(batch) | {c for c in self.kernel if c not in pinned}
    return set(self.outputs.replace('...', ''))

  @property
  def batch(self) -> str:
    """Kernel letters shared by inputs and outputs (e.g. experts)."""
    ins, outs = self._input_letters(), self._output_letters()
    return ''.join(c for c in self.kernel if c in ins and c in outs)

  @property
  def contracted(self) -> str:
    """Kernel letters summed with the inputs."""
    ins, outs = self._input_letters(), self._output_letters()
    return ''.join(c for c in self.kernel if c in ins and c not in outs)

  @property
  def output(self) -> str:
    """Kernel letters that reach the outputs but not the inputs."""
    ins, outs = self._input_letters(), self._output_letters()
    return ''.join(c for c in self.kernel if c in outs and c not in ins)

  def _axes(self, letters: str) -> tuple[int, ...]:
    return tuple(self.kernel.index(c) for c in letters)

  @property
  def batch_axes(self) -> tuple[int, ...]:
    """Positions of the batch letters in the kernel."""
    return self._axes(self.batch)

  @property
  def contracted_axes(self) -> tuple[int, ...]:
    """Positions of the contracted letters: per-channel scales reduce here."""
    return self._axes(self.contracted)

  @property
  def output_axes(self) -> tuple[int, ...]:
    """Positions of the output letters in the kernel."""
    return self._axes(self.output)

  def _sizes(self, letters: str) -> tuple[int, ...]:
    size = dict(zip(self.kernel, self.kernel_shape))
    return tuple(size[c] for c in letters)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Sizes of the batch axes."""
    return self._sizes(self.batch)

  @property
  def in_features(self) -> int:
    """Product of the contracted sizes (the rows of `to_matrix`)."""
    return math.prod(self._sizes(self.contracted))

  @property
  def out_features(self) -> int:
    """Product of the output sizes (the columns of `to_matrix`)."""
    return math.prod(self._sizes(self.output))

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """`(in_features, out_features)`: one batch slice seen as a matrix."""
    return self.in_features, self.out_features

  def check(self) -> Geometry:
    """Raises a ValueError when LoRA or quantization cannot use this layout.

    Every kernel axis must be batch, contracted or output, and there must be
    at least one contracted and one output axis.

    Examples:
      >>> Geometry.from_einsum('bd,dn->bn', (4, 5)).check().output
      'n'
    """
    known = self.batch + self.contracted + self.output
    lonely = [c for c in self.kernel if c not in known]
    if lonely:
      raise ValueError(
          f'einsum_str={self.einsum_str!r}: kernel axes {lonely} appear in neither the'
          ' inputs nor the outputs; every kernel axis must be contracted with'
          ' the inputs or kept in the outputs'
      )
    if not self.contracted:
      raise ValueError(
          f'einsum_str={self.einsum_str!r}: no kernel axis is contracted with the inputs'
      )
    if not self.output:
      raise ValueError(
          f'einsum_str={self.einsum_str!r}: no kernel axis reaches the outputs'
      )
    return self

  # -- einsum strings ---------------------------------------------------------

  @property
  def einsum_str(self) -> str:
    """`'inputs,kernel->outputs'` (with `...` for the free input axes).

    A `linear_general` layout with non-negative `axis` has no rank-free
    string; it is shown with the pinned positions, e.g. `'[1:b],bc->...'`,
    and `subscripts(ndim)` gives the exact one.
    """
    if self._pinned is None:
      return f'{self.inputs},{self.kernel}->{self.outputs}'
    pins = ','.join(f'{a}:{c}' for a, c in self._pinned)
    return f'[{pins}],{self.kernel}->...'

  def _reserved(self, extra: str = '') -> set[str]:
    used = set(self.kernel) | set(extra)
    if self.inputs:
      used |= set(self.inputs.replace('...', ''))
    if self.outputs:
      used |= set(self.outputs.replace('...', ''))
    return used

  def rank_letter(self) -> str:
    """The letter of the LoRA rank axis: `r`, or the first free letter."""
    used = self._reserved()
    if 'r' not in used:
      return 'r'
    return next(c for c in string.ascii_letters if c not in used)

  def subscripts(self, ndim: int, reserved: str = '') -> tuple[str, str]:
    """Explicit `(inputs, outputs)` subscripts for inputs of rank `ndim`.

    Examples:
      >>> Geometry.linear(3, 4).subscripts(3)
      ('abi', 'abo')
      >>> Geometry.linear_general(3, 4, axis=1).subscripts(3)
      ('cad', 'cdb')
    """
    used = self._reserved(reserved)
    fresh = [c for c in string.ascii_letters if c not in used]
    if self._pinned is not None:
      pos = {}
      for a, c in self._pinned:
        a = a + ndim if a < 0 else a
        if not 0 <= a < ndim or a in pos:
          raise ValueError(
              f'inputs of rank {ndim} do not have the axes {self.einsum_str}'
              ' needs'
          )
        pos[a] = c
      ins = ''.join(pos.get(a) or fresh.pop(0) for a in range(ndim))
      batch = self.batch
      free = ''.join(c for c in ins if c not in self.kernel)
      return ins, batch + free + self.output
    n_named = len(self.inputs.replace('...', ''))
    if '...' not in self.inputs:
      if ndim != n_named:
        raise ValueError(
            f'{self.einsum_str!r} takes inputs of rank {n_named}, got rank'
            f' {ndim}'
        )
      return self.inputs, self.outputs
    n = ndim - n_named
    if n < 0:
      raise ValueError(
          f'{self.einsum_str!r} names {n_named} input axes besides "...",'
          f' but the inputs have rank {ndim}'
      )
    dots = ''.join(fresh[:n])
    return (self.inputs.replace('...', dots),
            self.outputs.replace('...', dots))

  def call_einsum_str(self, ndim: int) -> str:
    """The layer's einsum for inputs of rank `ndim`, with no ellipsis.

    Examples:
      >>> Geometry.from_einsum('...d,dhk->...hk', (4, 2, 3)).call_einsum_str(2)
      'ad,dhk->ahk'
    """
    ins, outs = self.subscripts(ndim)
    return f'{ins},{self.kernel}->{outs}'

  def lora_strs(self) -> tuple[str, str]:
    """Subscripts of `a` (batch, contracted, rank) and `b` (batch, rank, out).

    Examples:
      >>> Geometry.from_einsum('ebd,edf->ebf', (2, 3, 4)).lora_strs()
      ('edr', 'erf')
    """
    self.check()
    r = self.rank_letter()
    return self.batch + self.contracted + r, self.batch + r + self.output

  def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the LoRA factors `a` and `b` for one layer."""
    self.check()
    batch = self.batch_shape
    return ((*batch, *self._sizes(self.contracted), rank),
            (*batch, rank, *self._sizes(self.output)))

  def lora_einsum_str(self, rank: int | None = None,
                      ndim: int | None = None) -> str:
    """`'inputs,a,b->outputs'`: the adapter's forward.

    With `ndim`, the ellipsis is expanded for inputs of that rank (needed for
    `linear_general` layouts with non-negative axes).
    """
    del rank  # the shapes, not the string, depend on it
    a, b = self.lora_strs()
    if ndim is None and self._pinned is None:
      return f'{self.inputs},{a},{b}->{self.outputs}'
    if ndim is None:
      raise ValueError(
          f'{self.einsum_str}: pass ndim= (this layout depends on the input'
          ' rank)'
      )
    ins, outs = self.subscripts(ndim, reserved=self.rank_letter())
    return f'{ins},{a},{b}->{outs}'

  def delta_einsum_str(self) -> str:
    """`'a,b->kernel'`: the full-rank update shaped like the kernel."""
    a, b = self.lora_strs()
    return f'{a},{b}->{self.kernel}'

  # -- shapes derived from the kernel -----------------------------------------

  def channel_scale_shape(self) -> tuple[int, ...]:
    """Per-channel scale shape: the kernel shape with 1 on contracted axes.

    Examples:
      >>> Geometry.from_einsum('ebd,edf->ebf', (2, 3, 4)).channel_scale_shape()
      (2, 1, 4)
    """
    red = set(self.contracted_axes)
    return tuple(1 if i in red else d for i, d in enumerate(self.kernel_shape))

  def bias_broadcast_shape(self, ndim: int) -> tuple[int, ...]:
    """The shape the bias is reshaped to before it is added to the output.

    Output axes that are kernel axes keep their size; the others get 1 (as
    flax's layers broadcast their bias).

    Examples:
      >>> Geometry.linear(3, 4).bias_broadcast_shape(3)
      (1, 1, 4)
    """
    _, outs = self.subscripts(ndim)
    size = dict(zip(self.kernel, self.kernel_shape))
    return tuple(size.get(c, 1) for c in outs)

  def lead_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The stacking axes (from `nnx.vmap`) in front of a kernel of `shape`.

    Raises:
      ValueError: `shape` does not end with `kernel_shape`.

    Examples:
      >>> Geometry.linear(3, 4).lead_shape((6, 3, 4))
      (6,)
    """
    shape = tuple(int(d) for d in shape)
    k = len(shape) - len(self.kernel_shape)
    if k < 0 or shape[k:] != self.kernel_shape:
      raise ValueError(
          f'a kernel of shape {shape} does not end with the layer kernel'
          f' shape {self.kernel_shape} of {self.einsum_str!r}'
      )
    return shape[:k]

  def to_matrix(self, kernel):
    """Reshapes a kernel to `(*lead, *batch, in_features, out_features)`.

    `lead` are stacking axes in front of the kernel. Works on numpy and JAX
    arrays (anything with `transpose` and `reshape`).

    Examples:
      >>> import numpy as np
      >>> g = Geometry.from_einsum('bnh,nhd->bd', (2, 3, 4))
      >>> g.to_matrix(np.zeros((2, 3, 4))).shape
      (6, 4)
    """
    lead = self.lead_shape(kernel.shape)
    k = len(lead)
    order = self.batch_axes + self.contracted_axes + self.output_axes
    perm = tuple(range(k)) + tuple(k + i for i in order)
    moved = kernel.transpose(perm)
    return moved.reshape(
        (*lead, *self.batch_shape, self.in_features, self.out_features)
    )

  def from_matrix(self, matrix):
    """The inverse of `to_matrix`: `(*lead, *batch, in, out)` to a kernel.

    Examples:
      >>> import numpy as np
      >>> g = Geometry.from_einsum('bnh,nhd->bd', (2, 3, 4))
      >>> w = np.arange(24.).reshape(2, 3, 4)
      >>> bool((g.from_matrix(g.to_matrix(w)) == w).all())
      True
    """
    nb = len(self.batch)
    k = matrix.ndim - nb - 2
    if k < 0 or tuple(matrix.shape[k:]) != (
        *self.batch_shape, self.in_features, self.out_features):
      raise ValueError(
          f'a matrix of shape {tuple(matrix.shape)} does not end with'
          f' (*batch, in, out) = '
          f'{(*self.batch_shape, self.in_features, self.out_features)}'
      )
    lead = tuple(matrix.shape[:k])
    order = self.batch_axes + self.contracted_axes + self.output_axes
    moved = matrix.reshape(
        (*lead, *(self.kernel_shape[i] for i in order))
    )
    inverse = tuple(int(i) for i in np.argsort(order))
    return moved.transpose(tuple(range(k)) + tuple(k + i for i in inverse))

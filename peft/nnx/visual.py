"""Treescope renderings of the peft NNX wrappers (`treescope`, `nnx.display`).

The wrappers render with a one-line summary header, for example::

  LoRALinear(rank=8, scale=2.0) ▸ Linear(1024→1024)  # trainable 16,384 (64.00 KiB) · frozen 1,049,600 (4.00 MiB)
  Int4Linear(method=q4_0) Linear(64→256)  # 9.00 KiB real, 4.50 bits/weight (float32: 64.00 KiB)
  SimulateQuantizedEinsum(method=q4_0) ▸ Einsum(btd,dhk->bthk: 64×2×32)

LoRA adapters are drawn in a green block labelled *trainable* and their
`a`/`b` lines are marked as trainable, so they stand out from the frozen
base layer. Expanding a node shows the usual NNX attributes.

The wrapper classes of `peft.nnx.lora` and `peft.nnx.quantized` use these
functions as their `__treescope_repr__`; a renderer that fails falls back to
the default NNX rendering.

Example:

```python
import treescope
from peft.nnx import surgery, visual
model = surgery.apply_lora(model, rank=8, alpha=16, rngs=nnx.Rngs(0))
print(treescope.render_to_text(model))
html = treescope.render_to_html(model)
```

"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx
from treescope import formatting_util
from treescope import rendering_parts as rp

from peft import _compat

__all__ = [
    'describe',
    'lora_treescope_repr',
    'adapter_treescope_repr',
    'simulated_treescope_repr',
    'quantized_treescope_repr',
]

_TRAINABLE_COLOR = 'oklch(0.88 0.12 145)'   # green: trainable LoRA params
_QUANT_COLOR = 'oklch(0.85 0.09 60)'        # amber: real quantized storage
_SIM_COLOR = 'oklch(0.88 0.07 300)'         # violet: simulated quantization
_TRAINABLE_TEXT = '#17803d'


# --------------------------------------------------------------------------
# Describing layers in one line
# --------------------------------------------------------------------------


def _fmt_int(n: int) -> str:
  return f'{n:,}'


def format_bytes(n: float) -> str:
  """Formats a byte count with binary units, e.g. `format_bytes(9216) == '9.00 KiB'`."""
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  return f'{n:.2f} GiB'


def _fmt_scale(scale: Any) -> str:
  try:
    values = np.unique(np.asarray(scale, dtype=np.float64))
  except Exception:  # pylint: disable=broad-except
    return '?'  # abstract (eval_shape) values have no numbers
  def one(v):
    s = f'{float(v):.4g}'
    return s if any(c in s for c in '.enai') else s + '.0'

  if values.size == 1:
    return one(values[0])
  return '[' + ', '.join(one(v) for v in values) + ']'


def _method_name(method: Any) -> str:
  return str(getattr(method, 'value', method))


def _shape_of(x: Any) -> tuple[int, ...]:
  if isinstance(x, nnx.Variable):
    x = x.get_value()
  return tuple(int(d) for d in getattr(x, 'shape', ()))


def _features(x: Any) -> str:
  if isinstance(x, (tuple, list)):
    return '×'.join(str(int(v)) for v in x) if len(x) != 1 else str(int(x[0]))
  return str(int(x))


def _geometry(layer: Any, kernel_shape: tuple[int, ...]) -> str:
  """'64→256', 'btd,dhk->bthk: 64×2×32', plus a stacking note."""
  einsum_str = getattr(layer, 'einsum_str', None)
  if einsum_str is not None:
    shape = tuple(getattr(layer, 'kernel_shape', None) or kernel_shape)
    n_lead = max(0, len(kernel_shape) - len(shape))
    text = f'{einsum_str.replace(" ", "")}: ' + '×'.join(map(str, shape))
  else:
    in_f = getattr(layer, 'in_features', None)
    out_f = getattr(layer, 'out_features', None)
    if in_f is None or out_f is None:
      return '×'.join(map(str, kernel_shape))
    text = f'{_features(in_f)}→{_features(out_f)}'
    n_in = len(in_f) if isinstance(in_f, (tuple, list)) else 1
    n_out = len(out_f) if isinstance(out_f, (tuple, list)) else 1
    batch = getattr(layer, 'batch_axis', None) or {}
    n_lead = max(0, len(kernel_shape) - n_in - n_out - len(batch))
  if n_lead:
    text += ', stacked ' + '×'.join(map(str, kernel_shape[:n_lead]))
  return text


def _kernel_shape(layer: Any) -> tuple[int, ...]:
  for name in ('kernel', 'weight'):
    var = getattr(layer, name, None)
    if var is not None:
      return _shape_of(var)
  inner = getattr(layer, 'wrapped', None)
  return _kernel_shape(inner) if inner is not None else ()


def _adapters_label(layer: Any) -> str:
  """'rank=8, scale=2' for one adapter; names, ranks and weights for more."""
  lora = layer.lora
  names = tuple(getattr(layer, 'adapter_names', ()) or ())
  if len(names) <= 1 and getattr(layer, 'adapter_weights', None) is None:
    dora = ', dora' if getattr(lora, 'magnitude', None) is not None else ''
    return (f'rank={getattr(lora, "rank", "?")}, '
            f'scale={_fmt_scale(_value(getattr(lora, "scale", None)))}{dora}')
  weights = _value(layer.adapter_weights)
  parts = []
  for i, name in enumerate(names):
    ad = layer.adapter(name)
    w = float(np.asarray(weights)[i]) if weights is not None else 0.0
    parts.append(f'{name}: rank={ad.rank} w={w:g}')
  label = '; '.join(parts)
  if getattr(layer, 'adapter_ids', None) is not None:
    label += '; routed per example'
  if not getattr(layer, 'enabled', True):
    label += '; disabled'
  return label


def describe(layer: Any) -> str:
  """A one-line label of a (possibly wrapped or quantized) layer.

  Example:

  ```python
  describe(nnx.Linear(1024, 1024, rngs=nnx.Rngs(0)))  # 'Linear(1024→1024)'
  describe(lora_linear)  # 'LoRALinear(rank=8, scale=2) ▸ Linear(1024→1024)'
  ```

  """
  name = type(layer).__name__
  lora = getattr(layer, 'lora', None)
  wrapped = getattr(layer, 'wrapped', None)
  if lora is not None and wrapped is not None:
    return f'{name}({_adapters_label(layer)}) ▸ {describe(wrapped)}'

  method = getattr(layer, 'method', None)
  if wrapped is not None and method is not None:
    return f'{name}(method={_method_name(method)}) ▸ {describe(wrapped)}'
  if method is not None:
    return f'{name}(method={_method_name(method)}, {_geometry(layer, _kernel_shape(layer))})'
  if hasattr(layer, 'a') and hasattr(layer, 'b') and hasattr(layer, 'rank'):
    a, b = _shape_of(layer.a), _shape_of(layer.b)
    return f'{name}(rank={layer.rank}, a {_features(a)}, b {_features(b)})'
  return f'{name}({_geometry(layer, _kernel_shape(layer))})'


def _value(var: Any) -> Any:
  if isinstance(var, nnx.Variable):
    return var.get_value()
  return var


# --------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------


def _counts(module: Any) -> dict[str, list[int]]:
  """{'trainable'|'frozen'|'other': [elements, real bytes]} of a module."""
  from peft.nnx import surgery  # pylint: disable=g-import-not-at-top

  s = surgery.summary(module)
  return {
      'trainable': [s.trainable, s.trainable_bytes],
      'frozen': [s.frozen, s.frozen_bytes],
      'other': [s.other, s.other_bytes],
  }


def _qarray(layer: Any) -> Any:
  weight = getattr(layer, 'weight', None)
  return _value(weight) if weight is not None else None


# --------------------------------------------------------------------------
# Rendering helpers
# --------------------------------------------------------------------------


def _comment(text: str) -> rp.RenderableTreePart:
  return rp.comment_color(rp.text(text))


def _trainable_mark(text: str = '  # trainable') -> rp.RenderableTreePart:
  return rp.custom_text_color(rp.text(text), _TRAINABLE_TEXT)


def _children(self: Any, names: list[str], path: str | None,
              subtree_renderer, marks: dict[str, rp.RenderableTreePart]):
  lines = []
  for i, name in enumerate(names):
    child_path = None if path is None else f'{path}.{name}'
    if i < len(names) - 1:
      comma = rp.siblings(',', rp.fold_condition(collapsed=rp.text(' ')))
    else:
      comma = rp.fold_condition(expanded=rp.text(','))
    parts = [f'{name}=', subtree_renderer(getattr(self, name), path=child_path)]
    line = rp.siblings_with_annotations(
        *parts, extra_annotations=[marks[name]] if name in marks else ()
    )
    # Collapsed, the node shows only its header (``{…}``), not the children.
    lines.append(rp.fold_condition(
        expanded=rp.build_full_line_with_annotations(line, comma)))
  return lines


def _attr_names(self: Any, first: tuple[str, ...]) -> list[str]:
  """Public data attributes, `first` ones first (the NNX rendering's set)."""
  names = [n for n in first if n in vars(self)]
  for name in vars(self):
    if name in names or _compat.is_internal_attribute(name):
      continue
    if str(name).startswith('_') and not _compat.is_data_attribute(
        self, str(name)):
      continue
    names.append(name)
  return names


def _node(self, header: list[Any], annotation: str | None, names, path,
          subtree_renderer, color=None, marks=None, collapsed: str = '…'):
  prefix = rp.siblings(
      rp.roundtrip_condition(roundtrip=rp.text('<')),
      rp.maybe_qualified_type_name(type(self)),
      *header,
      rp.text(' {'),
      rp.fold_condition(collapsed=rp.text(collapsed)),
  )
  suffix = rp.siblings('}', rp.roundtrip_condition(roundtrip=rp.text('>')))
  return rp.build_foldable_tree_node_from_children(
      prefix=prefix,
      children=_children(self, names, path, subtree_renderer, marks or {}),
      suffix=suffix,
      path=path,
      background_color=color,
      first_line_annotation=(
          _comment(annotation) if annotation is not None else None
      ),
      # The object rendered on its own opens up; inside a model it shows its
      # one-line summary until clicked.
      expand_state=(rp.ExpandState.WEAKLY_EXPANDED if not path
                    else rp.ExpandState.WEAKLY_COLLAPSED),
  )


def _base_note(counts: dict[str, list[int]]) -> str:
  t, f = counts['trainable'], counts['frozen']
  return (f'  # trainable {_fmt_int(t[0])} ({format_bytes(t[1])}) · frozen '
          f'{_fmt_int(f[0])} ({format_bytes(f[1])})')


# --------------------------------------------------------------------------
# The renderers
# --------------------------------------------------------------------------


def _safe(fn):
  """Falls back to the default NNX rendering if a custom one fails."""

  def render(self, path, subtree_renderer):
    try:
      return fn(self, path, subtree_renderer)
    except Exception:  # pylint: disable=broad-except
      return nnx.Module.__treescope_repr__(self, path, subtree_renderer)

  render.__name__ = fn.__name__
  render.__doc__ = fn.__doc__
  render.__wrapped__ = fn
  return render


@_safe
def lora_treescope_repr(self, path, subtree_renderer):
  """`__treescope_repr__` of `LoRALinear` / `LoRAEinsum` / `LoRALinearGeneral`.

  Header `LoRALinear(rank=8, scale=2) ▸ Linear(1024→1024)` with trainable and
  frozen counts; the adapter (`lora`) is drawn as a green trainable block.

  Example:

  ```python
  LoRALinear.__treescope_repr__ = lora_treescope_repr
  treescope.render_to_text(layer)
  ```

  """
  header = [rp.text(f'({_adapters_label(self)}) ▸ {describe(self.wrapped)}')]
  # The header already says which adapters there are and how they are used.
  shown_in_header = ('adapter_names', 'adapter_weights', 'adapter_ids',
                     'enabled', 'init')
  names = [n for n in _attr_names(self, ('wrapped', 'lora', 'adapters'))
           if n not in shown_in_header]
  marks = {'wrapped': _comment('  # frozen'), 'lora': _trainable_mark(),
           'adapters': _trainable_mark()}
  c = _counts(self)
  return _node(self, header, _base_note(c), names, path, subtree_renderer,
               color=formatting_util.color_from_string(type(self).__qualname__),
               marks=marks,
               collapsed=(f'trainable {_fmt_int(c["trainable"][0])} · frozen '
                          f'{_fmt_int(c["frozen"][0])}'))


@_safe
def adapter_treescope_repr(self, path, subtree_renderer):
  """`__treescope_repr__` of the LoRA adapters: a green *trainable* block.

  Example:

  ```python
  LoRALinearAdapter.__treescope_repr__ = adapter_treescope_repr
  ```

  """
  a, b = _shape_of(self.a), _shape_of(self.b)
  trained = [self.a, self.b]
  dora = ''
  magnitude = getattr(self, 'magnitude', None)
  if magnitude is not None:  # DoRA: a trainable magnitude per channel
    trained.append(magnitude)
    dora = f', DoRA magnitude {_features(_shape_of(magnitude))}'
    if getattr(self, 'base_norm_sq', None) is not None:
      dora += ' (base norms stored)'
  n = sum(int(np.prod(_shape_of(v))) for v in trained)
  nbytes = sum(
      int(np.prod(_shape_of(v))) * np.dtype(_value(v).dtype).itemsize
      for v in trained
  )
  header = [rp.text(
      f'(rank={getattr(self, "rank", "?")}, scale='
      f'{_fmt_scale(_value(getattr(self, "scale", None)))}, a {_features(a)},'
      f' b {_features(b)}{dora})'
  )]
  names = _attr_names(self, ('a', 'b', 'magnitude', 'scale'))
  marks = {'a': _trainable_mark(), 'b': _trainable_mark(),
           'magnitude': _trainable_mark()}
  note = f'  # trainable LoRAParam: {_fmt_int(n)} ({format_bytes(nbytes)})'
  return _node(self, header, note, names, path, subtree_renderer,
               color=_TRAINABLE_COLOR, marks=marks,
               collapsed=f'trainable {_fmt_int(n)}')


@_safe
def simulated_treescope_repr(self, path, subtree_renderer):
  """`__treescope_repr__` of `SimulateQuantized*`: method and wrapped layer.

  Example:

  ```python
  SimulateQuantizedLinear.__treescope_repr__ = simulated_treescope_repr
  ```

  """
  method = _method_name(self.method)
  header = [rp.text(f'(method={method}) ▸ {describe(self.wrapped)}')]
  c = _counts(self)
  total = c['trainable'][0] + c['frozen'][0]
  note = (f'  # QAT: forward uses {method} weights (straight-through grads);'
          f' stored as float, {_fmt_int(total)} params '
          f'({format_bytes(c["trainable"][1] + c["frozen"][1])})')
  names = _attr_names(self, ('wrapped', 'method'))
  return _node(self, header, note, names, path, subtree_renderer,
               color=_SIM_COLOR, collapsed='QAT')


@_safe
def quantized_treescope_repr(self, path, subtree_renderer):
  """`__treescope_repr__` of `Int4Linear` / `Int4Einsum` / ...: real bytes.

  Header `Int4Linear(method=q4_0, 64→256)`, annotated with the real storage
  (packed values + scales), bits per weight and the float32 size it replaces.

  Example:

  ```python
  Int4Linear.__treescope_repr__ = quantized_treescope_repr
  ```

  """
  method = _method_name(self.method)
  q = _qarray(self)
  shape = tuple(getattr(q, 'shape', ()) or ())
  n = int(np.prod(shape)) if shape else 0
  nbytes = int(getattr(q, 'nbytes', 0) or 0)
  header = [rp.text(f'(method={method}, {_geometry(self, shape)})')]
  if n:
    note = (f'  # {format_bytes(nbytes)} real, {8 * nbytes / n:.2f} bits/weight'
            f' for {_fmt_int(n)} weights (float32: {format_bytes(4 * n)})')
    collapsed = f'{format_bytes(nbytes)}, {8 * nbytes / n:.2f} bits/weight'
  else:
    note, collapsed = None, '…'
  names = _attr_names(self, ('weight', 'bias', 'method'))
  return _node(self, header, note, names, path, subtree_renderer,
               color=_QUANT_COLOR, collapsed=collapsed)

"""Key maps: Hugging Face module names <-> JAX layer paths."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence, Union



Rules = Sequence[tuple[str, str]]
MapFn = Callable[[str], Union[str, Sequence[Any], None]]


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """How HF module names map to JAX layer paths (and back).

  `to_jax` maps an HF module name (`'model.layers.0.self_attn.q_proj'`) to
  the `/`-joined path of the JAX layer (`'model/layers/0/self_attn/q_proj'`:
  attribute names / list indices for an NNX model, as `peft.nnx.select`
  prints them; dict keys for a params tree, the dict that holds the
  `kernel`). `to_hf` is the inverse, used by `save_adapter`. Each is either
  a list of `(regex, replacement)` rules or a callable:

  * rules are tried in order; the first whose regex `re.search`es the name
    rewrites it with `re.sub(regex, replacement, name, count=1)` (so
    `replacement` may use `\\1` / `\\g<name>`); a name no rule matches keeps
    the default mapping (dots <-> slashes);
  * a callable returns the path (a `/`- or `.`-joined string or a tuple of
    keys), or `None` for "no such layer".

  `load_adapter` also accepts a bare rule list or callable as `key_map`
  (meaning `to_jax`), `save_adapter` a bare one meaning `to_hf`.

  Examples:
    >>> km = KeyMap(to_jax=[(r'^model\\.layers\\.(\\d+)\\.self_attn\\.',
    ...                      r'layers/\\1/attn/')],
    ...             to_hf=[(r'^layers/(\\d+)/attn/',
    ...                     r'model.layers.\\1.self_attn.')])
    >>> km.jax_path('model.layers.3.self_attn.q_proj')
    'layers/3/attn/q_proj'
    >>> km.hf_name('layers/3/attn/q_proj')
    'model.layers.3.self_attn.q_proj'
    >>> KeyMap().jax_path('model.norm')
    'model/norm'
  """

  to_jax: Rules | MapFn | None = None
  to_hf: Rules | MapFn | None = None

  def __post_init__(self):
    for field in ('to_jax', 'to_hf'):
      _check_rules(getattr(self, field), f'KeyMap.{field}')

  def jax_path(self, name: str) -> str | None:
    """The `/`-joined JAX path of HF module `name` (None: no layer)."""
    return _apply_map(self.to_jax, name, '/', 'to_jax')

  def hf_name(self, path: str) -> str | None:
    """The HF module name of the JAX layer at `/`-joined `path`."""
    return _apply_map(self.to_hf, path, '.', 'to_hf')


def _check_rules(rules, what):
  if rules is None or callable(rules):
    return
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(
        f'{what}: expected a list of (regex, replacement) pairs or a callable,'
        f' got {type(rules).__name__}'
    )
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not all(isinstance(r, str) for r in rule)):
      raise TypeError(
          f'{what}: each rule must be a (regex, replacement) pair of strings,'
          f' got {rule!r}'
      )
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f'{what}: {rule[0]!r} is not a valid regex ({e})') from None


#: tunix's NNX Llama3 and Qwen2/Qwen3 models (`tunix.models.llama3`,
#: `tunix.models.qwen2`, `tunix.models.qwen3`): `model.layers.N.self_attn.X`
#: <-> `layers/N/attn/X` (Einsum layers with split head axes: `q_proj.w` is
#: `[embed, heads, head_dim]`, `o_proj.w` `[heads, head_dim, embed]`; the
#: factors reshape row-major, as tunix reshapes the base weights) and
#: `model.layers.N.mlp.X` <-> `layers/N/mlp/X`.
TUNIX_LLAMA3 = KeyMap(
    to_jax=((r'^model\.layers\.(\d+)\.self_attn\.', r'layers/\1/attn/'),
            (r'^model\.layers\.(\d+)\.mlp\.', r'layers/\1/mlp/')),
    to_hf=((r'^layers/(\d+)/attn/', r'model.layers.\1.self_attn.'),
           (r'^layers/(\d+)/mlp/', r'model.layers.\1.mlp.')),
)
TUNIX_QWEN = TUNIX_LLAMA3


def _apply_map(rules, name, sep, what):
  other = '.' if sep == '/' else '/'
  default = name.replace(other, sep)
  if rules is None:
    return default
  if callable(rules):
    out = rules(name)
    if out is None:
      return None
    if isinstance(out, str):
      return out.replace(other, sep) if sep == '/' else out.replace('/', '.')
    try:
      return sep.join(str(k) for k in out)
    except TypeError:
      raise TypeError(
          f'key_map {what}: the callable returned {out!r} for {name!r};'
          ' return a string path, a tuple of keys or None'
      ) from None
  for pattern, repl in rules:
    if re.search(pattern, name):
      out = re.sub(pattern, repl, name, count=1)
      return out.replace(other, sep) if sep == '/' else out.replace('/', '.')
  return default


def _as_key_map(key_map, direction):
  if key_map is None:
    return KeyMap()
  if isinstance(key_map, KeyMap):
    return key_map
  _check_rules(key_map, 'key_map')
  return KeyMap(**{direction: key_map})

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

  Fused layers (one kernel holding several HF modules stacked along its
  first output axis, e.g. tunix Gemma's `kv_einsum`, k and v): `to_jax`
  gives `path[i]` for the module in slot `i`, `to_hf` maps `path[i]` back,
  and `fused` lists regexes (`re.search`) of the JAX paths of such layers
  (so that `save_adapter` writes one HF module per slot).

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
    >>> TUNIX_GEMMA.jax_path('model.layers.1.self_attn.v_proj')
    'layers/1/attn/kv_einsum[1]'
  """

  to_jax: Rules | MapFn | None = None
  to_hf: Rules | MapFn | None = None
  fused: Sequence[str] = ()

  def __post_init__(self):
    for field in ('to_jax', 'to_hf'):
      _check_rules(getattr(self, field), f'KeyMap.{field}')
    if isinstance(self.fused, (str, bytes)) or not all(
        isinstance(f, str) for f in self.fused):
      raise TypeError(
          f'KeyMap.fused: expected a tuple of regexes, got {self.fused!r}')
    for f in self.fused:
      try:
        re.compile(f)
      except re.error as e:
        raise ValueError(
            f'KeyMap.fused: {f!r} is not a valid regex ({e})') from None

  def is_fused(self, path: str) -> bool:
    """Whether the JAX layer at `path` is a fused layer (see `fused`)."""
    return any(re.search(f, path) for f in self.fused)

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


def _gemma_rules(slots, fused_name):
  attn = r'^model\.layers\.(\d+)\.self_attn\.'
  to_jax = [(attn + hf + '$', rf'layers/\1/attn/{jax}') for hf, jax in slots]
  to_hf = [('^layers/(\\d+)/attn/' + re.escape(jax) + '$',
            rf'model.layers.\1.self_attn.{hf}') for hf, jax in slots]
  mlp = ((r'^model\.layers\.(\d+)\.mlp\.', r'layers/\1/mlp/'),
         (r'^layers/(\d+)/mlp/', r'model.layers.\1.mlp.'))
  return KeyMap(to_jax=tuple(to_jax) + mlp[:1], to_hf=tuple(to_hf) + mlp[1:],
                fused=(rf'/attn/{fused_name}$',))


#: tunix's NNX Gemma / Gemma2 (`tunix.models.gemma`) with fewer key/value
#: heads than query heads: `self_attn.q_proj` <-> `layers/N/attn/q_einsum`
#: (kernel `[heads, embed, head_dim]`), `k_proj` / `v_proj` <-> slots 0 / 1 of
#: the fused `kv_einsum` (kernel `[2, kv_heads, embed, head_dim]`, one LoRA
#: for both), `o_proj` <-> `attn_vec_einsum` (`[heads, head_dim, embed]`),
#: `mlp.{gate,up,down}_proj` <-> `layers/N/mlp/{gate,up,down}_proj`.
TUNIX_GEMMA = _gemma_rules(
    (('q_proj', 'q_einsum'), ('k_proj', 'kv_einsum[0]'),
     ('v_proj', 'kv_einsum[1]'), ('o_proj', 'attn_vec_einsum')), 'kv_einsum')

#: tunix's NNX Gemma with as many key/value heads as query heads (Gemma 7B):
#: q, k, v are slots 0, 1, 2 of the fused `qkv_einsum` (`[3, heads, embed,
#: head_dim]`); otherwise as `TUNIX_GEMMA`.
TUNIX_GEMMA_QKV = _gemma_rules(
    (('q_proj', 'qkv_einsum[0]'), ('k_proj', 'qkv_einsum[1]'),
     ('v_proj', 'qkv_einsum[2]'), ('o_proj', 'attn_vec_einsum')), 'qkv_einsum')


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

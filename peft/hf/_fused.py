"""Fused layers: several HF modules stacked on one kernel (tunix Gemma's kv).

tunix's Gemma computes k and v with one `kv_einsum` whose kernel
`[2, kv_heads, embed, head_dim]` stacks them along its first output axis (the
slot axis); Hugging Face has two modules, `k_proj` and `v_proj`, each with
its own LoRA. This library's LoRA on the fused layer has one `a` `[embed, R]`
and one `b` `[R, 2, kv_heads, head_dim]`, so `b[:, c]` is slot `c`'s update.
Both directions are exact:

* HF -> here: slots with bit-identical `lora_A` share it (`R = r`, `b[:, c] =
  B_cᵀ`); otherwise the ranks stack (`R = C·r`, `a = [A_0ᵀ, A_1ᵀ, ...]`, `b`
  block-diagonal: slot `c` reads only its own `r` rows).
* here -> HF: a block-diagonal `b` whose `a` blocks differ is written block
  by block (rank `r` per slot, the inverse of the above); any other `b`
  writes every slot with the whole `a` (rank `R`) and its column of `b`.

Every slot must be present, with the same rank, scale and dtypes (else a
`ValueError` naming them); a DoRA magnitude is split the same way (slot `c`
is `m[c]`, flattened).
"""

from __future__ import annotations

import re

import numpy as np

from peft.hf._config import _Module
from peft.hf._files import _PREFIX

# A key-map path naming slot i of a fused layer: `layers/0/attn/kv_einsum[1]`.
_SLOT = re.compile(r'(.+)\[(\d+)\]')


def _split_slot(path):
  """`(layer path, slot)` of a key-map path, slot None if not a fused slot."""
  m = _SLOT.fullmatch(path) if path else None
  return (m.group(1), int(m.group(2))) if m else (path, None)


def _fuse(path, slots: dict[int, _Module], errors) -> _Module | None:
  """One `_Module` for the fused layer at `path` from its slots' modules."""
  names = ', '.join(f'{_PREFIX}{slots[c].name} (slot {c})'
                    for c in sorted(slots))
  count = max(slots) + 1
  if sorted(slots) != list(range(count)):
    missing = sorted(set(range(count)) - set(slots))
    errors.append(
        f'{path}: a fused layer needs an adapter for every slot; slots'
        f' {missing} have none (present: {names})')
    return None
  mods = [slots[c] for c in range(count)]
  first = mods[0]
  for what, get in (
      ('rank', lambda m: m.rank),
      ('scale (lora_alpha / r)', lambda m: (m.alpha, m.use_rslora)),
      ('dtype', lambda m: (m.lora_a.dtype, m.lora_b.dtype)),
      ('lora_A shape', lambda m: m.lora_a.shape),
      ('lora_B shape', lambda m: m.lora_b.shape),
      ('DoRA (lora_magnitude_vector)', lambda m: m.magnitude is None)):
    values = [get(m) for m in mods]
    if any(v != values[0] for v in values):
      errors.append(
          f'{path}: the modules of a fused layer must agree on the {what};'
          f' got {values} for {names}')
      return None
  r = first.rank
  n_out = first.lora_b.shape[0]
  shared = all(np.array_equal(m.lora_a, first.lora_a) for m in mods[1:])
  if shared:  # one `a`, `b[:, c]` = B_c
    lora_a = first.lora_a
    lora_b = np.concatenate([m.lora_b for m in mods], axis=0)
    rank = r
  else:  # ranks stacked, `b` block-diagonal
    lora_a = np.concatenate([m.lora_a for m in mods], axis=0)
    lora_b = np.zeros((count * n_out, count * r), first.lora_b.dtype)
    for c, m in enumerate(mods):
      lora_b[c * n_out:(c + 1) * n_out, c * r:(c + 1) * r] = m.lora_b
    rank = count * r
  magnitude = None
  if first.magnitude is not None:
    magnitude = np.concatenate([m.magnitude for m in mods])
  return _Module(name='{' + ', '.join(m.name for m in mods) + '}',
                 lora_a=lora_a, lora_b=lora_b, rank=rank, alpha=first.alpha,
                 use_rslora=first.use_rslora, magnitude=magnitude,
                 scale_rank=r)


def _fused_slot_count(path, layer_geometry, errors):
  """The size of the slot axis (the first output axis) of a fused layer."""
  g = layer_geometry
  if g is None or not g.output:
    errors.append(f'{path}: a fused slot of a layer without output axes')
    return None
  return g.kernel_shape[g.output_axes[0]]


def _split_fused(a, b, magnitude):
  """Per-slot `(a [in, r], b [r, out], magnitude [out] | None)`, r as above."""
  rank = a.shape[-1]
  count = b.shape[1]
  a2 = np.reshape(a, (-1, rank))
  b3 = np.reshape(b, (rank, count, -1))
  m2 = None if magnitude is None else np.reshape(magnitude, (count, -1))
  r = rank // count
  block = rank % count == 0 and r > 0
  if block:
    blocks = [a2[:, c * r:(c + 1) * r] for c in range(count)]
    block = not all(np.array_equal(x, blocks[0]) for x in blocks[1:])
  if block:
    for c in range(count):
      rows = np.ones(rank, bool)
      rows[c * r:(c + 1) * r] = False
      if np.any(b3[rows, c]):
        block = False
        break
  out = []
  for c in range(count):
    mc = None if m2 is None else m2[c]
    if block:
      out.append((a2[:, c * r:(c + 1) * r], b3[c * r:(c + 1) * r, c], mc))
    else:
      out.append((a2, b3[:, c], mc))
  return out

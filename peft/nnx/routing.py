"""How a layer with several named adapters adds them to its output.

Two ways, both chosen by variables (not Python attributes), so switching
under `nnx.jit` does not retrace:

* `weighted`: `sum_i w_i * adapter_i(x)` with the weights of
  `layer.adapter_weights`; an adapter of weight 0 is skipped at run time by
  `lax.cond` (it costs no FLOPs).
* `per_example`: example `e` goes through adapter `layer.adapter_ids[e]`
  (-1: none). The adapters are stacked in a bank padded to the largest rank
  (the zero padding adds exact zeros) and gathered by id.

Both take a `peft.nnx.LoRA` wrapper; `peft.nnx.adapters` holds the public
functions that set the weights and ids.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from peft.nnx.lora import LoRALinear
  >>> layer = LoRALinear(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rank=2,
  ...                    b_init=nnx.initializers.normal(), rngs=nnx.Rngs(1))
  >>> layer.set_weights({'default': 0.5})
  >>> x = jnp.ones((2, 3))
  >>> bool(jnp.allclose(weighted(layer, x), 0.5 * layer.lora(x)))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ['weighted', 'per_example']


def weighted(layer, x: jax.Array, out_sharding=None) -> jax.Array:
  """`sum_i w_i * adapter_i(x)`, skipping adapters of weight 0."""
  weights = layer.adapter_weights[...]
  total = None
  for i, (_, ad) in enumerate(layer.named_adapters()):
    xi, a, b = ad.factors(x)
    spec = ad.geometry.lora_einsum_str(ndim=xi.ndim)
    run = lambda xi, a, b, w, spec=spec, ad=ad: (
        jnp.einsum(spec, xi, a, b, precision=ad.precision,
                   out_sharding=out_sharding) * w.astype(xi.dtype))
    shape = jax.eval_shape(run, xi, a, b, weights[i])
    out = jax.lax.cond(
        weights[i] != 0, run,
        lambda *_, shape=shape: jnp.zeros(shape.shape, shape.dtype),
        xi, a, b, weights[i])
    total = out if total is None else total + out
  return total


def per_example(layer, x: jax.Array) -> jax.Array:
  """Example `e` through adapter `ids[e]` (a rank-padded bank; -1: none)."""
  g = layer.lora.geometry
  ads = [ad for _, ad in layer.named_adapters()]
  r_max = max(ad.rank for ad in ads)
  r_axis_b = len(g.batch)
  a_bank, b_bank = [], []
  xp = None
  for ad in ads:
    xi, a, b = ad.factors(x)
    xp = xi if xp is None else xp
    pad = r_max - ad.rank
    a_bank.append(jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]))
    b_bank.append(jnp.pad(b, [(0, pad) if i == r_axis_b else (0, 0)
                              for i in range(b.ndim)]))
  a_bank, b_bank = jnp.stack(a_bank), jnp.stack(b_bank)
  ins, outs = g.subscripts(xp.ndim, reserved=g.rank_letter())
  e = ins[0]
  if e in g.kernel:
    raise ValueError(
        f'per-example adapters need the first input axis to be the example'
        f' axis, but it is kernel axis {e!r} of {g.einsum_str!r}'
    )
  ids = layer.adapter_ids[...]
  if ids.shape != (xp.shape[0],):
    raise ValueError(
        f'adapter ids have shape {ids.shape}, the inputs have'
        f' {xp.shape[0]} examples; call set_adapter_ids with one id per'
        ' example'
    )
  index = jnp.clip(ids, 0, len(ads) - 1)
  a_str, b_str = g.lora_strs()
  out = jnp.einsum(f'{ins},{e}{a_str},{e}{b_str}->{outs}', xp,
                   a_bank[index], b_bank[index], precision=layer.lora.precision)
  mask = (ids >= 0).astype(out.dtype)
  shape = [1] * out.ndim
  shape[outs.index(e)] = -1
  return out * jnp.reshape(mask, shape)

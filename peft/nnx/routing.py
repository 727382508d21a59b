"""How a layer with several named adapters adds them to its output.

Two ways, both chosen by variables (not Python attributes), so switching
under `nnx.jit` does not retrace:

* `weighted`: `sum_i w_i * adapter_i(x)` with the weights of
  `layer.adapter_weights`; an adapter of weight 0 is skipped at run time by
  `lax.cond` (it costs no FLOPs).
* `per_example`: example `e` goes through adapter `layer.adapter_ids[e]`
  (-1: none), by one of two exact formulations:

  - dense (masked): `h = x @ concat_i(s_i a_i)` for every adapter at once
    (one matmul to the sum of the ranks `R`), the columns of the adapters an
    example does not use set to 0 (a mask from the ids and the static rank
    offsets; -1 keeps none), then `h @ concat_i(b_i)`. Two dense matmuls and
    no per-example copies of the factors; exact, because the masked columns
    add exact zeros. It costs `2 * tokens * R * (in + out)` FLOPs, so it
    grows with the number of adapters.
  - gather: the adapters stacked in a bank padded to the largest rank
    `r_max` (the zero padding adds exact zeros), the factors of each example
    gathered by id (`[examples, in, r_max]` and `[examples, r_max, out]`
    copies) and applied with one batched contraction. It costs
    `2 * tokens * r_max * (in + out)` FLOPs plus moving
    `(adapters + 2 * examples) * r_max * (in + out)` floats, whatever the
    number of adapters.

  The choice is static (shapes and ranks only, no retrace when ids change):
  dense when its extra FLOPs `2 * tokens * (R - r_max)` are at most
  `_FLOPS_PER_FLOAT_MOVED` times the floats the gather moves per
  `(in + out)` feature, `(adapters + 2 * examples) * r_max`
  (`_use_dense`). With few adapters (the common serving case: a handful per
  batch) the dense path wins; with many adapters and long sequences the
  gather path does. One difference: on the dense path an inf or NaN in an
  adapter's `b` reaches every example (a masked column is 0, and 0 * inf is
  NaN), not only the examples routed to that adapter.

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

import math

import jax
import jax.numpy as jnp
import numpy as np

from peft.nnx.adapter import _two_step

__all__ = ['weighted', 'per_example']

#: Cost of moving one float (written once, read once) in FLOPs, for the
#: choice between the dense and the gather formulation of `per_example`.
#: Measured on CPU (`python benchmarks/multi_adapter.py --sweep`: one
#: 1024x1024 Linear, 32 examples, adapters of rank 16): the dense path won
#: where its extra FLOPs were up to ~15x the gather's moved floats (2
#: adapters x 16 tokens, 16 adapters x 1 token) and lost from ~30x on
#: (64 adapters x 1 token, 4 adapters x 16 tokens); 24 splits the two.
_FLOPS_PER_FLOAT_MOVED = 24

_PATHS = (None, 'dense', 'gather')


def weighted(layer, x: jax.Array, out_sharding=None) -> jax.Array:
  """`sum_i w_i * adapter_i(x)`, skipping adapters of weight 0.

  Each adapter runs as it does alone (`x @ a` first, then `@ b`), so a single
  active adapter of weight 1 gives the same floats as a layer without others.
  """
  weights = layer.adapter_weights[...]
  total = None
  for i, (_, ad) in enumerate(layer.named_adapters()):
    xi, a, b = ad.factors(x)
    _, x_a, h_b = _two_step(ad.geometry, xi.ndim)
    run = lambda xi, a, b, w, x_a=x_a, h_b=h_b, ad=ad: jnp.einsum(
        h_b, jnp.einsum(x_a, xi, a, precision=ad.precision), b,
        precision=ad.precision, out_sharding=out_sharding) * w.astype(
            xi.dtype)
    shape = jax.eval_shape(run, xi, a, b, weights[i])
    out = jax.lax.cond(
        weights[i] != 0, run,
        lambda *_, shape=shape: jnp.zeros(shape.shape, shape.dtype),
        xi, a, b, weights[i])
    total = out if total is None else total + out
  return total


def _use_dense(ranks, examples: int, tokens: int) -> bool:
  """Whether the dense masked formulation is cheaper than the gather.

  Args:
    ranks: the rank of each adapter of the layer.
    examples: the number of examples (the first input axis).
    tokens: the rows of the adapter matmuls (examples times the other
      non-contracted input axes, e.g. the sequence).

  Examples:
    >>> _use_dense([8, 16, 8, 4], examples=32, tokens=32)
    True
    >>> _use_dense([16] * 64, examples=32, tokens=32 * 512)
    False
  """
  total, r_max = sum(ranks), max(ranks)
  extra_flops = 2 * tokens * (total - r_max)
  moved = (len(ranks) + 2 * examples) * r_max
  return extra_flops <= _FLOPS_PER_FLOAT_MOVED * moved


def _same_inputs(xs) -> bool:
  """True when every adapter sees the same input (no active dropout)."""
  return all(xi is xs[0] for xi in xs[1:])


def per_example(layer, x: jax.Array, out_sharding=None, *,
                path: str | None = None) -> jax.Array:
  """Example `e` through adapter `ids[e]` (-1: none), exactly.

  Args:
    layer: a `peft.nnx.LoRA` wrapper with `adapter_ids` set.
    x: the inputs; the first axis is the example axis.
    out_sharding: passed to the last contraction (explicit meshes).
    path: `None` (choose by `_use_dense`), `'dense'` or `'gather'`.

  Returns:
    The adapters' contribution, shaped like the wrapped layer's output.
  """
  if path not in _PATHS:
    raise ValueError(f"path must be one of {_PATHS}, got path={path!r}")
  g = layer.lora.geometry
  ads = [ad for _, ad in layer.named_adapters()]
  parts = [ad.factors(x) for ad in ads]
  x0 = parts[0][0]
  ins, outs = g.subscripts(x0.ndim, reserved=g.rank_letter())
  e = ins[0]
  if e in g.kernel:
    raise ValueError(
        f'per-example adapters need the first input axis to be the example'
        f' axis, but it is kernel axis {e!r} of {g.einsum_str!r}'
    )
  ids = layer.adapter_ids[...]
  if ids.shape != (x0.shape[0],):
    raise ValueError(
        f'adapter ids have shape {ids.shape}, the inputs have'
        f' {x0.shape[0]} examples; call set_adapter_ids with one id per'
        ' example'
    )
  ranks = [ad.rank for ad in ads]
  if path is None:
    tokens = math.prod(d for c, d in zip(ins, x0.shape)
                       if c not in g.contracted)
    path = 'dense' if _use_dense(ranks, x0.shape[0], tokens) else 'gather'
  run = _dense if path == 'dense' else _gather
  return run(g, ins, outs, parts, ranks, ids, layer.lora.precision,
             out_sharding)


def _dense(g, ins, outs, parts, ranks, ids, precision, out_sharding):
  """`(x @ concat(a)) * mask @ concat(b)`: two dense matmuls over all ranks."""
  a_str, b_str = g.lora_strs()
  r = a_str[-1]
  h_str = ''.join(c for c in ins if c not in g.contracted) + r
  xs, a_s, b_s = (list(t) for t in zip(*parts))
  dtype = jnp.result_type(*xs, *a_s, *b_s)
  a_cat = jnp.concatenate([a.astype(dtype) for a in a_s], axis=-1)
  b_cat = jnp.concatenate([b.astype(dtype) for b in b_s], axis=len(g.batch))
  x_a = f'{ins},{a_str}->{h_str}'
  if _same_inputs(xs):
    h = jnp.einsum(x_a, xs[0].astype(dtype), a_cat, precision=precision)
  else:  # dropout: each adapter sees its own dropped-out inputs
    h = jnp.concatenate([
        jnp.einsum(x_a, xi.astype(dtype), a.astype(dtype),
                   precision=precision) for xi, a in zip(xs, a_s)], axis=-1)
  # Column j of h belongs to adapter owner[j] (static rank offsets).
  owner = np.repeat(np.arange(len(ranks), dtype=np.int32), ranks)
  keep = ids[:, None] == jnp.asarray(owner)[None, :]
  keep = jnp.reshape(keep, (ids.shape[0],) + (1,) * (len(h_str) - 2)
                     + (owner.size,))
  h = jnp.where(keep, h, jnp.zeros((), h.dtype))
  return jnp.einsum(f'{h_str},{b_str}->{outs}', h, b_cat,
                    precision=precision, out_sharding=out_sharding)


def _gather(g, ins, outs, parts, ranks, ids, precision, out_sharding):
  """A rank-padded bank gathered per example, one batched contraction."""
  a_str, b_str = g.lora_strs()
  e = ins[0]
  r_max = max(ranks)
  r_axis_b = len(g.batch)
  xs, a_s, b_s = (list(t) for t in zip(*parts))
  dtype = jnp.result_type(*xs, *a_s, *b_s)
  a_bank = jnp.stack([
      jnp.pad(a.astype(dtype), [(0, 0)] * (a.ndim - 1) + [(0, r_max - k)])
      for a, k in zip(a_s, ranks)])
  b_bank = jnp.stack([
      jnp.pad(b.astype(dtype), [(0, r_max - k) if i == r_axis_b else (0, 0)
                                for i in range(b.ndim)])
      for b, k in zip(b_s, ranks)])
  index = jnp.clip(ids, 0, len(ranks) - 1)
  if _same_inputs(xs):
    xp = xs[0].astype(dtype)
  else:  # dropout: example e sees the inputs of its own adapter
    xp = jnp.stack([xi.astype(dtype) for xi in xs])[
        index, jnp.arange(ids.shape[0])]
  h_str = ''.join(c for c in ins if c not in g.contracted) + a_str[-1]
  h = jnp.einsum(f'{ins},{e}{a_str}->{h_str}', xp, a_bank[index],
                 precision=precision)
  out = jnp.einsum(f'{h_str},{e}{b_str}->{outs}', h, b_bank[index],
                   precision=precision, out_sharding=out_sharding)
  shape = [1] * out.ndim
  shape[outs.index(e)] = -1
  return jnp.where(jnp.reshape(ids >= 0, shape), out, jnp.zeros((), out.dtype))

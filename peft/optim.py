"""LoRA+: a larger learning rate for the `b` factors than for the `a` ones.

LoRA+ (Hayou et al., 2024) trains `b` with `ratio` times the learning rate of
`a` (ratio 16 in the paper). `lora_plus` builds that as one optax
transformation: the parameters are labelled by their name in the tree (`b`
and DoRA's `magnitude` get `ratio * learning_rate`, everything else
`learning_rate`) and each group gets its own instance of the optimizer.

Works for NNX (`nnx.Optimizer(model, lora_plus(optax.adamw, 1e-4),
wrt=nnx.LoRAParam)`) and for linen params trees with `lora: {a, b}` branches.

Examples:
  >>> import jax.numpy as jnp, optax
  >>> tx = lora_plus(optax.sgd, 0.1, ratio=4.0)
  >>> params = {'dense': {'lora': {'a': jnp.ones(2), 'b': jnp.ones(2)}}}
  >>> grads = params
  >>> updates, _ = tx.update(grads, tx.init(params), params)
  >>> [round(float(updates['dense']['lora'][k][0]), 6) for k in 'ab']
  [-0.1, -0.4]
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ['lora_plus', 'lora_plus_labels', 'FAST_NAMES']

#: Leaf names trained with `ratio * learning_rate`.
FAST_NAMES = ('b', 'magnitude')


def _key_name(entry: Any) -> Any:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def lora_plus_labels(params: Any) -> Any:
  """`'b'` for the `b` factors (and DoRA magnitudes), `'a'` for the rest.

  The label is read from the last name in each leaf's path that is not a
  variable's own slot (`value`), so NNX states and linen trees both work.
  """
  def label(path, _):
    names = [str(_key_name(e)) for e in path]
    names = [n for n in names if n not in ('value', 'raw_value')]
    return 'b' if names and names[-1] in FAST_NAMES else 'a'
  return jax.tree_util.tree_map_with_path(label, params)


def lora_plus(
    optimizer_factory: Callable[..., Any],
    learning_rate: Any,
    ratio: float = 16.0,
    **kwargs: Any,
):
  """An optax transformation training `b` at `ratio *` the rate of `a`.

  Args:
    optimizer_factory: an optax optimizer constructor taking the learning
      rate first, e.g. `optax.adamw` or `optax.sgd`.
    learning_rate: the rate of the `a` factors: a float or an optax schedule.
    ratio: `lr_b / lr_a` (> 0; LoRA+ suggests 16).
    **kwargs: passed to `optimizer_factory` for both groups (e.g.
      `weight_decay=0.01`).

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    TypeError: `optimizer_factory` is not callable or `ratio` not a number.
    ValueError: `ratio` is not positive and finite.
  """
  import math  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  if not callable(optimizer_factory):
    raise TypeError(
        'optimizer_factory must be an optax optimizer constructor such as'
        f' optax.adamw, got {optimizer_factory!r}')
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
    raise TypeError(f'ratio must be a positive number, got {ratio!r}')
  if not (ratio > 0 and math.isfinite(ratio)):
    raise ValueError(f'ratio must be positive and finite, got {ratio!r}')
  if callable(learning_rate):
    fast = lambda step: ratio * learning_rate(step)
  else:
    fast = ratio * learning_rate
  return optax.multi_transform(
      {'a': optimizer_factory(learning_rate, **kwargs),
       'b': optimizer_factory(fast, **kwargs)},
      lora_plus_labels)

"""Several named adapters on one layer: names, weights and per-example ids.

`NamedAdapters` is the part of the `peft.nnx.LoRA` wrapper that keeps its
named adapters: the first is `layer.lora`, the others live in the
`layer.adapters` dict, in the order of `layer.adapter_names`. Which adapters
count, and how much, lives in variables (`AdapterWeights`, `AdapterIds`), so
switching under `nnx.jit` does not retrace; `peft.nnx.routing` applies them
and `peft.nnx.adapters` holds the model-level functions.

Examples:
  >>> from flax import nnx
  >>> from peft.nnx.lora import LoRALinear
  >>> layer = LoRALinear(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rank=2,
  ...                    rngs=nnx.Rngs(1))
  >>> _ = layer.add_adapter('task_b', rank=4, rngs=nnx.Rngs(2))
  >>> layer.adapter_names, layer.adapter('task_b').rank
  (('default', 'task_b'), 4)
  >>> layer.set_weights({'task_b': 1.0})
  >>> [float(w) for w in layer.adapter_weights[...]]
  [0.0, 1.0]
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx

from peft.nnx.adapter import LoRAAdapter

__all__ = ['AdapterWeights', 'AdapterIds', 'NamedAdapters', 'check_name']


class AdapterWeights(nnx.Variable):
  """Weights of a layer's named adapters in its output (not trainable).

  Examples:
    >>> import jax.numpy as jnp
    >>> AdapterWeights(jnp.array([1.0, 0.0])).shape
    (2,)
  """


class AdapterIds(nnx.Variable):
  """Per-example adapter index of a layer (-1: no adapter; not trainable).

  Examples:
    >>> import jax.numpy as jnp
    >>> AdapterIds(jnp.array([0, -1, 1])).shape
    (3,)
  """


def check_name(name) -> None:
  """Checks an adapter name: a non-empty Python identifier."""
  if not isinstance(name, str) or not name:
    raise TypeError(f'name must be a non-empty str, got {name!r}')
  if not name.isidentifier():
    raise ValueError(
        f'name={name!r} must be a Python identifier (it is a key in the'
        ' model state), e.g. name=\'task_a\''
    )


class NamedAdapters:
  """Mixin: the named adapters of a wrapper (`lora` plus `adapters`).

  The wrapper sets `lora`, `adapters`, `adapter_names`, `adapter_weights`
  and `adapter_ids` in its `__init__`.
  """

  def adapter(self, name: str) -> LoRAAdapter:
    """The adapter called `name`.

    Raises:
      KeyError: no adapter of that name on this layer.
    """
    if name == self.adapter_names[0]:
      return self.lora
    if name in self.adapter_names:
      return self.adapters[name]
    raise KeyError(
        f'no adapter named {name!r} on this layer; it has'
        f' {list(self.adapter_names)}'
    )

  def named_adapters(self) -> list[tuple[str, LoRAAdapter]]:
    """`[(name, adapter), ...]` in the order the adapters were added."""
    return [(n, self.adapter(n)) for n in self.adapter_names]

  def remove_adapter(self, name: str) -> None:
    """Removes adapter `name` (the layer must keep at least one).

    Raises:
      KeyError: no adapter of that name.
      ValueError: it is the layer's only adapter (unwrap the layer instead:
        `peft.nnx.delete_adapter` does).
    """
    self.adapter(name)  # KeyError if missing
    if len(self.adapter_names) == 1:
      raise ValueError(
          f'{name!r} is the only adapter of this layer; use'
          ' peft.nnx.delete_adapter(model, name), which unwraps the layer'
      )
    weights = dict(zip(self.adapter_names, self._weights_list()))
    del weights[name]
    if name == self.adapter_names[0]:
      first = self.adapter_names[1]
      self.lora = self.adapters[first]
      del self.adapters[first]
    else:
      del self.adapters[name]
    self.adapter_names = tuple(n for n in self.adapter_names if n != name)
    self.adapter_ids = nnx.data(None)
    if len(self.adapter_names) == 1:
      self.adapters = nnx.data(None)
      if weights[self.adapter_names[0]] == 1.0:  # back to the plain layout
        self.adapter_weights = nnx.data(None)
        return
    self.adapter_weights = AdapterWeights(jnp.asarray(
        [weights[n] for n in self.adapter_names], jnp.float32))

  def _weights_list(self) -> list:
    """The weights as a list of scalars (arrays, so it works under tracing)."""
    if self.adapter_weights is None:
      return [1.0] + [0.0] * (len(self.adapter_names) - 1)
    return list(self.adapter_weights[...])

  def set_weights(self, weights: tp.Mapping[str, float]) -> None:
    """Sets the weight of each named adapter in the output (others: 0).

    Switches off per-example routing. Under `nnx.jit`, changing the values
    (not the set of names) does not retrace.
    """
    values = jnp.asarray([weights.get(n, 0.0) for n in self.adapter_names],
                         jnp.float32)
    if self.adapter_weights is None:
      self.adapter_weights = AdapterWeights(values)
    else:
      self.adapter_weights[...] = values
    self.adapter_ids = nnx.data(None)

  def set_ids(self, ids: jax.Array) -> None:
    """Routes example `i` of the next calls through adapter `ids[i]`.

    `ids` index this layer's `adapter_names`; -1 means no adapter. Writing
    ids of the same shape again does not retrace.
    """
    ids = jnp.asarray(ids, jnp.int32)
    if self.adapter_ids is not None and self.adapter_ids.shape == ids.shape:
      self.adapter_ids[...] = ids
    else:
      self.adapter_ids = AdapterIds(ids)

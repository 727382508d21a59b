"""The linen <-> NNX bridge of the LoRA modules, and their argument checks.

`_run_adapter` runs an NNX adapter of `peft.nnx` inside a linen module's own
scope, its `nnx.Param`s (`LoRAParam` included) stored as the linen params of
the same path (see `peft.linen.lora`, which re-exports every name here).

Examples:
  >>> _factor_box(('data', 'model')).names
  ('data', 'model')
"""

from __future__ import annotations

import math
import typing as tp
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict
import jax
import jax.numpy as jnp

from peft.linen import interceptor as _interceptor
from peft.nnx import dora as _dora
from peft.nnx.adapter import _factor_param

Array = jax.Array
Initializer = Callable[..., Array]

_A_INIT = nn.initializers.kaiming_uniform()
_B_INIT = nn.initializers.zeros_init()
_FACTORS = ('a', 'b')

# ---------------------------------------------------------------------------
# The bridge: an NNX module run as linen, its Params in `params`.
# ---------------------------------------------------------------------------


def _unboxed(x):
  """The array inside a linen metadata box (no sharding constraint applied)."""
  if isinstance(x, nn.Partitioned):
    return x.unbox(apply_constraint=False)
  if isinstance(x, nn.meta.AxisMetadata):
    return x.unbox()
  return x


def _factor_box(kernel_sharding) -> nn.Partitioned | None:
  """The `nn.Partitioned` template the factors are boxed in (or None)."""
  if kernel_sharding is None:
    return None
  if isinstance(kernel_sharding, nn.Partitioned):
    return kernel_sharding.replace(value=None)
  if isinstance(kernel_sharding, str) or not isinstance(
      kernel_sharding, Sequence):
    raise TypeError(
        'kernel_sharding must be the wrapped kernel\'s sharding names (a'
        " sequence such as ('data', 'model')), an nn.Partitioned, or None;"
        f' got {kernel_sharding!r}'
    )
  return nn.Partitioned(None, tuple(kernel_sharding))


def _check_factor_shapes(module: nn.Module, nnx_class, args, kwargs) -> None:
  """Raises a ValueError naming the param when a stored factor has another
  shape than the adapter built from the constructor arguments expects (e.g.
  params of another rank), instead of a shape error deep in the matmul."""
  present = [n for n in _FACTORS if module.has_variable('params', n)]
  if not present:
    return
  expected = nnx.eval_shape(
      lambda: nnx_class(*args, **kwargs, rngs=nnx.Rngs(0))
  )
  path = '/'.join(module.scope.path) or '<root>'
  for n in present:
    want = tuple(getattr(expected, n).shape)
    got = tuple(jnp.shape(_unboxed(module.get_variable('params', n))))
    if got != want:
      raise ValueError(
          f'{type(module).__name__} at {path!r}: the LoRA param'
          f' {path}/{n!s} has shape {got}, but this layer with'
          f' rank={kwargs["rank"]} expects {want}. The params were made for'
          ' another rank or layer size: build the wrapper with the rank the'
          ' params were trained with, or re-initialise the LoRA params.'
      )


def _run_adapter(module: nn.Module, nnx_class, args, kwargs, inputs, *,
                 kernel_sharding=None, dora_base=None, **call):
  """Runs NNX `nnx_class(*args, **kwargs)` on `inputs` in `module`'s own scope.

  With `kernel_sharding` (names or an `nn.Partitioned` of the wrapped kernel)
  the NNX adapter derives the factors' names (`peft.nnx.lora`), and `a`, `b`
  are stored boxed in `nn.Partitioned` with those names. With `dora_base`
  (`_DoRABase`) the adapter also has a DoRA `magnitude` param and the result
  is the DoRA layer output (`peft.nnx.dora.adapter_forward`).
  """
  box = _factor_box(kernel_sharding)
  kwargs = dict(kwargs)
  if box is not None:
    kwargs['kernel_sharding'] = tuple(box.names)
    # Names as metadata only: linen places params (jit out_shardings from
    # nn.get_partition_spec, or the box's constraint when unboxed).
    kwargs['sharding_meta'] = FrozenDict({'eager_sharding': False})
  if not module.is_initializing():
    if not module.is_mutable_collection('params'):
      missing = [n for n in _FACTORS if not module.has_variable('params', n)]
      if missing:
        path = '/'.join(module.scope.path) or '<root>'
        raise ValueError(
            f'{type(module).__name__} at {path!r}: the LoRA params'
            f' {[f"{path}/{n}" for n in missing]} are missing from the'
            " 'params' collection passed to apply (they would be silently"
            ' re-initialised). Initialise the model with the LoRA wrappers'
            ' (e.g. inside the same ModuleInterceptor), or add the LoRA tree'
            ' with `peft.merge_params(original, lora)`.'
        )
  run = None
  if dora_base is not None:
    nnx_class = _with_magnitude(nnx_class, dora_base.kernel)
    run = lambda ad, x: _dora.adapter_forward(  # pylint: disable=g-long-lambda
        ad, x, dora_base.y, dora_base.bias, dora_base.kernel)
  if not module.is_initializing():
    _check_factor_shapes(module, nnx_class, args, kwargs)
  return _bridge_call(module, nnx_class, tuple(args), kwargs, box, inputs,
                      run=run, **call)


class _DoRABase(tp.NamedTuple):
  """What a linen DoRA adapter needs from its base layer."""

  y: Array  # the base layer's output
  bias: Array | None  # its bias value
  kernel: Array  # its (float) kernel


def _with_magnitude(nnx_class, kernel):
  """`nnx_class` whose instances also hold a DoRA `magnitude` LoRAParam.

  Its value is the column norm of `kernel + s * a @ b` (what init stores;
  on apply the stored param replaces it, and jit drops the computation).
  """
  def make(*args, **kwargs):
    ad = nnx_class(*args, **kwargs)
    g = ad.geometry
    names = None
    if kwargs.get('kernel_sharding') is not None:
      by_letter = dict(zip(g.kernel, kwargs['kernel_sharding']))
      names = tuple(by_letter.get(c) for c in _dora.norm_letters(g))
    m = _dora.adapter_magnitude(ad, kernel).astype(ad.param_dtype)
    ad.magnitude = _factor_param(m, names, kwargs.get('sharding_meta'))
    return ad

  return make


def _to_linen_value(leaf: nnx.Variable, box: nn.Partitioned | None):
  """A param's linen value: boxed like the kernel when it has sharding names."""
  names = leaf.get_metadata().get('out_sharding')
  if box is not None and names is not None:
    return box.replace(value=leaf.get_value(), names=tuple(names))
  return leaf.get_value()


def _bridge_call(module: nn.Module, nnx_class, args, kwargs, box, inputs,
                 run=None, **call):
  """Builds NNX `nnx_class(*args, **kwargs)` around `module`'s params, runs it.

  The bridge between linen and the NNX adapter, with public APIs only (in
  the spirit of `nnx.bridge.ToLinen`, which would file `nnx.LoRAParam` under
  a `LoRAParam` collection): every `nnx.Param` (`LoRAParam` included) of the
  NNX module is the linen param of the same path in `module`'s `params`;
  other variables (the `LoRAScale` constant) are rebuilt from the
  constructor arguments on each call and not stored. When the params are
  missing and `params` is mutable (init) the NNX module's own initial values
  are stored, drawn from `module`'s rng streams.
  """
  params = module.variables.get('params', {})

  def stored(path):
    node = params
    for key in path:
      if not isinstance(node, Mapping) or key not in node:
        return None
      node = node[key]
    return node

  if module.is_mutable_collection('params') and not params:
    # init (or apply with mutable params and none stored yet).
    rngs = {name: module.make_rng(name) for name in module.scope.rngs}
    layer = nnx_class(*args, **kwargs,
                      rngs=nnx.Rngs(**(rngs or {'default': 0})))
    tree = nnx.traversals.unflatten_mapping({
        path: _to_linen_value(leaf, box)
        for path, leaf in nnx.to_flat_state(nnx.state(layer, nnx.Param))
    })
    for key, value in tree.items():
      module.put_variable('params', key, value)
  else:
    layer = nnx_class(*args, **kwargs, rngs=nnx.Rngs(0))
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))]
    missing = ['/'.join(map(str, p)) for p in paths if stored(p) is None]
    if missing:
      where = '/'.join(module.scope.path) or '<root>'
      raise ValueError(
          f'{type(module).__name__} at {where!r}: the params {missing} are'
          " missing from the 'params' collection; pass the complete LoRA"
          ' tree (e.g. `peft.merge_params(original, lora)`)'
      )
    nnx.update(layer, nnx.traversals.unflatten_mapping(
        {path: _unboxed(stored(path)) for path in paths}))
  if run is not None:
    return run(layer, inputs)
  return layer(inputs, **call)


def _adapter_kwargs(module) -> dict[str, Any]:
  return dict(
      rank=module.rank,
      alpha=module.alpha,
      a_init=module.a_init,
      b_init=module.b_init,
      param_dtype=module.dtype,
  )


def _check_alpha(alpha, owner: str) -> None:
  """`alpha` is None or a finite, non-zero real number."""
  if alpha is None:
    return
  try:
    if isinstance(alpha, (bool, str, bytes)):
      raise TypeError
    value = float(alpha)
  except (TypeError, ValueError):
    raise TypeError(
        f'{owner}: alpha must be a real number or None, got'
        f' {type(alpha).__name__} ({alpha!r}); pass e.g. alpha=16.0, or'
        ' alpha=None for no scaling'
    ) from None
  if not math.isfinite(value):
    raise ValueError(
        f'{owner}: alpha must be finite, got alpha={alpha!r}; pass e.g.'
        ' alpha=16.0, or alpha=None for no scaling'
    )
  if value == 0:
    raise ValueError(
        f'{owner}: alpha=0 makes the LoRA scale alpha / rank zero, so the'
        ' adapter adds nothing and every gradient of `a` and `b` is 0'
        ' (training would silently do nothing). Pass a non-zero alpha (e.g.'
        ' alpha=2 * rank), or alpha=None for no scaling.'
    )


def _check_rank(rank, owner: str) -> None:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(
        f'{owner}: rank must be a positive int, got rank={rank!r}; pass e.g.'
        ' rank=8'
    )


def _base_layer(wrapped: Any) -> Any:
  """The float linen layer under peft quantization wrappers (or `wrapped`)."""
  seen = 0
  while isinstance(wrapped, _interceptor.StandsForLayer) and seen < 8:
    wrapped = wrapped.wrapped
    seen += 1
  return wrapped


def _check_wrapped(owner: str, wrapped: Any, layer_type: type) -> None:
  base = _base_layer(wrapped)
  if not isinstance(base, layer_type):
    raise TypeError(
        f'{owner}: `wrapped` must be an nn.{layer_type.__name__} (or a peft'
        f' quantization wrapper of one), got {type(wrapped).__name__}. Use'
        ' LoRADense for nn.Dense, LoRAEinsum for nn.Einsum and'
        ' LoRADenseGeneral for nn.DenseGeneral.'
    )


def _kernel_box(wrapper: nn.Module) -> nn.Partitioned | None:
  """The wrapped kernel's `nn.Partitioned` box (value dropped), or None.

  Read from the scope the wrapper shares with the wrapped layer, after the
  layer ran. Under a peft int4 layer the stored `kernel` is the packed
  storage; its names are mapped back to the float kernel's.
  """
  if not wrapper.has_variable('params', 'kernel'):
    return None
  box = wrapper.get_variable('params', 'kernel')
  if not isinstance(box, nn.Partitioned):
    return None
  names = tuple(box.names)
  # Under nested interceptors the quantization wrapper may run in place of
  # `wrapped` (see `peft.linen.interceptor.stand_in`).
  layer, seen = _interceptor.stand_in(wrapper.wrapped), 0
  while isinstance(layer, _interceptor.StandsForLayer) and seen < 8:
    names = layer.float_kernel_names(names)
    layer, seen = layer.wrapped, seen + 1
  return box.replace(value=None, names=names)

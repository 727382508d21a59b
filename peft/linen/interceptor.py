"""Method interceptors for Flax linen: swap modules for their wrapped version.

`ModuleInterceptor(replace_module_fn)` is a context manager. Inside it, every
linen module method call is routed through `replace_module_fn(module)`, which
returns the module itself or a replacement (e.g. `peft.LoRADense(rank=3,
wrapped=module)`). This adds LoRA or quantization to an existing linen model
without editing its code:

>>> import flax.linen as nn, jax, jax.numpy as jnp
>>> import peft
>>> def to_lora(module):
...   if isinstance(module, nn.Dense):
...     return peft.LoRADense(rank=2, wrapped=module)
...   return module
>>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
>>> with peft.ModuleInterceptor(to_lora):
...   params = model.init(jax.random.key(0), jnp.ones((1, 4)))['params']
>>> sorted(params['layers_0']), sorted(params['layers_0']['lora'])
(['bias', 'kernel', 'lora'], ['a', 'b'])

Bookkeeping lives in `contextvars`, never on the instance, so one interceptor
may be used concurrently from several threads or asyncio tasks.
"""

from __future__ import annotations

import abc
import contextvars
import dataclasses
import itertools
from typing import Any, Callable

import flax.core
from flax import errors
from flax import linen as nn

from peft import _compat

__all__ = ['Interceptor', 'ModuleInterceptor']

_ids = itertools.count()

# {id(layer): peft quantization wrapper run for it} during the outermost
# intercepted call, shared by every ModuleInterceptor (None outside a call).
_stand_ins: contextvars.ContextVar[dict[int, Any] | None] = (
    contextvars.ContextVar('peft_stand_ins', default=None))


def stand_in(layer: Any) -> Any:
  """The peft quantization wrapper run in place of `layer`, or `layer`.

  When a `ModuleInterceptor` runs a quantization wrapper (`SimulateQuantized*`,
  `Int4*`) for `layer`, a LoRA wrapper whose `wrapped` is the float `layer`
  asks here, during the same `init`/`apply`, to read the stored kernel's
  layout (e.g. Q4_0 storage) right.

  Examples:
    >>> import flax.linen as nn
    >>> from peft.linen import interceptor
    >>> dense = nn.Dense(3)
    >>> interceptor.stand_in(dense) is dense
    True
  """
  return (_stand_ins.get() or {}).get(id(layer), layer)


class Interceptor(abc.ABC):
  """Base class of linen method interceptors, usable as a context manager.

  Subclasses implement `interceptor(next_fun, args, kwargs, context)` with the
  signature of `flax.linen.intercept_methods`; `with MyInterceptor(): ...`
  installs it for the calls made inside the block. The same instance may be
  entered again, nested, from several threads or from asyncio tasks: which
  blocks are open is tracked in `contextvars`.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> class CountCalls(peft.Interceptor):
    ...   def __init__(self):
    ...     self.names = []
    ...   def interceptor(self, next_fun, args, kwargs, context):
    ...     self.names.append(type(context.module).__name__)
    ...     return next_fun(*args, **kwargs)
    >>> counter = CountCalls()
    >>> with counter:
    ...   _ = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> counter.names
    ['Dense']
  """

  @abc.abstractmethod
  def interceptor(
      self,
      next_fun: Callable[..., Any],
      args: tuple[Any, ...],
      kwargs: dict[str, Any],
      context: nn.module.InterceptorContext,
  ) -> Any:
    """Called for each intercepted linen method call; see `nn.intercept_methods`."""

  # -- per-block hooks (subclasses may override) -----------------------------

  def _new_entry(self) -> Any:
    """A fresh object identifying one open `with` block (and its state)."""
    return object()

  def _intercept(self, entry, next_fun, args, kwargs, context) -> Any:
    del entry
    return self.interceptor(next_fun, args, kwargs, context)

  # -- context manager -------------------------------------------------------

  def _open_entries(self) -> contextvars.ContextVar:
    # One ContextVar per instance, created lazily (subclasses need not call
    # `__init__`); it holds the (entry, remove function) of each open block.
    var = self.__dict__.get('_peft_open_entries')
    if var is None:
      var = contextvars.ContextVar(
          f'peft_interceptor_{next(_ids)}', default=()
      )
      object.__setattr__(self, '_peft_open_entries', var)
    return var

  def _active_entry(self) -> Any:
    """The innermost open block of this interceptor in the current context."""
    open_entries = self._open_entries().get()
    return open_entries[-1][0] if open_entries else None

  def __enter__(self) -> 'Interceptor':
    var = self._open_entries()
    entry = self._new_entry()

    def fn(next_fun, args, kwargs, context):
      # Only the innermost open block of the current thread/task acts.
      if self._active_entry() is not entry:
        return next_fun(*args, **kwargs)
      return self._intercept(entry, next_fun, args, kwargs, context)

    remove = _compat.push_linen_interceptor(fn)
    var.set(var.get() + ((entry, remove),))
    return self

  def __exit__(self, exc_type, exc, tb) -> bool | None:
    var = self._open_entries()
    open_entries = var.get()
    if not open_entries:
      raise RuntimeError(
          f'{type(self).__name__}.__exit__ called without a matching'
          ' __enter__ in this thread/context; use it as `with interceptor:`'
      )
    _, remove = open_entries[-1]
    var.set(open_entries[:-1])
    remove()
    return None


class StandsForLayer:
  """Mixin of peft's linen wrappers that compute their `wrapped` layer
  themselves (`SimulateQuantized*`, `Int4*`): same params, another kernel.

  LoRA wrappers call their `wrapped` layer and are not `StandsForLayer`.

  Examples:
    >>> import peft
    >>> issubclass(peft.SimulateQuantizedDense, StandsForLayer)
    True
  """


def _wraps_layer(module: nn.Module) -> bool:
  """True for peft wrappers that compute their `wrapped` layer themselves.

  `SimulateQuantized*` and `Int4*` never call the layer they wrap; they stand
  for it (same params, another kernel). LoRA wrappers call their `wrapped`.
  """
  return isinstance(module, StandsForLayer)


def _is_root(module: nn.Module) -> bool:
  """True for the module given to `init`/`apply` (not a transform's clone)."""
  scope = module.scope
  return isinstance(module.parent, flax.core.Scope) and (
      scope is None or not tuple(scope.path))


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleInterceptor(Interceptor):
  """Context manager routing each linen module through `replace_module_fn`.

  Inside the `with` block, the first call of a linen module instance calls
  `replace_module_fn(module)`; if it returns another module, that module runs
  in place of the original (for `__call__` and any other method the
  replacement defines). Rules:

  * each module instance is replaced once per outermost `init`/`apply` call
    (more precisely, per outermost intercepted module call): a module called
    twice is wrapped once and reuses the same replacement (and its params).
    Nothing is kept once that call returns, so a long-running block holds no
    memory for the calls it has finished;
  * the replacement's own calls to the module it wraps are not intercepted
    again (no infinite wrapping); other modules, including children of the
    wrapped module, are still intercepted;
  * `peft` wrappers share the wrapped module's scope, so the wrapped `Dense_0`
    holds `{'kernel', 'bias', 'lora': {'a', 'b'}}`; a wrapper without shared
    scope nests its params under the wrapped module (`Dense_0/MyWrapper_0`);
  * a peft quantization wrapper (`SimulateQuantized*`, `Int4*`) stands for
    the layer it wraps: when `replace_module_fn` keeps the quantization
    wrapper but replaces its wrapped layer (e.g. by `LoRADense`), the
    replacement runs and its calls of the layer run the quantized layer.
    So nested interceptors compose in either order: a quantization
    interceptor and a LoRA interceptor give a quantized base with LoRA on
    top (`kernel`, `bias`, `lora: {a, b}` in the layer's scope). Two
    quantizations of one layer are a ValueError;
  * methods of lifted transforms (`nn.remat(nn.Dense)`, ...) are looked
    through: the module inside the transform is the one replaced;
  * state is kept in `contextvars`: one instance can be used concurrently by
    several threads or asyncio tasks, each with its own model;
  * the root module given to `init`/`apply` cannot be replaced (ValueError):
    wrap it directly instead.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import peft
    >>> def _replace_dense_by_lora(module):
    ...   if isinstance(module, nn.Dense):
    ...     return peft.LoRADense(rank=3, wrapped=module)
    ...   return module
    >>> model = nn.Sequential([nn.Dense(4), nn.Dense(2)])
    >>> x = jnp.ones((1, 5))
    >>> with peft.ModuleInterceptor(_replace_dense_by_lora):
    ...   params = model.init(jax.random.key(0), x)['params']
    ...   y = model.apply({'params': params}, x)
    >>> params['layers_0']['lora']['a'].shape
    (5, 3)

    Nested with a quantization interceptor (either order):

    >>> def _quantize_dense(module):
    ...   if isinstance(module, nn.Dense):
    ...     return peft.SimulateQuantizedDense(wrapped=module, method='int8')
    ...   return module
    >>> with peft.ModuleInterceptor(_quantize_dense):
    ...   with peft.ModuleInterceptor(_replace_dense_by_lora):
    ...     params = model.init(jax.random.key(0), x)['params']
    >>> sorted(params['layers_1']), sorted(params['layers_1']['lora'])
    (['bias', 'kernel', 'lora'], ['a', 'b'])

  Attributes:
    replace_module_fn: `module -> module`; return the module itself to keep
      it unchanged.
  """

  replace_module_fn: Callable[[nn.Module], nn.Module]

  def __post_init__(self) -> None:
    if not callable(self.replace_module_fn):
      raise TypeError(
          'replace_module_fn must be a callable `module -> module`, got'
          f' {type(self.replace_module_fn).__name__}'
      )
    n = next(_ids)
    var = contextvars.ContextVar
    # ids of the modules whose calls must not be intercepted (the wrapper
    # running and the module it wraps), for the current call stack.
    object.__setattr__(self, '_no_recurse', var(
        f'peft_module_interceptor_skip_{n}', default=frozenset()))
    # {id(layer): quantization wrapper} for the layers that a replacement of
    # a quantization wrapper calls (see `_route`), for the current call stack.
    object.__setattr__(self, '_substitutes', var(
        f'peft_module_interceptor_substitutes_{n}', default={}))
    # {id(module): (module, replacement)} of the outermost intercepted call
    # running in this context (None outside such a call).
    object.__setattr__(self, '_cache', var(
        f'peft_module_interceptor_cache_{n}', default=None))

  def _intercept(self, entry, next_fun, args, kwargs, context):
    del entry
    return self._route(next_fun, args, kwargs, context)

  def interceptor(self, next_fun, args, kwargs, context):
    """Routes the call to the (cached) replacement of `context.module`.

    Used as is when installed by hand with `nn.intercept_methods`; the `with`
    statement is the intended use.
    """
    return self._route(next_fun, args, kwargs, context)

  def _cache_size(self) -> int:
    """Replacements held in the current context (0 outside any model call)."""
    cache = self._cache.get()
    return 0 if cache is None else len(cache)

  def _route(self, next_fun, args, kwargs, context):
    module = context.module
    method_name = context.method_name
    if method_name == 'setup' or id(module) in self._no_recurse.get():
      return next_fun(*args, **kwargs)
    substitute = self._substitutes.get().get(id(module))
    if substitute is not None:
      # A replacement of `substitute` calls the layer it stands for.
      return self._run(substitute, next_fun, method_name, args,
                       kwargs, skip=(module,))
    if not callable(getattr(type(module), method_name, None)):
      # Not a method of the class: the outer shell of a lifted transform
      # (nn.remat(nn.Dense), ...); the module inside it is intercepted.
      return next_fun(*args, **kwargs)
    if self._cache.get() is not None:
      return self._dispatch(module, next_fun, method_name, args, kwargs)
    token = self._cache.set({})
    shared = _stand_ins.set({}) if _stand_ins.get() is None else None
    try:
      return self._dispatch(module, next_fun, method_name, args, kwargs)
    finally:
      if shared is not None:
        _stand_ins.reset(shared)
      self._cache.reset(token)

  def _replacement(self, module: nn.Module) -> nn.Module:
    """`replace_module_fn(module)`, called once per module instance."""
    cache = self._cache.get()
    cached = cache.get(id(module))
    if cached is not None:
      return cached[1]
    replacement = self.replace_module_fn(module)
    if not isinstance(replacement, nn.Module):
      raise TypeError(
          'replace_module_fn must return a linen Module (the module itself'
          f' to keep it), got {type(replacement).__name__} for'
          f' {type(module).__name__} {module.name!r}'
      )
    # The module is kept with its replacement so that its id() is not
    # reused while cached.
    cache[id(module)] = (module, replacement)
    return replacement

  def _dispatch(self, module, next_fun, method_name, args, kwargs):
    is_root = _is_root(module)  # before replace_module_fn may re-parent it
    replacement = self._replacement(module)
    if replacement is module:
      no_recurse = self._no_recurse.get()
      if _wraps_layer(module) and id(module.wrapped) not in no_recurse:
        # (A layer in `_no_recurse` is already replaced up the call stack,
        # e.g. by `LoRADense(wrapped=Int4Dense(wrapped=layer))`.)
        layer = module.wrapped

        def twice(other: str) -> ValueError:
          return ValueError(
              f'ModuleInterceptor: {type(layer).__name__} {layer.name!r} is'
              f' quantized twice: by {type(module).__name__}(method='
              f'{module.method!r}) and by {other} from replace_module_fn. A'
              ' layer takes one quantization wrapper: return the module'
              ' unchanged from one of the nested interceptors.'
          )

        try:
          layer_replacement = self._replacement(layer)
        except errors.NameInUseError as e:
          # replace_module_fn built a second wrapper of `module`'s class
          # in the scope `module` already shares with `layer`.
          raise twice(f'another {type(module).__name__}') from e
        # (`module` may be this interceptor's own replacement of `layer`,
        # seen again when one of its helper methods is called.)
        if layer_replacement is not layer and layer_replacement is not module:
          if _wraps_layer(layer_replacement):
            raise twice(f'{type(layer_replacement).__name__}(method='
                        f'{layer_replacement.method!r})')
          # The quantization wrapper stands for `layer`: run the layer's
          # replacement, whose calls of `layer` run the quantization wrapper.
          token = self._substitutes.set(
              {**self._substitutes.get(), id(layer): module})
          _stand_ins.get()[id(layer)] = module
          try:
            return self._run(layer_replacement, next_fun,
                             method_name, args, kwargs, skip=(module,))
          finally:
            self._substitutes.reset(token)
      return next_fun(*args, **kwargs)
    if _wraps_layer(replacement):
      _stand_ins.get()[id(module)] = replacement
    if is_root:
      raise ValueError(
          f'ModuleInterceptor: replace_module_fn replaced the root module'
          f' ({type(module).__name__}) of init/apply; linen cannot rebind the'
          ' root inside its own call. Call the model that contains it, or'
          ' build the wrapper directly, e.g.'
          ' `peft.LoRADense(rank=4, wrapped=nn.Dense(8)).init(...)`.'
      )
    return self._run(replacement, next_fun, method_name, args,
                     kwargs, skip=(module,))

  def _run(self, replacement, next_fun, method_name, args, kwargs, skip):
    """Calls `replacement.<method_name>` in place of the intercepted method.

    The modules in `skip` and `replacement` are not intercepted again by
    this interceptor while it runs.
    """
    method = getattr(type(replacement), method_name, None)
    if method is None or not callable(method):
      # The replacement does not provide this method: keep the original.
      return next_fun(*args, **kwargs)
    token = self._no_recurse.set(
        self._no_recurse.get() | {id(m) for m in skip} | {id(replacement)}
    )
    try:
      return getattr(replacement, method_name)(*args, **kwargs)
    finally:
      self._no_recurse.reset(token)

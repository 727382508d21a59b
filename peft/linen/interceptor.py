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
import contextlib
import contextvars
import dataclasses
import itertools
from typing import Any, Callable, Iterator

from flax import linen as nn

__all__ = ['Interceptor', 'ModuleInterceptor']

_ids = itertools.count()


@contextlib.contextmanager
def _install(fn: Callable[..., Any]) -> Iterator[None]:
  """Pushes `fn` on linen's (thread-local) interceptor stack for the block.

  Unlike `nn.intercept_methods`, exiting removes `fn` itself rather than
  asserting it is on top, so blocks opened by interleaved asyncio tasks of one
  thread may close in any order (each `fn` checks its own contextvars and is
  a no-op outside its own task's block).

  This touches flax's private `_global_interceptor_stack._storage` on
  purpose: the public `nn.intercept_methods` pops on exit and asserts the
  popped function is its own, which fails (AssertionError) when two asyncio
  tasks of one thread close their blocks out of order (flax 0.12.8; see
  tests/test_linen_interceptor.py::test_asyncio_tasks). Flax versions
  without that list storage fall back to `nn.intercept_methods`.
  """
  stack = getattr(nn.module, '_global_interceptor_stack', None)
  if not isinstance(getattr(stack, '_storage', None), list):
    with nn.intercept_methods(fn):  # pragma: no cover - other flax versions
      yield
    return
  stack.push(fn)
  try:
    yield
  finally:
    storage = stack._storage  # pylint: disable=protected-access
    for i in range(len(storage) - 1, -1, -1):
      if storage[i] is fn:
        del storage[i]
        break


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
    # `__init__`); it holds the (entry, context manager) of each open block.
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

    cm = _install(fn)
    cm.__enter__()
    var.set(var.get() + ((entry, cm),))
    return self

  def __exit__(self, exc_type, exc, tb) -> bool | None:
    var = self._open_entries()
    open_entries = var.get()
    if not open_entries:
      raise RuntimeError(
          f'{type(self).__name__}.__exit__ called without a matching'
          ' __enter__ in this thread/context; use it as `with interceptor:`'
      )
    _, cm = open_entries[-1]
    var.set(open_entries[:-1])
    return cm.__exit__(exc_type, exc, tb)


@dataclasses.dataclass(frozen=True)
class _Replacement:
  # Keeps the original alive so that its id() is not reused while cached.
  original: nn.Module
  replacement: nn.Module
  is_root: bool


class _State:
  """Per-`with` bookkeeping: the replacement made for each module instance."""

  def __init__(self) -> None:
    self.replacements: dict[int, _Replacement] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleInterceptor(Interceptor):
  """Context manager routing each linen module through `replace_module_fn`.

  Inside the `with` block, the first call of a linen module instance calls
  `replace_module_fn(module)`; if it returns another module, that module runs
  in place of the original (for `__call__` and any other method the
  replacement defines). Rules:

  * each module instance is replaced once per `with` block: a module called
    twice is wrapped once and reuses the same replacement (and its params);
  * the replacement's own calls to the module it wraps are not intercepted
    again (no infinite wrapping); other modules, including children of the
    wrapped module, are still intercepted;
  * `peft` wrappers share the wrapped module's scope, so the wrapped `Dense_0`
    holds `{'kernel', 'bias', 'lora': {'a', 'b'}}`; a wrapper without shared
    scope nests its params under the wrapped module (`Dense_0/MyWrapper_0`);
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
    # ids of the modules whose calls must not be intercepted (the wrapper
    # running and the module it wraps), for the current call stack.
    object.__setattr__(
        self,
        '_no_recurse',
        contextvars.ContextVar(
            f'peft_module_interceptor_skip_{next(_ids)}', default=frozenset()
        ),
    )
    # State used when `interceptor` is installed by hand, without `with`.
    object.__setattr__(
        self,
        '_loose_state',
        contextvars.ContextVar(f'peft_module_interceptor_{next(_ids)}'),
    )

  def _new_entry(self) -> _State:
    return _State()

  def _intercept(self, entry, next_fun, args, kwargs, context):
    return self._route(entry, next_fun, args, kwargs, context)

  def interceptor(self, next_fun, args, kwargs, context):
    """Routes the call to the (cached) replacement of `context.module`.

    Used as is when installed by hand with `nn.intercept_methods`; the `with`
    statement is the intended use.
    """
    state = self._active_entry()
    if state is None:
      state = self._loose_state.get(None)
      if state is None:
        state = _State()
        self._loose_state.set(state)
    return self._route(state, next_fun, args, kwargs, context)

  def _route(self, state: _State, next_fun, args, kwargs, context):
    module = context.module
    method_name = context.method_name
    if method_name == 'setup' or id(module) in self._no_recurse.get():
      return next_fun(*args, **kwargs)
    cached = state.replacements.get(id(module))
    if cached is None:
      # Checked before replace_module_fn, which may re-parent the module.
      is_root = isinstance(module.parent, nn.module.Scope)
      replacement = self.replace_module_fn(module)
      if not isinstance(replacement, nn.Module):
        raise TypeError(
            'replace_module_fn must return a linen Module (the module itself'
            f' to keep it), got {type(replacement).__name__} for'
            f' {type(module).__name__} {module.name!r}'
        )
      cached = _Replacement(original=module, replacement=replacement,
                            is_root=is_root)
      state.replacements[id(module)] = cached
    replacement = cached.replacement
    if replacement is module:
      return next_fun(*args, **kwargs)
    if cached.is_root:
      raise ValueError(
          f'ModuleInterceptor: replace_module_fn replaced the root module'
          f' ({type(module).__name__}) of init/apply; linen cannot rebind the'
          ' root inside its own call. Call the model that contains it, or'
          ' build the wrapper directly, e.g.'
          ' `peft.LoRADense(rank=4, wrapped=nn.Dense(8)).init(...)`.'
      )
    method = getattr(type(replacement), method_name, None)
    if method is None or not callable(method):
      # The replacement does not provide this method: keep the original.
      return next_fun(*args, **kwargs)
    token = self._no_recurse.set(
        self._no_recurse.get() | {id(module), id(replacement)}
    )
    try:
      return getattr(replacement, method_name)(*args, **kwargs)
    finally:
      self._no_recurse.reset(token)

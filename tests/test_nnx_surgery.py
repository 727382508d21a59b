"""Tests for peft.nnx.surgery: graph walking, selectors, LoRA / quantization
surgery, merging, state and summary.

References are independent: dense numpy / jnp.einsum computations from the raw
parameters, the model's own output before surgery, or counts worked out by hand.
"""

import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft.nnx import surgery


def _np(x):
  return np.asarray(x, np.float32)


# Initializers drawing from numpy: eager jax.random calls compile one XLA
# program per shape, which dominates the run time of small tests.
_RNG = np.random.default_rng(0)


def _init(key, shape, dtype=jnp.float32):
  del key
  fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
  return jnp.asarray(_RNG.normal(size=shape) / np.sqrt(fan_in), dtype)


def _x(*shape):
  return jnp.asarray(_RNG.normal(size=shape), jnp.float32)


K = dict(kernel_init=_init)
A = dict(a_init=_init)


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------


class Parent(nnx.Module):

  def __init__(self, shared, rngs):
    self.shared = shared
    self.own = nnx.Linear(4, 4, rngs=rngs, **K)

  def __call__(self, x):
    return self.shared(x) + self.own(x)


class Leaf(nnx.Module):

  def __init__(self, rngs):
    self.deep = nnx.Linear(4, 4, rngs=rngs, **K)


class Mid(nnx.Module):

  def __init__(self, rngs):
    self.leaf = Leaf(rngs)


class GraphModel(nnx.Module):
  """Linear layers as attributes, in nnx.List / nnx.Dict, 3 levels deep, shared."""

  def __init__(self, rngs):
    self.a = nnx.Linear(4, 4, rngs=rngs, **K)
    self.items = nnx.List([nnx.Linear(4, 4, rngs=rngs, **K) for _ in range(2)])
    self.named = nnx.Dict(x=nnx.Linear(4, 4, rngs=rngs, **K))
    self.mid = Mid(rngs)
    shared = nnx.Linear(4, 4, rngs=rngs, **K)
    self.p1 = Parent(shared, rngs)
    self.p2 = Parent(shared, rngs)
    self.act = nnx.relu  # not a layer

  def __call__(self, x):
    y = self.a(x) + self.items[0](x) + self.items[1](x)
    y = y + self.named['x'](x) + self.mid.leaf.deep(x)
    return y + self.p1(x) + 2.0 * self.p2(x)


# Unique Linear objects: a, items/0, items/1, named/x, mid/leaf/deep,
# p1/shared (== p2/shared), p1/own, p2/own.
N_GRAPH_LINEARS = 8


def _lora_paths(model):
  return sorted(
      p for p, m in surgery.select(model) if type(m).__name__.startswith('LoRA')
  )


def _randomize_lora(model, seed=0):
  """Gives every adapter a non-zero `b` (fresh adapters are a no-op)."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = [
      jnp.asarray(0.3 * rng.normal(size=l.shape), l.dtype) for l in leaves
  ]
  nnx.update(model, jax.tree.unflatten(treedef, new))


# ---------------------------------------------------------------------------
# replace
# ---------------------------------------------------------------------------


class Box(nnx.Module):

  def __init__(self, inner):
    self.inner = inner


def test_replace_parents_first_once_per_object_and_no_descent():
  model = GraphModel(nnx.Rngs(0))
  shared = model.p1.shared
  calls = []

  def fn(path, m):
    calls.append((path, m))
    return Box(m) if isinstance(m, nnx.Linear) else m

  out = surgery.replace(model, fn)
  assert out is model
  paths = [p for p, _ in calls]
  # Parents before children.
  assert paths.index(('mid',)) < paths.index(('mid', 'leaf'))
  assert paths.index(('mid', 'leaf')) < paths.index(('mid', 'leaf', 'deep'))
  assert paths[0] == ()
  # Each object once (the shared Linear too), and never the Box contents.
  ids = [id(m) for _, m in calls]
  assert len(ids) == len(set(ids))
  assert sum(m is shared for _, m in calls) == 1
  assert not any(isinstance(m, Box) for _, m in calls)
  assert sum(isinstance(m, nnx.Linear) for _, m in calls) == N_GRAPH_LINEARS
  # Installed everywhere, sharing preserved.
  assert isinstance(model.items[1], Box) and isinstance(model.named['x'], Box)
  assert isinstance(model.mid.leaf.deep, Box)
  assert model.p1.shared is model.p2.shared
  assert model.p1.shared.inner is shared


def test_replace_root_and_tuple_containers():
  lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  assert isinstance(surgery.replace(lin, lambda p, m: Box(m)), Box)

  class WithTuple(nnx.Module):

    def __init__(self):
      self.pair = nnx.data((lin, 3))

  model = WithTuple()
  surgery.replace(
      model, lambda p, m: Box(m) if isinstance(m, nnx.Linear) else m
  )
  assert isinstance(model.pair[0], Box) and model.pair[1] == 3
  assert model.pair[0].inner is lin


def test_replace_bad_arguments():
  with pytest.raises(TypeError, match='fn'):
    surgery.replace(GraphModel(nnx.Rngs(0)), 'not callable')
  with pytest.raises(TypeError, match='model'):
    surgery.replace(3, lambda p, m: m)


# ---------------------------------------------------------------------------
# apply_lora on the graph model: counts, sharing, split/merge, jit
# ---------------------------------------------------------------------------


def test_apply_lora_counts_and_sharing_preserved():
  model = GraphModel(nnx.Rngs(0))
  x = _x(3, 4)
  y_before = model(x)
  shared = model.p1.shared
  out = surgery.apply_lora(
      model, rank=2, rngs=nnx.Rngs(1), **A, expected_count=N_GRAPH_LINEARS
  )
  assert out is model
  wrapped = [m for _, m in surgery.select(model)]
  assert len(wrapped) == N_GRAPH_LINEARS
  assert all(type(m).__name__ == 'LoRALinear' for m in wrapped)
  assert model.p1.shared is model.p2.shared
  assert model.p1.shared.wrapped is shared
  assert type(model.items[0]).__name__ == 'LoRALinear'
  assert type(model.named['x']).__name__ == 'LoRALinear'
  assert type(model.mid.leaf.deep).__name__ == 'LoRALinear'
  # Fresh adapters (b = 0) change nothing.
  np.testing.assert_array_equal(_np(model(x)), _np(y_before))
  # One adapter per unique layer: 2 LoRAParams each.
  assert len(jax.tree.leaves(surgery.lora_state(model))) == 2 * N_GRAPH_LINEARS

  # Sharing survives split / merge ...
  gdef, state = nnx.split(model)
  again = nnx.merge(gdef, state)
  assert again.p1.shared is again.p2.shared
  assert type(again.p1.shared).__name__ == 'LoRALinear'

  # ... and jax.jit of the split state.
  _randomize_lora(model)
  gdef, state = nnx.split(model)
  seen = []

  @jax.jit
  def forward(state, x):
    m = nnx.merge(gdef, state)
    seen.append(m.p1.shared is m.p2.shared)
    return m(x)

  np.testing.assert_allclose(
      _np(forward(state, x)), _np(model(x)), rtol=1e-5, atol=1e-5
  )
  assert seen == [True]


def test_shared_adapter_trains_once():
  """Gradient through both uses of the shared wrapper lands on one adapter."""
  model = GraphModel(nnx.Rngs(0))
  surgery.apply_lora(model, rank=2, where='p1/shared', rngs=nnx.Rngs(1), **A)
  _randomize_lora(model)
  x = jnp.ones((2, 4))
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  grads = jax.grad(
      lambda l: jnp.sum(nnx.merge(gdef, l, rest, copy=True)(x))
  )(lora)
  g = grads['p1']['shared']['lora']['b'][...]
  # d/d b of sum((x @ a) @ b) * (1 + 2) uses: p1 once, p2 with weight 2.
  a = model.p1.shared.lora.a[...]
  scale = float(model.p1.shared.lora.scale[...])
  expected = 3.0 * scale * np.outer(_np(x @ a).sum(0), np.ones(4))
  np.testing.assert_allclose(_np(g), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Selectors, dry run, errors
# ---------------------------------------------------------------------------


def test_selectors_regex_type_predicate():
  model = GraphModel(nnx.Rngs(0))
  assert surgery.apply_lora(
      model, rank=2, where=r'items/\d+', dry_run=True
  ) == ['items/0', 'items/1']
  # A shared layer matches by any of its paths (p2/shared is its second path).
  assert surgery.apply_lora(model, rank=2, where='p2/shared', dry_run=True) == [
      'p1/shared'
  ]
  assert surgery.apply_lora(
      model, rank=2, where=lambda path, m: path[-1] == 'own', dry_run=True
  ) == ['p1/own', 'p2/own']
  assert len(surgery.apply_lora(model, rank=2, where=nnx.Linear, dry_run=True)) == 8
  assert surgery.apply_lora(model, rank=2, where=(Parent, Leaf), dry_run=True) == [
      'mid/leaf/deep', 'p1/own', 'p1/shared', 'p2/own'
  ]
  # Dry runs changed nothing.
  assert all(type(m) is nnx.Linear for _, m in surgery.select(model))
  surgery.apply_lora(
      model, rank=2, where=re.compile(r'named/.*'), rngs=nnx.Rngs(0),
      expected_count=1,
  )
  assert type(model.named['x']).__name__ == 'LoRALinear'
  assert type(model.a) is nnx.Linear


def test_selector_matching_nothing_lists_candidates():
  model = GraphModel(nnx.Rngs(0))
  with pytest.raises(ValueError) as e:
    surgery.apply_lora(model, rank=2, where='layers/.*', rngs=nnx.Rngs(0), **A)
  msg = str(e.value)
  assert 'matched no layer' in msg
  for p in ['a', 'items/0', 'items/1', 'named/x', 'mid/leaf/deep', 'p1/shared']:
    assert f'\n  {p}\n' in msg + '\n'
  with pytest.raises(ValueError, match='matched no layer'):
    surgery.select(model, where=nnx.Einsum)
  with pytest.raises(ValueError, match='matched no layer'):
    surgery.apply_lora(model, rank=2, where=lambda p, m: False, dry_run=True)


def test_expected_count_and_bad_selectors():
  model = GraphModel(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'expected_count=3 but .* matched 2'):
    surgery.apply_lora(
        model, rank=2, where=r'items/\d', expected_count=3, rngs=nnx.Rngs(0), **A
    )
  with pytest.raises(ValueError, match='where.*regular expression'):
    surgery.select(model, where='items/(')
  with pytest.raises(TypeError, match='where'):
    surgery.select(model, where=3)
  with pytest.raises(ValueError, match='expected_count'):
    surgery.apply_lora(model, rank=2, expected_count=-1, dry_run=True)
  with pytest.raises(TypeError, match='rngs'):
    surgery.apply_lora(model, rank=2)
  assert all(type(m) is nnx.Linear for _, m in surgery.select(model))


def test_never_rewraps_and_failure_leaves_model_unchanged():
  model = GraphModel(nnx.Rngs(0))
  with pytest.raises(ValueError):
    surgery.apply_lora(model, rank=0, rngs=nnx.Rngs(0), **A)
  assert all(type(m) is nnx.Linear for _, m in surgery.select(model))

  surgery.apply_lora(model, rank=2, where=r'items/.*', rngs=nnx.Rngs(0), **A)
  inner = model.items[0]
  surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(0), **A)  # the other 6 only.
  assert model.items[0] is inner
  assert all(type(m).__name__ == 'LoRALinear' for _, m in surgery.select(model))
  assert all(type(m.wrapped) is nnx.Linear for _, m in surgery.select(model))
  with pytest.raises(ValueError, match='already have a LoRA adapter'):
    surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(0), **A)


# ---------------------------------------------------------------------------
# Training, merge, state, summary
# ---------------------------------------------------------------------------


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(6, 16, rngs=rngs, **K)
    self.down = nnx.Linear(16, 3, rngs=rngs, **K)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


def test_lora_only_training_lowers_loss_base_bit_identical():
  model = MLP(nnx.Rngs(0))
  surgery.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1), **A)
  base_filter = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  base_before = [np.array(v) for v in jax.tree.leaves(nnx.state(model, base_filter))]
  x = _x(32, 6)
  y = jnp.sin(x[:, :3] * 2.0) + x[:, 3:]
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  tx = optax.adam(1e-2)
  opt_state = tx.init(lora)

  def loss_fn(lora):
    return jnp.mean((nnx.merge(gdef, lora, rest, copy=True)(x) - y) ** 2)

  @jax.jit
  def step(lora, opt_state):
    loss, g = jax.value_and_grad(loss_fn)(lora)
    updates, opt_state = tx.update(g, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  losses = []
  for _ in range(60):
    lora, opt_state, loss = step(lora, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  nnx.update(model, lora)
  # The same with nnx.Optimizer(..., wrt=nnx.LoRAParam) updating the model.
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.LoRAParam)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  for _ in range(3):
    loss, grads = grad_fn(nnx.state(model, nnx.LoRAParam))
    optimizer.update(model, grads)
  assert float(grad_fn(nnx.state(model, nnx.LoRAParam))[0]) < float(loss)
  base_after = jax.tree.leaves(nnx.state(model, base_filter))
  assert len(base_after) == len(base_before) == 4
  for before, after in zip(base_before, base_after):
    np.testing.assert_array_equal(before, np.array(after))
  assert float(jnp.mean((model(x) - y) ** 2)) == pytest.approx(
      float(loss_fn(nnx.state(model, nnx.LoRAParam))), rel=1e-4
  )


def test_merge_lora_equivalence_and_independent_kernel():
  model = GraphModel(nnx.Rngs(0))
  surgery.apply_lora(model, rank=3, alpha=6.0, rngs=nnx.Rngs(1), **A)
  _randomize_lora(model)
  x = _x(5, 4)
  y_before = model(x)
  w = model.items[0]
  old_kernel_var = w.wrapped.kernel
  old_kernel = np.array(old_kernel_var[...])
  a, b = _np(w.lora.a[...]), _np(w.lora.b[...])
  expected = old_kernel + 2.0 * a @ b  # alpha / rank = 2.
  assert surgery.merge_lora(model, dry_run=True) == [
      'a', 'items/0', 'items/1', 'mid/leaf/deep', 'named/x', 'p1/own',
      'p1/shared', 'p2/own'
  ]
  out = surgery.merge_lora(model, expected_count=N_GRAPH_LINEARS)
  assert out is model
  assert all(type(m) is nnx.Linear for _, m in surgery.select(model))
  assert model.p1.shared is model.p2.shared
  np.testing.assert_allclose(
      _np(model(x)), _np(y_before), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
      _np(model.items[0].kernel[...]), expected, rtol=1e-6, atol=1e-6
  )
  # The old kernel Variable was not mutated; the bias Variable is reused.
  np.testing.assert_array_equal(np.array(old_kernel_var[...]), old_kernel)
  assert model.items[0].bias is w.wrapped.bias
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  with pytest.raises(ValueError, match='no nnx.LoRAParam'):
    surgery.lora_state(model)
  with pytest.raises(ValueError, match='matched no layer'):
    surgery.merge_lora(model)


def test_merge_lora_bfloat16_cast_once():
  lin = nnx.Linear(8, 8, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  model = nnx.Sequential(lin)
  surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(1), **A)
  _randomize_lora(model)
  w = model.layers[0]
  expected = (
      _np(lin.kernel[...]) + _np(w.lora.a[...]) @ _np(w.lora.b[...])
  ).astype(jnp.bfloat16)
  surgery.merge_lora(model)
  assert model.layers[0].kernel[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      _np(model.layers[0].kernel[...]), _np(expected)
  )


def test_merge_lora_refuses_tied_kernels_unless_allowed():
  class Tied(nnx.Module):

    def __init__(self, rngs):
      self.enc = nnx.Linear(4, 4, rngs=rngs, **K)
      self.dec = nnx.Linear(4, 4, rngs=rngs, **K)
      self.dec.kernel = self.enc.kernel  # tied weights

  model = Tied(nnx.Rngs(0))
  tied = model.enc.kernel
  kernel0 = np.array(tied[...])
  surgery.apply_lora(model, rank=2, where='enc', rngs=nnx.Rngs(1), **A)
  _randomize_lora(model)
  with pytest.raises(ValueError, match=r"shared.*dec.*allow_shared=True"):
    surgery.merge_lora(model)
  assert type(model.enc).__name__ == 'LoRALinear'  # unchanged on error
  x = jnp.ones((2, 4))
  enc_before = model.enc(x)
  surgery.merge_lora(model, allow_shared=True)
  np.testing.assert_allclose(_np(model.enc(x)), _np(enc_before), atol=1e-5)
  assert model.dec.kernel is tied  # untied: dec keeps the original
  np.testing.assert_array_equal(np.array(model.dec.kernel[...]), kernel0)
  assert model.enc.kernel is not tied


def test_lora_state_and_summary_counts():
  model = MLP(nnx.Rngs(0))
  s0 = surgery.summary(model)
  base = 6 * 16 + 16 + 16 * 3 + 3
  assert (s0.total, s0.trainable, s0.frozen) == (base, 0, base)
  assert s0.total_bytes == 4 * base
  surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(1), **A)
  state = surgery.lora_state(model)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  assert len(leaves) == 4
  assert all(
      isinstance(v, nnx.LoRAParam)
      for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  )
  s = surgery.summary(model)
  lora_n = 6 * 2 + 2 * 16 + 16 * 2 + 2 * 3
  assert (s.total, s.trainable, s.frozen) == (base + lora_n, lora_n, base)
  assert s.trainable_bytes == 4 * lora_n
  assert s.layers == {'LoRALinear(Linear)': 2}
  assert s.other == 2  # the two LoRA scales
  text = str(s)
  assert 'trainable' in text and f'{lora_n:,}' in text
  assert surgery.param_counts(model) == s


def test_summary_counts_non_parameter_variables_separately():
  class WithState(nnx.Module):

    def __init__(self, rngs):
      self.rngs = rngs
      self.bn = nnx.BatchNorm(4, rngs=rngs)
      self.lin = nnx.Linear(4, 4, rngs=rngs, **K)

  s = surgery.summary(WithState(nnx.Rngs(0, dropout=1)))
  # Params: BatchNorm scale + bias (8), Linear kernel + bias (20).
  assert (s.total, s.trainable, s.frozen, s.total_bytes) == (28, 0, 28, 112)
  assert s.other >= 8  # batch mean / var, RNG keys and counts
  assert s.layers == {'Linear': 1}
  with pytest.raises(ValueError, match='no supported layer'):
    surgery.quantize(nnx.Sequential(nnx.relu), method='int4')
  with pytest.raises(ValueError, match='bogus'):
    surgery.quantize(WithState(nnx.Rngs(0)), method='bogus')


# ---------------------------------------------------------------------------
# Fast construction of many identical wrappers
# ---------------------------------------------------------------------------


def _stacked_linear(rngs):

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return nnx.Linear(4, 6, rngs=rngs, **K)

  return create(rngs)


@pytest.mark.parametrize(
    'make, wrapper, x_shape, fan_in',
    [
        (lambda r: nnx.Linear(4, 6, rngs=r, **K), 'LoRALinear', (2, 4), 4),
        (
            lambda r: nnx.Einsum('btd,dhk->bthk', (4, 2, 3), rngs=r, **K),
            'LoRAEinsum', (1, 2, 4), 4,
        ),
        (
            lambda r: nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=r, **K),
            'LoRALinearGeneral', (5, 2, 3), 6,
        ),
        (_stacked_linear, 'LoRALinear', None, 4),
    ],
    ids=['linear', 'einsum', 'linear_general', 'stacked'],
)
def test_group_construction_matches_one_by_one(make, wrapper, x_shape, fan_in):
  from peft.nnx import lora as lora_lib

  cls = getattr(lora_lib, wrapper)
  first = make(nnx.Rngs(0))
  layers = [first] + [nnx.clone(first) for _ in range(5)]
  group = [(l, nnx.split(l)[1]) for l in layers]
  built = surgery._build_group_fast(cls, group, 2, 4.0, nnx.Rngs(0), {})
  assert built is not None  # the fast path was taken
  ref = cls(layers[0], rank=2, alpha=4.0, rngs=nnx.Rngs(0))
  a_values = set()
  for w, layer in zip(built, layers):
    assert type(w) is cls and w.wrapped is layer
    assert w.wrapped.kernel is layer.kernel
    assert nnx.graphdef(w) == nnx.graphdef(ref)
    assert w.lora.a.shape == ref.lora.a.shape
    np.testing.assert_array_equal(_np(w.lora.b[...]), 0.0)
    np.testing.assert_array_equal(_np(w.lora.scale[...]), 2.0)
    a = _np(w.lora.a[...])
    # he_uniform over the contracted size of one layer: |a| <= sqrt(6 / fan).
    assert np.abs(a).max() <= np.sqrt(6.0 / fan_in) + 1e-6
    a_values.add(a.tobytes())
    if x_shape is not None:
      x = _x(*x_shape)
      np.testing.assert_array_equal(_np(w(x)), _np(layer(x)))
  assert len(a_values) == len(layers)  # independent initialisations
  # Distinct Variables per wrapper (nothing shared between adapters).
  assert built[1].lora.a is not built[2].lora.a
  assert built[1].lora.scale is not built[2].lora.scale


def test_apply_lora_many_identical_layers():
  model = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(i), **K) for i in range(70)])
  model.append(model[3])  # shared
  originals = list(model)
  surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(1), expected_count=70)
  assert all(type(w).__name__ == 'LoRALinear' for w in model)
  assert [w.wrapped for w in model] == originals
  assert model[70] is model[3]
  _randomize_lora(model)
  x = _x(2, 4)
  w = model[65]
  expected = _np(x) @ (
      _np(w.wrapped.kernel[...]) + _np(w.lora.a[...]) @ _np(w.lora.b[...])
  ) + _np(w.wrapped.bias[...])
  np.testing.assert_allclose(_np(w(x)), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Stacked layers (nnx.vmap) under nnx.scan
# ---------------------------------------------------------------------------

N_STACK = 3


class Block(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(4, 8, rngs=rngs, **K)
    self.down = nnx.Linear(8, 4, rngs=rngs, **K)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.up(x)))


class Stack(nnx.Module):

  def __init__(self, rngs):

    @nnx.split_rngs(splits=N_STACK)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.blocks = create(rngs)

  def __call__(self, x):

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.blocks)


def _stack_reference(params, x):
  """Dense per-layer loop from raw arrays: kernel + scale * a @ b."""
  x = _np(x)
  for i in range(N_STACK):
    h = x
    outs = {}
    for name in ('up', 'down'):
      p = params[name]
      k = p['kernel'][i] + p['scale'][i] * p['a'][i] @ p['b'][i]
      outs[name] = k, p['bias'][i]
    k, bias = outs['up']
    h = np.maximum(h @ k + bias, 0)
    k, bias = outs['down']
    x = x + h @ k + bias
  return x


def test_stacked_vmap_scan_forward_and_backward():
  model = Stack(nnx.Rngs(0))
  assert model.blocks.up.kernel.shape == (N_STACK, 4, 8)
  surgery.apply_lora(
      model, rank=2, alpha=4.0, rngs=nnx.Rngs(1), expected_count=2, **A
  )
  up = model.blocks.up
  assert up.lora.a.shape == (N_STACK, 4, 2)
  assert up.lora.b.shape == (N_STACK, 2, 8)
  _randomize_lora(model)
  x = _x(2, 4)
  params = {
      n: {
          'kernel': _np(getattr(model.blocks, n).wrapped.kernel[...]),
          'bias': _np(getattr(model.blocks, n).wrapped.bias[...]),
          'a': _np(getattr(model.blocks, n).lora.a[...]),
          'b': _np(getattr(model.blocks, n).lora.b[...]),
          'scale': np.broadcast_to(
              _np(getattr(model.blocks, n).lora.scale[...]), (N_STACK,)
          ),
      }
      for n in ('up', 'down')
  }
  y = model(x)
  np.testing.assert_allclose(
      _np(y), _stack_reference(params, x), rtol=1e-5, atol=1e-5
  )
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  grads = jax.jit(
      jax.grad(lambda l: jnp.sum(nnx.merge(gdef, l, rest, copy=True)(x) ** 2))
  )(lora)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(_np(g)))
  assert float(jnp.abs(grads['blocks']['up']['lora']['b'][...]).sum()) > 0
  # Merge works on stacked kernels too.
  surgery.merge_lora(model)
  assert type(model.blocks.up) is nnx.Linear
  np.testing.assert_allclose(_np(model(x)), _np(y), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# A small real transformer
# ---------------------------------------------------------------------------

D, H, DH, VOCAB = 16, 2, 8, 32


class Attention(nnx.Module):

  def __init__(self, rngs):
    self.q_proj = nnx.Einsum('btd,dhk->bthk', (D, H, DH), rngs=rngs, **K)
    self.k_proj = nnx.Einsum('btd,dhk->bthk', (D, H, DH), rngs=rngs, **K)
    self.v_proj = nnx.LinearGeneral(D, (H, DH), rngs=rngs, **K)
    self.o_proj = nnx.LinearGeneral((H, DH), D, axis=(-2, -1), rngs=rngs, **K)

  def __call__(self, x):
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    logits = jnp.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(DH)
    t = x.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, -1e9)
    probs = jax.nn.softmax(logits, axis=-1)
    return self.o_proj(jnp.einsum('bhqs,bshk->bqhk', probs, v))


class TransformerLayer(nnx.Module):

  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(D, rngs=rngs)
    self.attn = Attention(rngs)
    self.ln2 = nnx.LayerNorm(D, rngs=rngs)
    self.mlp = nnx.Dict(
        up=nnx.Linear(D, 4 * D, rngs=rngs, **K), down=nnx.Linear(4 * D, D, rngs=rngs, **K)
    )

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    h = nnx.gelu(self.mlp['up'](self.ln2(x)))
    return x + self.mlp['down'](h)


class Transformer(nnx.Module):

  def __init__(self, n_layers, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs, embedding_init=_init)
    self.layers = nnx.List([TransformerLayer(rngs) for _ in range(n_layers)])
    self.ln_f = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs, **K)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.head(self.ln_f(x))


def test_transformer_attention_only_lora():
  model = Transformer(2, nnx.Rngs(0))
  tokens = jnp.asarray(_RNG.integers(0, VOCAB, (2, 6)), jnp.int32)
  logits_before = model(tokens)
  attn = sorted(
      f'layers/{i}/attn/{p}_proj' for i in range(2) for p in 'qkvo'
  )
  assert surgery.apply_lora(model, rank=2, where=r'.*attn.*', dry_run=True) == attn
  surgery.apply_lora(
      model, rank=2, where=r'.*attn.*', rngs=nnx.Rngs(1), **A, expected_count=8
  )
  assert _lora_paths(model) == attn
  layer = model.layers[0]
  assert type(layer.attn.q_proj).__name__ == 'LoRAEinsum'
  assert type(layer.attn.v_proj).__name__ == 'LoRALinearGeneral'
  assert type(layer.attn.o_proj).__name__ == 'LoRALinearGeneral'
  assert type(layer.mlp['up']) is nnx.Linear and type(model.head) is nnx.Linear
  assert layer.attn.q_proj.lora.a.shape == (D, 2)
  assert layer.attn.q_proj.lora.b.shape == (2, H, DH)
  np.testing.assert_array_equal(_np(model(tokens)), _np(logits_before))
  # Type selectors pick the other layers.
  assert surgery.apply_lora(model, rank=2, where=nnx.Linear, dry_run=True) == [
      'head', 'layers/0/mlp/down', 'layers/0/mlp/up', 'layers/1/mlp/down',
      'layers/1/mlp/up',
  ]
  # A container type selects the layers inside it.
  assert [p for p, _ in surgery.select(model, where=Attention)] == attn
  with pytest.raises(ValueError, match='already have a LoRA adapter'):
    surgery.apply_lora(model, rank=2, where=Attention, dry_run=True)
  # Adapted attention: independent check of one projection's delta.
  _randomize_lora(model)
  q = model.layers[1].attn.q_proj
  xin = _x(1, 3, D)
  a, b = _np(q.lora.a[...]), _np(q.lora.b[...])
  kernel = _np(q.wrapped.kernel[...]) + float(q.lora.scale[...]) * np.einsum(
      'dr,rhk->dhk', a, b
  )
  assert q.wrapped.bias is None  # nnx.Einsum without bias_shape
  expected = np.einsum('btd,dhk->bthk', _np(xin), kernel)
  np.testing.assert_allclose(_np(q(xin)), expected, rtol=1e-5, atol=1e-5)
  logits = model(tokens)
  surgery.merge_lora(model)
  np.testing.assert_allclose(
      _np(model(tokens)), _np(logits), rtol=1e-5, atol=1e-5
  )


# ---------------------------------------------------------------------------
# Quantization surgery and QLoRA (needs peft.nnx.quantized)
# ---------------------------------------------------------------------------


def _quantized():
  return pytest.importorskip('peft.nnx.quantized')


class QMLP(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(32, 32, rngs=rngs, **K)
    self.down = nnx.Linear(32, 32, rngs=rngs, **K)
    self.attn = nnx.Dict(
        o=nnx.LinearGeneral((2, 32), 32, axis=(-2, -1), rngs=rngs, **K)
    )

  def __call__(self, x):
    h = self.down(nnx.relu(self.up(x)))
    return self.attn['o'](jnp.stack([h, x], axis=-2))


def test_quantize_then_lora_is_qlora_and_merge_needs_dequantize():
  q = _quantized()
  model = QMLP(nnx.Rngs(0))
  x = _x(4, 32)
  # Reference: simulated int4 of each float layer.
  kernels = {
      'up': _np(model.up.kernel[...]),
      'down': _np(model.down.kernel[...]),
  }
  surgery.quantize(model, method='int4', expected_count=3)
  assert isinstance(model.up, q.Int4Linear)
  assert isinstance(model.attn['o'], q.Int4LinearGeneral)
  with pytest.raises(ValueError, match='already quantized'):
    surgery.quantize(model, method='int4')
  y_q = model(x)
  surgery.apply_lora(
      model, rank=4, rngs=nnx.Rngs(1), expected_count=3, **A
  )
  assert type(model.up).__name__ == 'LoRALinear'
  assert isinstance(model.up.wrapped, q.Int4Linear)
  np.testing.assert_array_equal(_np(model(x)), _np(y_q))
  _randomize_lora(model)
  # QLoRA up-projection vs an independent dense computation.
  from peft import quantization as qz

  up = model.up
  k_int4 = _np(qz.simulate_quantize(jnp.asarray(kernels['up']), 'int4'))
  expected = _np(x) @ (
      k_int4 + float(up.lora.scale[...]) * _np(up.lora.a[...]) @ _np(up.lora.b[...])
  ) + _np(up.wrapped.bias[...])
  np.testing.assert_allclose(_np(up(x)), expected, rtol=1e-4, atol=1e-4)
  # Training only touches LoRA params; the int4 weights are not Params.
  assert all(
      l.dtype != jnp.int4 for l in jax.tree.leaves(nnx.state(model, nnx.Param))
  )
  s = surgery.summary(model)
  assert s.layers == {
      'LoRALinear(Int4Linear)': 2, 'LoRALinearGeneral(Int4LinearGeneral)': 1
  }
  # int4 storage counted at 0.5 byte/value (+ float32 scales per channel).
  int4_bytes = (32 * 32 + 32 * 32 + 64 * 32) // 2 + 4 * (32 + 32 + 32)
  bias_bytes = 4 * (32 + 32 + 32)
  assert s.frozen_bytes == int4_bytes + bias_bytes
  assert s.frozen == 4096 + 96
  assert s.frozen_bytes - bias_bytes == sum(
      m.wrapped.nbytes for m in (model.up, model.down, model.attn['o'])
  )
  y = model(x)
  with pytest.raises(ValueError, match='dequantize=True'):
    surgery.merge_lora(model)
  surgery.merge_lora(model, dequantize=True)
  assert type(model.up) is nnx.Linear
  np.testing.assert_allclose(_np(model(x)), _np(y), rtol=1e-5, atol=1e-5)


def test_quantize_lora_wrapped_model_keeps_adapter():
  q = _quantized()
  model = QMLP(nnx.Rngs(0))
  surgery.apply_lora(model, rank=2, where='up|down', rngs=nnx.Rngs(1), **A)
  _randomize_lora(model)
  wrapper, adapter = model.up, model.up.lora
  a_before = np.array(adapter.a[...])
  surgery.simulate_quantization(model, method='int4', where=nnx.Linear)
  assert model.up is wrapper and model.up.lora is adapter
  assert isinstance(model.up.wrapped, q.SimulateQuantizedLinear)
  assert type(model.attn['o']) is nnx.LinearGeneral
  x = _x(3, 32)
  y_sim = model(x)
  # Simulated -> real int4: same function (within 1e-5), adapter kept.
  surgery.quantize(model, method='int4', where='up|down', expected_count=2)
  assert model.up is wrapper and model.up.lora is adapter
  assert isinstance(model.up.wrapped, q.Int4Linear)
  np.testing.assert_array_equal(np.array(model.up.lora.a[...]), a_before)
  np.testing.assert_allclose(_np(model(x)), _np(y_sim), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='already quantized'):
    surgery.simulate_quantization(model, method='int4', where='up|down')


def test_merge_into_simulated_base_uses_fake_quantized_kernel():
  _quantized()
  model = QMLP(nnx.Rngs(0))
  surgery.simulate_quantization(model, method='int8')
  surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(1), **A)
  _randomize_lora(model)
  x = _x(3, 32)
  y = model(x)
  with pytest.raises(ValueError, match='quantized'):
    surgery.merge_lora(model, where='up')
  surgery.merge_lora(model, dequantize=True)
  assert type(model.down) is nnx.Linear
  np.testing.assert_allclose(_np(model(x)), _np(y), rtol=1e-5, atol=1e-5)

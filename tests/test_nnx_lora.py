"""Tests for peft/nnx/lora.py against independent dense computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from peft.nnx import lora as L

HI = jax.lax.Precision.HIGHEST


def _rand(seed, shape, dtype=jnp.float32):
  # numpy randoms: eager jax.random compiles a program per shape (slow).
  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(x, dtype)


def _np_init(key, shape, dtype=jnp.float32):
  """Initializer that ignores `key` (no per-shape compile of jax.random)."""
  del key
  seed = abs(hash(tuple(shape))) % 1000
  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(x / np.float32(np.sqrt(shape[0])), dtype)


def _kw(**kw):
  return dict(kernel_init=_np_init, bias_init=_np_init, **kw)


# Each case: name -> (layer factory, wrapper class, input shape,
#                     dense reference(x, kernel, bias, a, b, scale)).
# The references spell out the geometry by hand (einsum strings written here,
# not taken from peft.einsum).


def _lin_ref(x, k, bias, a, b, s):
  w = k + s * jnp.einsum('ir,ro->io', a, b, precision=HI)
  return jnp.einsum('ni,io->no', x, w, precision=HI) + bias


def _einsum_ref(es, delta_str):
  def ref(x, k, bias, a, b, s):
    w = k + s * jnp.einsum(delta_str, a, b, precision=HI)
    return jnp.einsum(es, x, w, precision=HI)
  return ref


def _lg_axes_ref(x, k, bias, a, b, s):
  w = k + s * jnp.einsum('ijr,rkl->ijkl', a, b, precision=HI)
  return jnp.einsum('nij,ijkl->nkl', x, w, precision=HI) + bias


def _lg_batch_ref(x, k, bias, a, b, s):
  # kernel (B, I, O); x (B, N, I) -> (B, N, O); bias (B, O)
  w = k + s * jnp.einsum('bir,bro->bio', a, b, precision=HI)
  return jnp.einsum('bni,bio->bno', x, w, precision=HI) + bias[:, None, :]


CASES = {
    'linear': (
        lambda r: nnx.Linear(6, 5, rngs=r, **_kw()), L.LoRALinear, (4, 6),
        _lin_ref),
    'einsum_bi_imn': (
        lambda r: nnx.Einsum('bi,imn->bmn', (6, 3, 4), rngs=r, **_kw()),
        L.LoRAEinsum, (5, 6),
        _einsum_ref('bi,imn->bmn', 'ir,rmn->imn')),
    'einsum_moe': (
        lambda r: nnx.Einsum('ebd,edf->ebf', (3, 6, 5), rngs=r, **_kw()),
        L.LoRAEinsum, (3, 4, 6),
        _einsum_ref('ebd,edf->ebf', 'edr,erf->edf')),
    'einsum_ellipsis': (
        lambda r: nnx.Einsum('...d,dhk->...hk', (6, 2, 3), rngs=r, **_kw()),
        L.LoRAEinsum, (2, 3, 6),
        _einsum_ref('...d,dhk->...hk', 'dr,rhk->dhk')),
    'linear_general_axes': (
        lambda r: nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), rngs=r,
                                    **_kw()),
        L.LoRALinearGeneral, (3, 2, 3), _lg_axes_ref),
    'linear_general_batch': (
        lambda r: nnx.LinearGeneral(3, 4, axis=-1, batch_axis={0: 2},
                                    rngs=r, **_kw()),
        L.LoRALinearGeneral, (2, 5, 3), _lg_batch_ref),
}


def _kernel_bias(layer):
  k = layer.kernel[...]
  bias = layer.bias[...] if layer.bias is not None else 0.0
  return k, bias


def _build(name, rank=3, alpha=None, **kw):
  make, cls, xshape, ref = CASES[name]
  base = make(nnx.Rngs(0))
  kw.setdefault('a_init', _np_init)
  model = cls(base, rank=rank, alpha=alpha, rngs=nnx.Rngs(1), **kw)
  # b is zero after init: give it values so the LoRA branch matters.
  model.lora.b[...] = 0.3 * _rand(7, model.lora.b.shape)
  x = _rand(3, xshape)
  return model, x, ref


@pytest.mark.parametrize('name', sorted(CASES))
def test_output_adapter_and_delta_match_dense_reference(name):
  model, x, ref = _build(name, alpha=6.0)
  k, bias = _kernel_bias(model.wrapped)
  a, b = model.lora.a[...], model.lora.b[...]
  s = 6.0 / 3
  expected = ref(x, k, bias, a, b, s)
  np.testing.assert_allclose(model(x), expected, rtol=2e-5, atol=2e-5)
  # The adapter alone: the reference with a zero kernel and bias.
  only = ref(x, jnp.zeros_like(k), 0.0 * bias, a, b, s)
  np.testing.assert_allclose(model.lora(x), only, rtol=2e-5, atol=2e-5)
  # delta() is shaped like the kernel and equals scale * (a @ b) there.
  delta = model.delta()
  assert delta.shape == k.shape and delta.dtype == jnp.float32
  via_delta = ref(x, k + delta, bias, a, b, 0.0)
  np.testing.assert_allclose(via_delta, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('name', sorted(CASES))
def test_gradients_match_reference(name):
  model, x, ref = _build(name, alpha=2.0)
  k, bias = _kernel_bias(model.wrapped)
  s = 2.0 / 3
  w = _rand(11, model(x).shape)
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(lora):
    m = nnx.merge(gdef, lora, rest)
    return jnp.sum(m(x) * w)

  g = jax.grad(loss)(lora)

  def ref_loss(a, b):
    return jnp.sum(ref(x, k, bias, a, b, s) * w)

  ga, gb = jax.grad(ref_loss, argnums=(0, 1))(model.lora.a[...],
                                              model.lora.b[...])
  np.testing.assert_allclose(g['lora']['a'][...], ga, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g['lora']['b'][...], gb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', sorted(CASES))
def test_fresh_wrapper_changes_nothing(name):
  make, cls, xshape, _ = CASES[name]
  base = make(nnx.Rngs(0))
  x = _rand(3, xshape)
  before = base(x)
  model = cls(base, rank=2, rngs=nnx.Rngs(5))
  assert model.wrapped is base
  np.testing.assert_array_equal(model(x), before)
  assert not np.all(np.asarray(model.lora.a[...]) == 0)
  np.testing.assert_array_equal(model.lora.b[...], 0)


def test_a_init_is_kaiming_uniform_like():
  # fan_in = product of the contracted sizes of one slice: here 2*3 = 6.
  base = nnx.LinearGeneral((2, 3), 40, axis=(-2, -1), rngs=nnx.Rngs(0))
  model = L.LoRALinearGeneral(base, rank=64, rngs=nnx.Rngs(1))
  a = np.asarray(model.lora.a[...])
  bound = math.sqrt(6.0 / 6)  # he_uniform: sqrt(2 * 3 / fan_in)
  assert a.shape == (2, 3, 64)
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.8 * bound
  # Custom initializers.
  model = L.LoRALinear(nnx.Linear(4, 5, rngs=nnx.Rngs(0), **_kw()), rank=2,
                       a_init=nnx.initializers.ones,
                       b_init=nnx.initializers.ones, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(model.lora.a[...], np.ones((4, 2)))
  np.testing.assert_array_equal(model.lora.b[...], np.ones((2, 5)))


def test_scale_values_and_rslora():
  base = nnx.Linear(4, 5, rngs=nnx.Rngs(0), **_kw())
  cases = [({}, 1.0), ({'alpha': 8.0}, 2.0),
           ({'alpha': 8.0, 'use_rslora': True}, 4.0)]
  for kw, expected in cases:
    m = L.LoRALinear(base, rank=4, a_init=_np_init, rngs=nnx.Rngs(1), **kw)
    assert isinstance(m.lora.scale, L.LoRAScale)
    assert m.lora.scale[...].dtype == jnp.float32
    assert float(m.lora.scale[...]) == expected
  # rslora reference output
  m = L.LoRALinear(base, rank=4, alpha=8.0, use_rslora=True,
                   a_init=_np_init, rngs=nnx.Rngs(1))
  m.lora.b[...] = _rand(2, (4, 5))
  x = _rand(3, (2, 4))
  exp = _lin_ref(x, base.kernel[...], base.bias[...], m.lora.a[...],
                 m.lora.b[...], 8.0 / math.sqrt(4))
  np.testing.assert_allclose(m(x), exp, rtol=2e-5, atol=2e-5)


def test_scale_is_data_no_retrace():
  model, x, _ = _build('linear')
  gdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def f(state, x):
    traces.append(1)
    return nnx.merge(gdef, state)(x)

  y1 = f(state, x)
  model.lora.scale[...] = 0.0
  _, state2 = nnx.split(model)
  y2 = f(state2, x)
  assert len(traces) == 1
  np.testing.assert_allclose(y2, model.wrapped(x), rtol=1e-6, atol=1e-6)
  assert not np.allclose(y1, y2)


def test_jit_split_state_matches_eager():
  for name in ('linear', 'einsum_moe', 'linear_general_axes'):
    model, x, _ = _build(name)
    gdef, state = nnx.split(model)
    f = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))
    np.testing.assert_allclose(f(state, x), model(x), rtol=1e-6, atol=1e-6)


def test_optimizer_trains_only_lora():
  base = nnx.Linear(8, 4, rngs=nnx.Rngs(0), **_kw())
  model = L.LoRALinear(base, rank=2, alpha=2.0, a_init=_np_init,
                       rngs=nnx.Rngs(1))
  kernel0 = np.asarray(base.kernel[...]).copy()
  bias0 = np.asarray(base.bias[...]).copy()
  x = _rand(1, (16, 8))
  target = _rand(2, (16, 4))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss_fn(lora):
    m = nnx.merge(gdef, lora, rest)
    return jnp.mean((m(x) - target) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  losses = []
  for _ in range(30):
    _, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    loss, g = value_and_grad(lora)
    opt.update(model, g)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0]
  np.testing.assert_array_equal(base.kernel[...], kernel0)
  np.testing.assert_array_equal(base.bias[...], bias0)
  assert float(model.lora.scale[...]) == 1.0


def test_bf16_model_stays_bf16():
  base = nnx.Linear(8, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **_kw())
  model = L.LoRALinear(base, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  assert model.lora.a.dtype == jnp.bfloat16
  assert model.lora.b.dtype == jnp.bfloat16
  x = _rand(1, (3, 8), jnp.bfloat16)
  y = model(x)
  assert y.dtype == jnp.bfloat16
  # compute dtype follows the wrapped layer's dtype attribute
  base32 = nnx.Linear(8, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **_kw())
  m2 = L.LoRALinear(base32, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  assert m2.lora.a.dtype == jnp.float32
  assert m2.lora.dtype == jnp.bfloat16
  assert m2.lora(_rand(1, (3, 8))).dtype == jnp.bfloat16
  # explicit param dtype
  m3 = L.LoRALinear(base, rank=2, param_dtype=jnp.float32, a_init=_np_init,
                    rngs=nnx.Rngs(1))
  assert m3.lora.a.dtype == jnp.float32
  assert model(x).dtype == jnp.bfloat16


def test_vmap_stack_scan_forward_and_backward():
  n_layers, d = 3, 4

  @nnx.split_rngs(splits=n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return nnx.Linear(d, d, rngs=rngs)

  stack = make(nnx.Rngs(0))
  assert stack.kernel.shape == (n_layers, d, d) and stack.in_features == d
  model = L.LoRALinear(stack, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  assert model.lora.a.shape == (n_layers, d, 2)
  assert model.lora.b.shape == (n_layers, 2, d)
  assert model.lora.leading_shape == (n_layers,)
  model.lora.b[...] = _rand(4, model.lora.b.shape)
  assert model.delta().shape == (n_layers, d, d)
  x = _rand(5, (2, d))

  def run(model, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, layer):
      return jnp.tanh(layer(h))
    return body(x, model)

  k, bias = stack.kernel[...], stack.bias[...]

  def ref(a, b):
    h = x
    for i in range(n_layers):
      h = jnp.tanh(_lin_ref(h, k[i], bias[i], a[i], b[i], 2.0))
    return h

  a0, b0 = model.lora.a[...], model.lora.b[...]
  np.testing.assert_allclose(run(model, x), ref(a0, b0), rtol=1e-5,
                             atol=1e-5)
  gdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(lora, rest):
    # copy=True: nnx.scan refuses Variables created outside the grad trace
    # (rest is closed over by jax.grad, not traced).
    return jnp.sum(run(nnx.merge(gdef, lora, rest, copy=True), x) ** 2)

  g = jax.grad(loss)(lora, rest)
  ga, gb = jax.grad(lambda a, b: jnp.sum(ref(a, b) ** 2), (0, 1))(a0, b0)
  np.testing.assert_allclose(g['lora']['a'][...], ga, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g['lora']['b'][...], gb, rtol=1e-4, atol=1e-5)
  # Calling the stacked layer directly is a clear error.
  with pytest.raises(ValueError, match='nnx.scan'):
    model.lora(x)
  with pytest.raises(ValueError, match='dropout'):
    L.LoRALinear(stack, rank=2, dropout=0.1, rngs=nnx.Rngs(1))


def test_vmap_stacked_einsum_delta():
  @nnx.split_rngs(splits=2)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return nnx.Einsum('ebd,edf->ebf', (3, 4, 5), rngs=rngs, **_kw())

  model = L.LoRAEinsum(make(nnx.Rngs(0)), rank=2, a_init=_np_init,
                       rngs=nnx.Rngs(1))
  model.lora.a[...] = _rand(2, model.lora.a.shape)
  assert model.lora.a.shape == (2, 3, 4, 2)
  assert model.lora.b.shape == (2, 3, 2, 5)
  model.lora.b[...] = _rand(1, model.lora.b.shape)
  exp = jnp.einsum('ledr,lerf->ledf', model.lora.a[...], model.lora.b[...],
                   precision=HI)
  np.testing.assert_allclose(model.delta(), exp, rtol=1e-5, atol=1e-6)


def _mesh(*names, axis_type=jax.sharding.AxisType.Explicit):
  names = names or ('data', 'model')
  return jax.make_mesh((1,) * len(names), names,
                       axis_types=(axis_type,) * len(names))


def _names(var):
  return var.get_metadata().get('out_sharding')


def test_sharding_names_and_partition_spec():
  mesh = _mesh('expert', 'data', 'model')
  P = jax.sharding.PartitionSpec
  init = _np_init
  with jax.set_mesh(mesh):
    lin = nnx.Linear(
        4, 6, rngs=nnx.Rngs(0),
        kernel_init=nnx.with_partitioning(init, ('data', 'model')))
    m = L.LoRALinear(lin, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
    moe = nnx.Einsum(
        'ebd,edf->ebf', (2, 4, 6), rngs=nnx.Rngs(0),
        kernel_init=nnx.with_partitioning(init, ('expert', 'data', 'model')))
    me = L.LoRAEinsum(moe, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
    lg = nnx.LinearGeneral(
        (2, 3), (4, 5), axis=(-2, -1), rngs=nnx.Rngs(0),
        kernel_init=nnx.with_partitioning(
            init, ('expert', 'data', None, 'model')))
    mg = L.LoRALinearGeneral(lg, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  assert _names(m.lora.a) == ('data', None)
  assert _names(m.lora.b) == (None, 'model')
  assert isinstance(m.lora.a[...].sharding, jax.sharding.NamedSharding)
  assert m.lora.a[...].sharding.spec == P('data', None)
  spec = nnx.get_partition_spec(nnx.state(m, nnx.LoRAParam))
  assert spec['lora']['a'].get_value() == P('data', None)
  assert spec['lora']['b'].get_value() == P(None, 'model')
  assert _names(me.lora.a) == ('expert', 'data', None)
  assert _names(me.lora.b) == ('expert', None, 'model')
  assert _names(mg.lora.a) == ('expert', 'data', None)
  assert _names(mg.lora.b) == (None, None, 'model')
  # Wrapping outside the mesh context still places on the kernel's mesh.
  m2 = L.LoRALinear(lin, rank=2, rngs=nnx.Rngs(2))
  assert m2.lora.b[...].sharding.spec == P(None, 'model')
  # No sharding on the kernel: no sharding metadata on a, b.
  plain = L.LoRALinear(nnx.Linear(4, 6, rngs=nnx.Rngs(0), **_kw()), rank=2,
                       a_init=_np_init, rngs=nnx.Rngs(1))
  assert not _names(plain.lora.a)


def test_sharding_names_stacked_layers():
  # Auto axes: with Explicit ones jax refuses to scan over an axis that is
  # sharded (here 'layers'), for the base kernel as much as for LoRA.
  mesh = _mesh('layers', 'data', 'model',
               axis_type=jax.sharding.AxisType.Auto)

  @nnx.split_rngs(splits=2)
  @nnx.vmap(in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(rngs):
    return nnx.Linear(4, 4, rngs=rngs, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ('data', 'model')))

  with jax.set_mesh(mesh):
    stack = make(nnx.Rngs(0))
    m = L.LoRALinear(stack, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  assert _names(m.lora.a) == ('layers', 'data', None)
  assert _names(m.lora.b) == ('layers', None, 'model')
  m.lora.b[...] = _rand(0, m.lora.b.shape)
  x = _rand(1, (3, 4))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def body(h, layer):
    return layer(h)

  with jax.set_mesh(mesh):
    y = body(x, m)
  k, bias = stack.kernel[...], stack.bias[...]
  a, b = m.lora.a[...], m.lora.b[...]
  h = x
  for i in range(2):
    h = _lin_ref(h, k[i], bias[i], a[i], b[i], 1.0)
  np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['linear', 'einsum_moe',
                                  'linear_general_axes'])
def test_pissa_keeps_output_and_factors_kernel(name):
  make, cls, xshape, _ = CASES[name]
  base = make(nnx.Rngs(0))
  x = _rand(3, xshape)
  before = base(x)
  k0 = np.asarray(base.kernel[...]).copy()
  m = cls(base, rank=2, alpha=4.0, init='pissa', rngs=nnx.Rngs(1))
  np.testing.assert_allclose(m(x), before, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(base.kernel[...]) + m.delta(), k0,
                             rtol=1e-5, atol=1e-5)
  # The residual has lost the top singular direction: Linear check by SVD.
  if name == 'linear':
    s0 = np.linalg.svd(k0, compute_uv=False)
    s1 = np.linalg.svd(np.asarray(base.kernel[...]), compute_uv=False)
    np.testing.assert_allclose(s1[:2], s0[2:4], rtol=1e-4)


def test_dropout_on_adapter_input():
  base = nnx.Linear(8, 4, rngs=nnx.Rngs(0), **_kw())
  m = L.LoRALinear(base, rank=2, dropout=0.5, a_init=_np_init, rngs=nnx.Rngs(1))
  m.lora.b[...] = _rand(0, (2, 4))
  x = _rand(1, (16, 8))
  y1, y2 = m(x), m(x)
  assert not np.allclose(y1, y2)
  m.eval()
  exp = _lin_ref(x, base.kernel[...], base.bias[...], m.lora.a[...],
                 m.lora.b[...], 1.0)
  np.testing.assert_allclose(m(x), exp, rtol=2e-5, atol=2e-5)


class _CustomLinear(nnx.Module):
  """A layer of the user's own: kernel `q`, no bias, registered below."""

  def __init__(self, kernel):
    self.q = nnx.Param(kernel)

  def __call__(self, x):
    return x @ self.q[...]


def test_registered_custom_layer():
  from peft.geometry import Geometry
  from peft.nnx import registry
  registry.register_layer(
      _CustomLinear, geometry=lambda m: Geometry.linear(
          *m.q.shape[-2:], use_bias=False), kernel='q', bias=None)
  k = _rand(0, (6, 5))
  m = L.LoRA(_CustomLinear(k), rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  assert m.lora.a.shape == (6, 2) and m.lora.a.dtype == jnp.float32
  m.lora.b[...] = _rand(1, (2, 5))
  x = _rand(2, (3, 6))
  exp = _lin_ref(x, k, 0.0, m.lora.a[...], m.lora.b[...], 1.0)
  np.testing.assert_allclose(m(x), exp, rtol=2e-5, atol=2e-5)
  with pytest.raises(TypeError, match='use peft.nnx.LoRA instead'):
    L.LoRALinear(_CustomLinear(k), rank=2, rngs=nnx.Rngs(1))


@pytest.mark.parametrize('rank,error', [
    (0, ValueError), (-1, ValueError),
    (1.5, TypeError), (True, TypeError), (None, TypeError)])
def test_bad_rank(rank, error):
  base = nnx.Linear(4, 5, rngs=nnx.Rngs(0), **_kw())
  with pytest.raises(error, match='rank'):
    L.LoRALinear(base, rank=rank, rngs=nnx.Rngs(1))
  with pytest.raises(error, match='rank'):
    L.LoRAEinsumAdapter('bi,io->bo', (4, 5), rank=rank, rngs=nnx.Rngs(1))


def test_wrong_wrapped_type():
  lin = nnx.Linear(4, 5, rngs=nnx.Rngs(0), **_kw())
  ein = nnx.Einsum('bi,io->bo', (4, 5), rngs=nnx.Rngs(0), **_kw())
  lg = nnx.LinearGeneral(4, 5, rngs=nnx.Rngs(0), **_kw())
  with pytest.raises(TypeError, match='LoRAEinsum instead'):
    L.LoRALinear(ein, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match='LoRALinearGeneral instead'):
    L.LoRAEinsum(lg, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match='LoRALinear instead'):
    L.LoRALinearGeneral(lin, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match='Conv'):
    L.LoRALinear(nnx.Conv(2, 3, (3,), rngs=nnx.Rngs(0)), rank=2,
                 a_init=_np_init, rngs=nnx.Rngs(1))
  inner = L.LoRALinear(lin, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match='LoRALinear'):
    L.LoRALinear(inner, rank=2, rngs=nnx.Rngs(1))


@pytest.mark.parametrize('es,shape', [
    ('bi,ij,jk->bk', (4, 5)),     # three operands
    ('bi,i->b', (4,)),            # no output axis on the weights
    ('bi,io->bi', (4, 5)),        # weight axis o goes nowhere / nothing out
    ('bi,...io->bo', (4, 5)),     # ellipsis in weights
])
def test_rejected_einsum_strings(es, shape):
  with pytest.raises(ValueError, match='einsum_str'):
    L.LoRAEinsumAdapter(es, shape, rank=2, rngs=nnx.Rngs(0))


def test_rejected_einsum_on_wrapper():
  ein = nnx.Einsum('bi,ij->b', (4, 5), rngs=nnx.Rngs(0), **_kw())
  with pytest.raises(ValueError, match='einsum_str'):
    L.LoRAEinsum(ein, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))


def test_other_bad_arguments():
  base = nnx.Linear(4, 5, rngs=nnx.Rngs(0), **_kw())
  with pytest.raises(ValueError, match='init'):
    L.LoRALinear(base, rank=2, init='svd', a_init=_np_init, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match='dropout'):
    L.LoRALinear(base, rank=2, dropout=1.0, a_init=_np_init, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match='alpha'):
    L.LoRALinear(base, rank=2, alpha='big', a_init=_np_init, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match='pissa'):
    L.LoRALinear(base, rank=5, init='pissa', a_init=_np_init, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match='axis'):
    L.LoRALinearGeneralAdapter((2, 3), 4, axis=-1, rank=2, rngs=nnx.Rngs(0))


def test_einsum_without_string_needs_einsum_str():
  ein = nnx.Einsum('bi,io->bo', (4, 5), rngs=nnx.Rngs(0), **_kw())
  ein.einsum_str = None
  with pytest.raises(ValueError, match='einsum_str'):
    L.LoRAEinsum(ein, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  m = L.LoRAEinsum(ein, rank=2, einsum_str='bi,io->bo', a_init=_np_init,
                   rngs=nnx.Rngs(1))
  x = _rand(0, (3, 4))
  np.testing.assert_allclose(m(x, 'bi,io->bo'), ein(x, 'bi,io->bo'))


def test_inputs_not_mutated():
  base = nnx.Linear(4, 5, rngs=nnx.Rngs(0), **_kw())
  before = jax.tree.map(np.asarray, nnx.state(base))
  L.LoRALinear(base, rank=2, alpha=2.0, a_init=_np_init, rngs=nnx.Rngs(1))
  after = jax.tree.map(np.asarray, nnx.state(base))
  jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize('kind', ['simulate', 'int4', 'q4_0'])
def test_quantized_base_qlora(kind):
  q = pytest.importorskip('peft.nnx.quantized')
  lin = nnx.Linear(32, 32, rngs=nnx.Rngs(0), **_kw())
  if kind == 'simulate':
    base = q.SimulateQuantizedLinear(lin, method='int4')
  else:
    base = q.Int4Linear.from_float(lin, method=kind)
  model = L.LoRALinear(base, rank=2, a_init=_np_init, rngs=nnx.Rngs(1))
  assert model.lora.a.shape == (32, 2) and model.lora.b.shape == (2, 32)
  assert model.lora.a.dtype == jnp.float32
  model.lora.b[...] = _rand(1, (2, 32))
  x = _rand(2, (4, 32))
  exp = base(x) + jnp.einsum('ni,ir,ro->no', x, model.lora.a[...],
                             model.lora.b[...], precision=HI)
  np.testing.assert_allclose(model(x), exp, rtol=2e-5, atol=2e-5)
  # QLoRA training: the loss falls, the base stays bit-identical.
  frozen = jax.tree.map(np.asarray, nnx.state(base))
  target = _rand(3, (4, 32))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  gdef, _, rest = nnx.split(model, nnx.LoRAParam, ...)

  @jax.jit
  def loss_fn(lora, rest):
    return jnp.mean((nnx.merge(gdef, lora, rest)(x) - target) ** 2)

  losses = []
  for _ in range(10):
    _, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    loss, g = jax.value_and_grad(loss_fn)(lora, rest)
    opt.update(model, g)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, frozen,
               jax.tree.map(np.asarray, nnx.state(base)))

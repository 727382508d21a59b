"""Tests for peft/nnx/quantized.py against independent dense computations.

References: the INT4/INT8 per-channel formula of DESIGN.md written in numpy
here, ggml's Q4_0 from the `gguf` package, and hand-written einsum strings.
"""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft import kernels
from peft.nnx import quantized as Q

HI = jax.lax.Precision.HIGHEST
METHODS = ['int4', 'int8', 'q4_0', 'q4_0_transpose']


def _rand(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, dtype)


# --- independent references -------------------------------------------------


def _ref_int(w, bits, reduce_axes):
  w = np.asarray(w, np.float32)
  amax = np.max(np.abs(w), axis=reduce_axes, keepdims=True)
  scale = np.float32(2 ** (bits - 1) - 1) / amax
  q = np.clip(np.round(w * scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
  return q / scale


def _ref_q4_0_last(w):
  w = np.ascontiguousarray(np.asarray(w, np.float32))
  t = gguf.GGMLQuantizationType.Q4_0
  return gguf.quants.dequantize(gguf.quants.quantize(w, t), t).reshape(w.shape)


def _ref_quant(w, method, reduce_axes):
  if method == 'int4':
    return _ref_int(w, 4, reduce_axes)
  if method == 'int8':
    return _ref_int(w, 8, reduce_axes)
  if method == 'q4_0':
    return _ref_q4_0_last(w)
  return np.swapaxes(_ref_q4_0_last(np.swapaxes(np.asarray(w), -1, -2)), -1, -2)


# Each case: (layer factory, input shape, reference(x, kernel, bias),
#             reduced kernel axes for the per-channel formula).
def _make_cases():
  r = nnx.Rngs
  return {
      'linear': (
          lambda: nnx.Linear(64, 96, rngs=r(0)), (3, 5, 64),
          lambda x, k, b: jnp.einsum('abi,io->abo', x, k, precision=HI) + b,
          (0,), Q.SimulateQuantizedLinear, Q.Int4Linear,
      ),
      'linear_nobias': (
          lambda: nnx.Linear(64, 32, use_bias=False, rngs=r(1)), (4, 64),
          lambda x, k, b: jnp.einsum('ai,io->ao', x, k, precision=HI),
          (0,), Q.SimulateQuantizedLinear, Q.Int4Linear,
      ),
      'linear_odd': (  # odd out_features: no int4 nibble pairing
          lambda: nnx.Linear(64, 33, rngs=r(9)), (4, 64),
          lambda x, k, b: jnp.einsum('ai,io->ao', x, k, precision=HI) + b,
          (0,), Q.SimulateQuantizedLinear, Q.Int4Linear,
      ),
      'einsum_heads': (
          lambda: nnx.Einsum('btd,dnh->btnh', (64, 2, 32), (2, 32), rngs=r(2)),
          (2, 3, 64),
          lambda x, k, b: jnp.einsum('btd,dnh->btnh', x, k, precision=HI) + b,
          (0,), Q.SimulateQuantizedEinsum, Q.Int4Einsum,
      ),
      'einsum_moe': (
          lambda: nnx.Einsum('ebd,edf->ebf', (2, 64, 32), (2, 1, 32), rngs=r(3)),
          (2, 5, 64),
          lambda x, k, b: jnp.einsum('ebd,edf->ebf', x, k, precision=HI) + b,
          (1,), Q.SimulateQuantizedEinsum, Q.Int4Einsum,
      ),
      'einsum_ellipsis_permuted_out': (
          lambda: nnx.Einsum('...d,df->f...', (64, 32), (32, 1), rngs=r(4)),
          (3, 4, 64),
          lambda x, k, b: jnp.einsum('ctd,df->fct', x, k, precision=HI)
          + b[:, :, None],
          (0,), Q.SimulateQuantizedEinsum, Q.Int4Einsum,
      ),
      'einsum_kernel_transposed': (  # reduced axis last: dequantize fallback
          lambda: nnx.Einsum('bd,fd->bf', (64, 64), (64,), rngs=r(5)),
          (3, 64),
          lambda x, k, b: jnp.einsum('bd,fd->bf', x, k, precision=HI) + b,
          (1,), Q.SimulateQuantizedEinsum, Q.Int4Einsum,
      ),
      'linear_general_out2': (
          lambda: nnx.LinearGeneral(64, (2, 32), rngs=r(6)), (3, 64),
          lambda x, k, b: jnp.einsum('ai,inh->anh', x, k, precision=HI) + b,
          (0,), Q.SimulateQuantizedLinearGeneral, Q.Int4LinearGeneral,
      ),
      'linear_general_axes': (
          lambda: nnx.LinearGeneral((2, 64), 32, axis=(1, -1), rngs=r(7)),
          (3, 2, 5, 64),
          lambda x, k, b: jnp.einsum('acbi,cio->abo', x, k, precision=HI) + b,
          (0, 1), Q.SimulateQuantizedLinearGeneral, Q.Int4LinearGeneral,
      ),
      'linear_general_batch': (
          lambda: nnx.LinearGeneral(
              64, 32, axis=-1, batch_axis={0: 2}, rngs=r(8)), (2, 3, 64),
          lambda x, k, b: jnp.einsum('eai,eio->eao', x, k, precision=HI)
          + b[:, None, :],
          (1,), Q.SimulateQuantizedLinearGeneral, Q.Int4LinearGeneral,
      ),
  }


CASES = _make_cases()


def _bias(layer):
  return layer.bias[...] if layer.bias is not None else 0.0


def _supports(method, kernel_shape):
  if method == 'q4_0':
    return kernel_shape[-1] % 32 == 0
  if method == 'q4_0_transpose':
    return len(kernel_shape) >= 2 and kernel_shape[-2] % 32 == 0
  return True


# INT8 shares INT4's code path except the nibble unpacking: a few cases do.
_INT8_CASES = ('linear', 'linear_odd', 'einsum_moe', 'linear_general_batch')


def _params(names=None, methods=METHODS):
  out = []
  for name in names or CASES:
    for m in methods:
      if m == 'int8' and name not in _INT8_CASES:
        continue
      out.append(pytest.param(name, m, id=f'{name}-{m}'))
  return out


def _jit_call(module, x):
  """`module(x)` through split state and `jax.jit` (one compile, fast)."""
  gdef, state = nnx.split(module)
  return jax.jit(lambda s, x: nnx.merge(gdef, s)(x))(state, x)


_TINY_CHUNK_CASES = ('linear', 'linear_odd', 'einsum_moe', 'linear_general_axes',
                     'einsum_ellipsis_permuted_out')


@pytest.mark.parametrize('name,method', _params())
def test_simulate_and_int4_match_reference(name, method, monkeypatch):
  make, xshape, ref, red, sim_cls, int_cls = CASES[name]
  layer = make()
  k = np.asarray(layer.kernel[...])
  if not _supports(method, k.shape):  # rejected when the layer is built
    with pytest.raises(ValueError, match='blocks of 32'):
      sim_cls(layer, method=method)
    with pytest.raises(ValueError, match='blocks of 32'):
      int_cls.from_float(layer, method=method)
    return
  x = _rand(10, xshape)
  kq = jnp.asarray(_ref_quant(k, method, red), jnp.float32)
  want = ref(x, kq, _bias(layer))
  sim = _jit_call(sim_cls(layer, method=method), x)
  np.testing.assert_allclose(sim, want, rtol=2e-5, atol=2e-5)
  q = int_cls.from_float(layer, method=method)
  np.testing.assert_allclose(_jit_call(q, x), sim, rtol=1e-5, atol=1e-5)
  if name in _TINY_CHUNK_CASES:  # many loop steps plus a tail chunk
    monkeypatch.setattr(kernels, '_CHUNK_ELEMENTS', 7 * 32 * 3)
    np.testing.assert_allclose(_jit_call(q, x), sim, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,method', _params(
    ['linear', 'einsum_moe', 'linear_general_axes'],
    ['int4', 'q4_0_transpose']))
def test_simulate_straight_through_gradient(name, method):
  make, xshape, ref, red, sim_cls, _ = CASES[name]
  layer = make()
  k = np.asarray(layer.kernel[...])
  if not _supports(method, k.shape):
    pytest.skip('Q4_0 block axis not a multiple of 32')
  x = _rand(11, xshape)
  ct = _rand(12, ref(x, k, _bias(layer)).shape)
  sim = sim_cls(layer, method=method)
  gdef, params, rest = nnx.split(sim, nnx.Param, ...)

  @jax.jit
  def grad(params):
    loss = lambda p: jnp.sum(nnx.merge(gdef, p, rest)(x) * ct)
    return jax.grad(loss)(params)

  got = grad(params)['wrapped']['kernel'][...]
  kq = jnp.asarray(_ref_quant(k, method, red), jnp.float32)
  # Straight-through: the gradient of the float layer evaluated at the
  # quantized kernel.
  want = jax.grad(lambda kk: jnp.sum(ref(x, kk, _bias(layer)) * ct))(kq)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int4_weights_are_not_params():
  layer = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  q = Q.Int4Linear.from_float(layer, method='q4_0')
  params = nnx.state(q, nnx.Param)
  leaves = jax.tree.leaves(params)
  assert len(leaves) == 1 and leaves[0].shape == (32,)  # only the bias
  qw = jax.tree.leaves(nnx.state(q, Q.QuantizedWeight))
  assert {a.dtype for a in qw} == {jnp.dtype(jnp.uint8), jnp.dtype(jnp.float16)}
  assert isinstance(q.weight, Q.QuantizedWeight)
  assert not isinstance(q.weight, nnx.Param)
  # The float layer is untouched and the bias is a copy, not the same var.
  assert q.bias is not layer.bias
  np.testing.assert_array_equal(q.bias[...], layer.bias[...])


@pytest.mark.parametrize('method,per_weight', [
    ('int4', 0.5), ('int8', 1.0), ('q4_0', 0.5625), ('q4_0_transpose', 0.5625)])
def test_nbytes(method, per_weight):
  k, n = 128, 96
  q = Q.Int4Linear.from_float(nnx.Linear(k, n, rngs=nnx.Rngs(0)),
                              method=method)
  scales = n * 4 if method in ('int4', 'int8') else 0
  assert q.nbytes == int(k * n * per_weight) + scales
  assert q.kernel_shape == (k, n)


@pytest.mark.parametrize('method', METHODS)
def test_jit_split_state(method):
  layer = nnx.Einsum('btd,dh->bth', (64, 64), (64,), rngs=nnx.Rngs(0))
  q = Q.Int4Einsum.from_float(layer, method=method)
  x = _rand(14, (2, 3, 64))
  gdef, state = nnx.split(q)

  @jax.jit
  def fwd(state, x):
    return nnx.merge(gdef, state)(x)

  np.testing.assert_allclose(fwd(state, x), q(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', ['linear', 'einsum_heads',
                                  'linear_general_batch'])
def test_to_float_round_trip(name):
  make, xshape, ref, red, sim_cls, int_cls = CASES[name]
  layer = make()
  q = int_cls.from_float(layer, method='int4')
  f = q.to_float()
  assert type(f) is type(layer)
  kq = _ref_quant(np.asarray(layer.kernel[...]), 'int4', red)
  np.testing.assert_allclose(f.kernel[...], kq, rtol=1e-6, atol=1e-7)
  x = _rand(15, xshape)
  np.testing.assert_allclose(f(x), sim_cls(layer, method='int4')(x),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(f.bias[...], layer.bias[...])
  # Quantizing the round-tripped layer again changes nothing.
  np.testing.assert_allclose(int_cls.from_float(f, method='int4')(x), q(x),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('method', METHODS)
def test_bf16(method):
  x = _rand(16, (4, 64))
  layer = nnx.Linear(64, 64, rngs=nnx.Rngs(0))  # f32 params, bf16 input
  q = Q.Int4Linear.from_float(layer, method=method)
  y = _jit_call(q, x.astype(jnp.bfloat16))
  want = _jit_call(Q.SimulateQuantizedLinear(layer, method=method),
                   x.astype(jnp.bfloat16))
  assert y.dtype == want.dtype == jnp.float32
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # A bf16 layer stays bf16.
  layer16 = nnx.Linear(64, 64, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(1))
  q16 = Q.Int4Linear.from_float(layer16, method=method)
  y16 = _jit_call(q16, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  kq = _ref_quant(np.asarray(layer16.kernel[...], np.float32), method, (0,))
  want16 = np.asarray(x, np.float32) @ kq + np.asarray(
      layer16.bias[...], np.float32)
  np.testing.assert_allclose(np.asarray(y16, np.float32), want16, rtol=3e-2,
                             atol=3e-2)


def test_stacked_vmap_layers():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(64, 32, rngs=nnx.Rngs(params=key))

  stacked = make(jax.random.split(jax.random.key(0), 3))
  assert stacked.kernel.shape == (3, 64, 32)
  x = _rand(17, (4, 64))
  for method in ['int4', 'q4_0_transpose']:
    q = Q.Int4Linear.from_float(stacked, method=method)
    assert q.kernel_shape == (3, 64, 32)

    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def fwd(m, x):
      return m(x)

    gdef, state = nnx.split(q)
    got = jax.jit(lambda s, x: fwd(nnx.merge(gdef, s), x))(state, x)
    k = np.asarray(stacked.kernel[...])
    for i in range(3):  # each layer quantized on its own
      kq = _ref_quant(k[i], method, (0,))
      want = np.asarray(x) @ kq + np.asarray(stacked.bias[...][i])
      np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=2e-5)
    assert q.to_float().kernel.shape == (3, 64, 32)
    with pytest.raises(ValueError, match='nnx.vmap'):
      q(x)


def test_geometry_attributes():
  from peft.geometry import Geometry
  lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  lg = nnx.LinearGeneral(64, (2, 32), rngs=nnx.Rngs(0))
  ein = nnx.Einsum('bd,dnh->bnh', (64, 2, 32), rngs=nnx.Rngs(0))
  for mod in (Q.SimulateQuantizedLinear(lin, method='int4'),
              Q.Int4Linear.from_float(lin)):
    assert mod.geometry == Geometry.linear(64, 32)
    assert isinstance(mod, (Q.SimulateQuantized, Q.QuantizedLayer))
    assert (mod.in_features, mod.out_features) == (64, 32)
    assert mod.kernel_shape == (64, 32)
  for mod in (Q.SimulateQuantizedLinearGeneral(lg, method='int4'),
              Q.Int4LinearGeneral.from_float(lg)):
    assert mod.geometry.contracted_axes == (0,)
    assert mod.geometry.output_axes == (1, 2)
    assert mod.out_features == (2, 32) and mod.axis == (-1,)
    assert mod.kernel_shape == (64, 2, 32)
  for mod in (Q.SimulateQuantizedEinsum(ein, method='int4'),
              Q.Int4Einsum.from_float(ein)):
    assert mod.geometry.einsum_str == 'bd,dnh->bnh'
    assert mod.param_dtype == jnp.float32 and mod.kernel_sharding is None
    assert mod.einsum_str == 'bd,dnh->bnh' and mod.kernel_shape == (64, 2, 32)
  # SimulateQuantized* params are the wrapped layer's params.
  sim = Q.SimulateQuantizedLinear(lin, method='q4_0')
  assert len(jax.tree.leaves(nnx.state(sim, nnx.Param))) == 2
  # from_float of a Simulate wrapper takes its method.
  assert Q.Int4Linear.from_float(sim).method.value == 'q4_0'
  assert Q.Int4Linear.from_float(lin, method='Q4_0').method.value == 'q4_0'


def test_errors():
  lin = nnx.Linear(64, 40, rngs=nnx.Rngs(0))
  ein = nnx.Einsum('bd,dh->bh', (64, 32), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='wrapped'):
    Q.Int4Linear.from_float(ein)
  with pytest.raises(TypeError, match='wrapped'):
    Q.SimulateQuantizedEinsum(lin, method='int4')
  with pytest.raises(TypeError, match='wrapped'):
    Q.Int4Einsum.from_float(nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='int4'):
    Q.Int4Linear.from_float(lin, method='int3')
  with pytest.raises(ValueError, match='int4'):
    Q.SimulateQuantizedLinear(lin, method='int3')
  with pytest.raises(ValueError, match='method'):
    Q.Int4Linear.from_float(lin, method='sfp8')
  with pytest.raises(ValueError, match='multiple of 32'):
    Q.Int4Linear.from_float(lin, method='q4_0')
  # Q4_0 block axis checked at construction, naming layer, axis and length.
  with pytest.raises(ValueError, match=r'SimulateQuantizedLinear.*axis 1.*'
                     r'\(64, 40\).*length 40.*multiple of 32'):
    Q.SimulateQuantizedLinear(lin, method='q4_0')
  with pytest.raises(ValueError, match=r'Int4Linear.*axis 1.*length 40'):
    Q.Int4Linear.from_float(lin, method='q4_0')
  ein40 = nnx.Einsum('bd,dh->bh', (40, 64), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'SimulateQuantizedEinsum.*'
                     r'second-to-last axis \(axis 0\).*length 40'):
    Q.SimulateQuantizedEinsum(ein40, method='q4_0_transpose')
  with pytest.raises(ValueError, match=r'Int4Einsum.*axis 0.*length 40'):
    Q.Int4Einsum.from_float(ein40, method='q4_0_transpose')
  Q.SimulateQuantizedEinsum(ein40, method='q4_0')  # (40, 64): blocks along 64
  with pytest.raises(TypeError, match='method'):
    Q.Int4Linear.from_float(lin, method=4)


def test_storage_partition_specs():
  from jax.sharding import PartitionSpec as P
  ein = nnx.Einsum('ebd,edf->ebf', (2, 64, 32), rngs=nnx.Rngs(0))
  names = ('exp', 'embed', 'mlp')
  want = {
      'int4': (P('exp', 'embed', 'mlp'), P('exp', None, 'mlp')),
      'q4_0': (P('exp', 'embed', 'mlp', None), P('exp', 'embed', 'mlp')),
      'q4_0_transpose': (P('exp', 'mlp', 'embed', None),
                         P('exp', 'mlp', 'embed')),
  }
  for method, (v, s) in want.items():
    q = Q.Int4Einsum.from_float(ein, method=method)
    specs = q.storage_partition_specs(names)
    assert (specs.values, specs.scale) == (v, s)
    assert (jax.tree.structure(specs)
            == jax.tree.structure(q.weight.get_value()))
  with pytest.raises(ValueError, match='kernel_names'):
    q.storage_partition_specs(('a', 'b'))


@pytest.mark.parametrize('method', METHODS)
def test_int4_input_gradient_is_blockwise(method, monkeypatch):
  """QLoRA backprops through the frozen base: grad w.r.t. the input matches
  the simulated layer, and the backward pass does not keep every
  dequantized chunk (which would add up to the float kernel)."""
  monkeypatch.setattr(kernels, '_CHUNK_ELEMENTS', 256 * 32)
  layer = nnx.Linear(256, 256, rngs=nnx.Rngs(0))
  x = _rand(18, (4, 256))
  ct = _rand(19, (4, 256))

  def grad_x(module):
    gdef, state = nnx.split(module)
    f = lambda s, x: jnp.sum(nnx.merge(gdef, s)(x) * ct)
    return jax.jit(jax.grad(f, argnums=1)).lower(state, x).compile(), state

  c_sim, s_sim = grad_x(Q.SimulateQuantizedLinear(layer, method=method))
  c_q, s_q = grad_x(Q.Int4Linear.from_float(layer, method=method))
  np.testing.assert_allclose(c_q(s_q, x), c_sim(s_sim, x), rtol=1e-5,
                             atol=1e-5)
  f32_kernel_bytes = 256 * 256 * 4
  assert c_q.memory_analysis().temp_size_in_bytes < f32_kernel_bytes / 2
  # The forward pass alone, too.
  q = Q.Int4Linear.from_float(layer, method=method)
  gdef, state = nnx.split(q)
  fwd = jax.jit(lambda s, x: nnx.merge(gdef, s)(x)).lower(state, x).compile()
  assert fwd.memory_analysis().temp_size_in_bytes < f32_kernel_bytes / 2


# --- sharding of the quantized storage ---------------------------------------
# Expected specs are written out by hand from the kernel's names: int4/int8
# values = kernel names, scale = None on the reduced axes; Q4_0 values
# (..., K // 32, 16) = (*names, None), scale = names; Q4_0_TRANSPOSE the same
# with the kernel's last two axes swapped.

_EIN_NAMES = ('exp', 'data', 'model')  # kernel (2, 64, 32) of 'ebd,edf->ebf'
_EIN_SPECS = {
    'int4': (('exp', 'data', 'model'), ('exp', None, 'model')),
    'int8': (('exp', 'data', 'model'), ('exp', None, 'model')),
    'q4_0': (('exp', 'data', 'model', None), ('exp', 'data', 'model')),
    'q4_0_transpose': (('exp', 'model', 'data', None),
                       ('exp', 'model', 'data')),
}


def _mesh3(shape=(1, 1, 1)):
  from jax.sharding import AxisType
  return jax.make_mesh(shape, ('exp', 'data', 'model'),
                       axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:1])


def _sharded_einsum():
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), _EIN_NAMES)
  return nnx.Einsum('ebd,edf->ebf', (2, 64, 32), kernel_init=init,
                    rngs=nnx.Rngs(0))


@pytest.mark.parametrize('method', METHODS)
def test_storage_variables_carry_partition_specs(method):
  from jax.sharding import PartitionSpec as P
  values, scale = _EIN_SPECS[method]
  mesh = _mesh3()
  with jax.set_mesh(mesh):
    q = Q.Int4Einsum.from_float(_sharded_einsum(), method=method)
    specs = nnx.get_partition_spec(nnx.state(q))
  assert specs['values'].get_value() == P(*values)
  assert specs['scale'].get_value() == P(*scale)
  # Placed as annotated, and the LoRA-facing names are the kernel's.
  assert q.values[...].sharding.spec == P(*values)
  assert q.scale[...].sharding.spec == P(*scale)
  assert q.kernel_sharding == _EIN_NAMES
  assert q.weight.get_metadata()['kernel_sharding'] == _EIN_NAMES
  specs = q.storage_partition_specs()
  assert (specs.values, specs.scale) == (P(*values), P(*scale))
  # to_float gives the kernel its names back.
  f = q.to_float()
  assert tuple(f.kernel.get_metadata()['out_sharding']) == _EIN_NAMES


@pytest.mark.parametrize('method', METHODS)
def test_eval_shape_under_mesh(method):
  """Abstract init under a mesh: ShapeDtypeStructs with the storage specs."""
  from jax.sharding import PartitionSpec as P
  values, scale = _EIN_SPECS[method]
  with jax.set_mesh(_mesh3()):
    abstract = nnx.eval_shape(
        lambda: Q.Int4Einsum.from_float(_sharded_einsum(), method=method))
  v, s = abstract.values.get_value(), abstract.scale.get_value()
  assert isinstance(v, jax.ShapeDtypeStruct)
  assert v.sharding.spec == P(*values) and s.sharding.spec == P(*scale)
  shapes = {'int4': ((2, 64, 32), (2, 1, 32)), 'int8': ((2, 64, 32), (2, 1, 32)),
            'q4_0': ((2, 64, 1, 16), (2, 64, 1)),
            'q4_0_transpose': ((2, 32, 2, 16), (2, 32, 2))}[method]
  assert (tuple(v.shape), tuple(s.shape)) == shapes
  assert abstract.kernel_shape == (2, 64, 32)
  assert abstract.weight.get_value().values.shape == shapes[0]


def test_block_axis_not_divisible_by_mesh_is_replicated():
  """Q4_0 of a 64-wide axis has 2 blocks: a 4-way mesh axis cannot split it."""
  from jax.sharding import AbstractMesh, AxisType
  mesh = AbstractMesh((1, 2, 4), ('exp', 'data', 'model'),
                      axis_types=(AxisType.Auto,) * 3)
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                               ('data', 'model'))

  def make(method, out):
    return Q.Int4Linear.from_float(
        nnx.Linear(64, out, kernel_init=init, rngs=nnx.Rngs(0)),
        method=method)

  with jax.sharding.use_abstract_mesh(mesh):
    two_blocks = nnx.eval_shape(lambda: make('q4_0', 64))
    eight_blocks = nnx.eval_shape(lambda: make('q4_0', 256))
    per_channel = nnx.eval_shape(lambda: make('int4', 64))
  meta = lambda v: tuple(v.get_metadata()['out_sharding'])
  assert meta(two_blocks.values) == ('data', None, None)
  assert meta(two_blocks.scale) == ('data', None)
  assert meta(eight_blocks.values) == ('data', 'model', None)
  assert meta(per_channel.values) == ('data', 'model')
  assert meta(per_channel.scale) == (None, 'model')


def test_weight_view_and_assignment():
  from peft.quantization import dequantize, quantize
  layer = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  q = Q.Int4Linear.from_float(layer, method='int4')
  view = q.weight
  assert isinstance(view, Q.QuantizedWeight)
  np.testing.assert_array_equal(np.asarray(view.get_value().values),
                                np.asarray(q.values[...]))
  # Assigning a QArray (e.g. from a checkpoint) replaces values and scale.
  k = _rand(20, (64, 32))
  q.weight = Q.QuantizedWeight(quantize(k, 'q4_0'))
  assert q.method.value == 'q4_0' and q.values[...].shape == (64, 1, 16)
  x = _rand(21, (3, 64))
  want = np.asarray(x) @ _ref_q4_0_last(np.asarray(k)) + np.asarray(
      layer.bias[...])
  np.testing.assert_allclose(q(x), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dequantize(q.qarray), _ref_q4_0_last(k),
                             rtol=0, atol=0)
  with pytest.raises(TypeError, match='QArray'):
    q.weight = jnp.ones((64, 32))


# --- constructors from shapes, custom layer types, strategies -----------------


def _load_like(empty, full):
  """Loads `full`'s state into `empty` (as a checkpoint restore would)."""
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(empty))
          == jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(full)))
  nnx.update(empty, nnx.state(full))
  return empty


@pytest.mark.parametrize('method', METHODS)
def test_constructors_from_shapes_load_what_from_float_wrote(method):
  cases = [
      (Q.Int4Linear(64, 32, method=method),
       nnx.Linear(64, 32, rngs=nnx.Rngs(0)), (3, 64)),
      (Q.Int4Einsum('btd,dnh->btnh', (64, 32, 32), (32, 32), method=method),
       nnx.Einsum('btd,dnh->btnh', (64, 32, 32), (32, 32), rngs=nnx.Rngs(1)),
       (2, 3, 64)),
      (Q.Int4LinearGeneral(64, 32, batch_axis={0: 2}, method=method),
       nnx.LinearGeneral(64, 32, batch_axis={0: 2}, rngs=nnx.Rngs(2)),
       (2, 3, 64)),
  ]
  for empty, layer, xshape in cases:
    x = _rand(30, xshape)
    assert float(jnp.abs(empty(x)).max()) == 0.0  # a zero kernel, zero bias
    full = type(empty).from_float(layer, method=method)
    loaded = _load_like(empty, full)
    assert loaded.method == full.method and loaded.geometry == full.geometry
    np.testing.assert_array_equal(_jit_call(loaded, x), _jit_call(full, x))


def test_stacked_constructor_from_shapes():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(64, 32, rngs=nnx.Rngs(params=key))

  full = Q.Int4Linear.from_float(make(jax.random.split(jax.random.key(0), 3)),
                                 method='q4_0_transpose')
  empty = Q.Int4Linear(64, 32, method='q4_0_transpose', leading_shape=(3,))
  assert empty.kernel_shape == full.kernel_shape == (3, 64, 32)
  _load_like(empty, full)
  fwd = nnx.vmap(lambda m, x: m(x), in_axes=(0, None), out_axes=0)
  x = _rand(31, (4, 64))
  np.testing.assert_array_equal(fwd(empty, x), fwd(full, x))


class _Proj(nnx.Module):
  """A custom layer: `x @ w` over heads, kernel `w`, no bias."""

  def __init__(self, din, heads, dh, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (din, heads, dh)))

  def __call__(self, x):
    return jnp.einsum('...d,dnh->...nh', x, self.w[...])


def _register_proj():
  from peft.geometry import Geometry
  from peft.nnx import registry
  registry.register_layer(
      _Proj, geometry=lambda m: Geometry.from_einsum(
          '...d,dnh->...nh', m.w.shape[-3:]), kernel='w', bias=None)


@pytest.mark.parametrize('method', ['int4', 'q4_0', 'q4_0_transpose'])
def test_custom_registered_layer(method):
  _register_proj()
  proj = _Proj(64, 32, 32, nnx.Rngs(0))
  x = _rand(32, (3, 64))
  sim = Q.SimulateQuantized(proj, method=method)
  kq = _ref_quant(np.asarray(proj.w[...]), method, (0,))
  want = np.einsum('bd,dnh->bnh', np.asarray(x), kq)
  np.testing.assert_allclose(_jit_call(sim, x), want, rtol=2e-5, atol=2e-5)
  assert sim.kernel is proj.w and sim.bias is None
  q = Q.QuantizedLayer.from_float(proj, method=method)
  assert type(q) is Q.QuantizedLayer and q.bias is None
  assert q.kernel_shape == (64, 32, 32)
  np.testing.assert_allclose(_jit_call(q, x), want, rtol=2e-5, atol=2e-5)
  # From the simulated wrapper too (its method is kept).
  assert Q.QuantizedLayer.from_float(sim).method.value == method
  # Straight-through gradient to the custom layer's own kernel.
  gdef, params, rest = nnx.split(sim, nnx.Param, ...)
  g = jax.grad(lambda p: jnp.sum(nnx.merge(gdef, p, rest)(x)))(params)
  np.testing.assert_allclose(
      g['wrapped']['w'][...],
      np.broadcast_to(np.asarray(x).sum(0)[:, None, None], (64, 32, 32)),
      rtol=1e-5)


def test_unregistered_layer_is_a_type_error():
  class Odd(nnx.Module):
    pass

  with pytest.raises(TypeError, match='register_layer'):
    Q.SimulateQuantized(Odd(), method='int4')
  with pytest.raises(TypeError, match='register_layer'):
    Q.QuantizedLayer.from_float(Odd())


@pytest.mark.parametrize('method', METHODS)
def test_strategies_give_the_same_layer_output(method):
  layer = nnx.Einsum('ebd,edf->ebf', (2, 64, 32), (2, 1, 32), rngs=nnx.Rngs(0))
  x = _rand(33, (2, 5, 64))
  outs = [_jit_call(Q.Int4Einsum.from_float(layer, method=method, strategy=s),
                    x) for s in ('auto', 'blockwise', 'fused')]
  np.testing.assert_array_equal(outs[0], outs[1])  # auto = blockwise on CPU
  np.testing.assert_allclose(outs[1], outs[2], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='strategy'):
    Q.Int4Linear(64, 32, strategy='fast')


def test_empty_layers():
  q = Q.Int4Linear(64, 0)
  assert q(jnp.ones((2, 64))).shape == (2, 0)
  zeros = nnx.initializers.zeros_init()
  f = Q.Int4Linear.from_float(nnx.Linear(64, 0, kernel_init=zeros,
                                         rngs=nnx.Rngs(0)), method='int8')
  assert f(jnp.ones((2, 64))).shape == (2, 0) and f.kernel_shape == (64, 0)
  with pytest.raises(ValueError, match='in_features=0'):
    Q.Int4Linear(0, 32)


def test_from_float_rejects_non_finite_kernels():
  layer = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
  layer.kernel[...] = layer.kernel[...].at[3, 5].set(jnp.nan)
  for method in ('int4', 'q4_0'):
    with pytest.raises(ValueError, match='Int4Linear.from_float.*NaN'):
      Q.Int4Linear.from_float(layer, method=method)


def test_set_weight_checks_the_geometry():
  from peft.quantization import quantize
  q = Q.Int4Linear(64, 32)
  with pytest.raises(ValueError, match='does not end with'):
    q.set_weight(quantize(_rand(34, (32, 64)), 'int4'))
  q.set_weight(quantize(_rand(35, (64, 32)), 'q4_0_transpose'))
  assert q.method.value == 'q4_0_transpose'

"""peft.geometry: the einsum of each flax layer, LoRA shapes, matrix views.

The references are flax's own layers (their outputs for random kernels) and
plain numpy reshapes written here.
"""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft.geometry import Geometry

_HI = jax.lax.Precision.HIGHEST


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('x_shape', [(5,), (2, 5), (2, 3, 5)])
def test_linear_einsum_equals_flax(x_shape):
  layer = nnx.Linear(5, 4, rngs=nnx.Rngs(0), precision=_HI)
  g = Geometry.linear(5, 4)
  x = jax.random.normal(jax.random.key(1), x_shape)
  y = jnp.einsum(g.call_einsum_str(len(x_shape)), x, layer.kernel[...],
                 precision=_HI)
  y = y + jnp.reshape(layer.bias[...], g.bias_broadcast_shape(len(x_shape)))
  _close(y, layer(x))
  # the registry's forward with the layer's own kernel is flax's forward
  from peft.nnx import registry  # pylint: disable=g-import-not-at-top
  _close(registry.layer_type(layer).call(layer, x, layer.kernel[...]),
         layer(x))


@st.composite
def _linear_general(draw):
  ndim = draw(st.integers(2, 4))
  nb = draw(st.integers(0, 1))
  ni = draw(st.integers(1, ndim - nb - (0 if nb else 0)))
  ni = min(ni, ndim - nb)
  candidates = list(range(nb, ndim))
  in_axes = sorted(draw(st.permutations(candidates))[:ni])  # flax needs sorted
  negative = draw(st.booleans())
  axis = tuple(a - ndim if negative else a for a in in_axes)
  x_shape = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
  in_features = tuple(x_shape[a] for a in in_axes)
  out_features = tuple(draw(st.lists(st.integers(1, 3), min_size=1,
                                     max_size=2)))
  batch_axis = {i: x_shape[i] for i in range(nb)}
  return x_shape, in_features, out_features, axis, batch_axis


@hypothesis.settings(deadline=None, max_examples=15)
@hypothesis.given(_linear_general())
def test_linear_general_einsum_equals_flax(case):
  x_shape, in_f, out_f, axis, batch_axis = case
  layer = nnx.LinearGeneral(in_f, out_f, axis=axis, batch_axis=batch_axis,
                            rngs=nnx.Rngs(0), precision=_HI,
                            bias_init=nnx.initializers.normal(1.0))
  g = Geometry.linear_general(in_f, out_f, axis=axis, batch_axis=batch_axis)
  assert g.kernel_shape == layer.kernel.shape
  assert g.bias_shape == layer.bias.shape
  x = jax.random.normal(jax.random.key(1), x_shape)
  y = jnp.einsum(g.call_einsum_str(len(x_shape)), x, layer.kernel[...],
                 precision=_HI)
  y = y + jnp.reshape(layer.bias[...], g.bias_broadcast_shape(len(x_shape)))
  _close(y, layer(x))
  # the registry's forward with the layer's own kernel is flax's forward
  from peft.nnx import registry  # pylint: disable=g-import-not-at-top
  _close(registry.layer_type(layer).call(layer, x, layer.kernel[...]),
         layer(x))
  # the LoRA einsum equals the einsum with the kernel a @ b
  a_shape, b_shape = g.lora_shapes(rank=2)
  a = jax.random.normal(jax.random.key(2), a_shape)
  b = jax.random.normal(jax.random.key(3), b_shape)
  delta = jnp.einsum(g.delta_einsum_str(), a, b, precision=_HI)
  _close(jnp.einsum(g.lora_einsum_str(ndim=len(x_shape)), x, a, b,
                    precision=_HI),
         jnp.einsum(g.call_einsum_str(len(x_shape)), x, delta, precision=_HI))


_EINSUMS = [
    ('bd,dnh->bnh', (6, 2, 3), (4, 6)),
    ('ebd,edf->ebf', (2, 3, 4), (2, 5, 3)),
    ('...d,dhk->...hk', (3, 2, 4), (2, 5, 3)),
    ('btnh,nhd->btd', (2, 3, 4), (2, 5, 2, 3)),
    ('BTD,DNH->BTNH', (4, 2, 3), (2, 3, 4)),
]


@pytest.mark.parametrize('einsum_str,kernel_shape,x_shape', _EINSUMS)
def test_einsum_geometry_equals_flax(einsum_str, kernel_shape, x_shape):
  layer = nnx.Einsum(einsum_str, kernel_shape, rngs=nnx.Rngs(0),
                     precision=_HI)
  g = Geometry.from_einsum(einsum_str, kernel_shape)
  x = jax.random.normal(jax.random.key(1), x_shape)
  y = jnp.einsum(g.call_einsum_str(len(x_shape)), x, layer.kernel[...],
                 precision=_HI)
  _close(y, layer(x))
  # to_matrix: contracting the inputs' contracted axes with the matrix is the
  # same as the layer (no batch axes in these cases except 'ebd,edf->ebf').
  if not g.batch:
    ins, _ = g.subscripts(len(x_shape))
    free = [c for c in ins if c not in g.kernel]
    xt = jnp.einsum(f'{ins}->{"".join(free)}{g.contracted}', x)
    xm = xt.reshape(*xt.shape[:len(free)], g.in_features)
    ym = xm @ g.to_matrix(layer.kernel[...])
    yk = jnp.einsum(f'{ins},{g.kernel}->{"".join(free)}{g.output}', x,
                    layer.kernel[...], precision=_HI)
    _close(ym.reshape(yk.shape), yk)


@hypothesis.settings(deadline=None, max_examples=15)
@hypothesis.given(st.sampled_from(_EINSUMS), st.integers(0, 2))
def test_matrix_round_trip_with_lead(case, n_lead):
  einsum_str, kernel_shape, _ = case
  g = Geometry.from_einsum(einsum_str, kernel_shape)
  lead = (2, 3)[:n_lead]
  w = np.arange(np.prod(lead + kernel_shape), dtype=np.float32).reshape(
      lead + kernel_shape)
  m = g.to_matrix(w)
  assert m.shape == (*lead, *g.batch_shape, *g.matrix_shape)
  np.testing.assert_array_equal(g.from_matrix(m), w)
  # row j of the matrix holds the contracted index j in row-major order
  if not g.batch and len(g.contracted) == 1 and not lead:
    c = g.contracted_axes[0]
    np.testing.assert_array_equal(
        m[1], np.moveaxis(w, c, 0)[1].reshape(-1))


def test_roles_and_factor_shapes():
  g = Geometry.from_einsum('ebd,edf->ebf', (8, 16, 32))
  assert (g.batch, g.contracted, g.output) == ('e', 'd', 'f')
  assert g.lora_shapes(4) == ((8, 16, 4), (8, 4, 32))
  assert g.lora_einsum_str() == 'ebd,edr,erf->ebf'
  assert g.delta_einsum_str() == 'edr,erf->edf'
  assert g.channel_scale_shape() == (8, 1, 32)
  assert Geometry.from_einsum('rd,dk->rk', (2, 3)).rank_letter() == 'a'


@pytest.mark.parametrize('bad,match', [
    (lambda: Geometry.from_einsum('bd,d->b', (2,)).check(),
     'no kernel axis reaches the outputs'),
    (lambda: Geometry.from_einsum('bd,dn->bdn', (2, 3)).check(),
     'no kernel axis is contracted'),
    (lambda: Geometry.from_einsum('bd,dnz->bn', (2, 3, 4)).check(),
     'appear in neither'),
    (lambda: Geometry.from_einsum('bd,dn->bn', (2, 3, 4)), 'has 3 axes'),
    (lambda: Geometry.linear(3, 4).lead_shape((4, 3)), 'does not end with'),
    (lambda: Geometry.linear_general((2, 3), 4, axis=-1), 'same length'),
    (lambda: Geometry.linear_general(2, 4, batch_axis={1: 2}),
     'consecutive leading'),
    (lambda: Geometry.linear(-1, 4), 'negative'),
])
def test_bad_geometry_is_a_clear_error(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


def test_wrong_types_are_type_errors():
  with pytest.raises(TypeError, match='in_features'):
    Geometry.linear('3', 4)
  with pytest.raises(TypeError, match='einsum_str'):
    Geometry.from_einsum(None, (2, 3))

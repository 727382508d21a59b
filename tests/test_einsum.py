"""Tests for peft.einsum: parsing, LoRA decomposition, reduced axes."""

import string

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from peft import einsum


@pytest.mark.parametrize(
    'einsum_str, shape, lora_str, a_shape, b_shape',
    [
        ('bi,io->bo', (3, 4), 'bi,ir,ro->bo', (3, 2), (2, 4)),
        ('bi,imn->bmn', (4, 2, 3), 'bi,ir,rmn->bmn', (4, 2), (2, 2, 3)),
        ('ebd,edf->ebf', (5, 6, 7), 'ebd,edr,erf->ebf', (5, 6, 2), (5, 2, 7)),
        ('...d,dhk->...hk', (8, 2, 3), '...d,dr,rhk->...hk', (8, 2), (2, 2, 3)),
        # 'r' is taken by the layer: the rank letter is the first free one.
        ('br,rs->bs', (3, 4), 'br,ra,as->bs', (3, 2), (2, 4)),
        # Weight letters out of order: reduced axes keep weight-string order.
        ('bhk,khd->bd', (2, 3, 4), 'bhk,khr,rd->bd', (2, 3, 2), (2, 4)),
    ],
)
def test_lora_einsum_strings_and_shapes(einsum_str, shape, lora_str, a_shape,
                                        b_shape):
  d = einsum.lora_einsum(einsum_str, shape, rank=2)
  assert d.lora_str == lora_str
  assert d.a_shape == a_shape
  assert d.b_shape == b_shape


@st.composite
def _random_case(draw):
  letters = list(string.ascii_lowercase.replace('r', ''))
  n_red = draw(st.integers(1, 3))
  n_out = draw(st.integers(1, 2))
  n_batch = draw(st.integers(0, 2))
  n_free = draw(st.integers(0, 2))  # input-only axes (e.g. batch of tokens)
  picked = draw(st.permutations(letters))[: n_red + n_out + n_batch + n_free]
  red = picked[:n_red]
  out = picked[n_red:n_red + n_out]
  bat = picked[n_red + n_out:n_red + n_out + n_batch]
  free = picked[n_red + n_out + n_batch:]
  weights = draw(st.permutations(red + out + bat))
  inputs = draw(st.permutations(free + bat + red))
  outputs = draw(st.permutations(free + bat + out))
  ellipsis = draw(st.booleans())
  prefix = '...' if ellipsis else ''
  sizes = {c: draw(st.integers(1, 3)) for c in picked}
  einsum_str = (f"{prefix}{''.join(inputs)},{''.join(weights)}"
                f"->{prefix}{''.join(outputs)}")
  x_shape = ((2,) if ellipsis else ()) + tuple(sizes[c] for c in inputs)
  w_shape = tuple(sizes[c] for c in weights)
  return einsum_str, x_shape, w_shape, red, ''.join(weights)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.data())
def test_adapter_equals_dense_update(data):
  """einsum(x, a, b) == einsum(x, W) with W[...] = sum_r a[..r] b[r..]."""
  einsum_str, x_shape, w_shape, red, weights = data.draw(_random_case())
  rank = data.draw(st.integers(1, 3))
  d = einsum.lora_einsum(einsum_str, w_shape, rank)
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape)
  a = rng.normal(size=d.a_shape)
  b = rng.normal(size=d.b_shape)
  # Independent dense update: loop over the rank, outer product per slice,
  # placed into the weight layout by letter name.
  w = np.zeros(w_shape)
  for k in range(rank):
    a_k = np.take(a, k, axis=len(d.a_shape) - 1)
    b_k = np.take(b, k, axis=d.b_str.index(d.rank_letter))
    a_letters = d.a_str.replace(d.rank_letter, '')
    b_letters = d.b_str.replace(d.rank_letter, '')
    w += np.einsum(f'{a_letters},{b_letters}->{weights}', a_k, b_k)
  want = np.einsum(einsum_str, x, w)
  got = np.einsum(d.lora_str, x, a, b)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.einsum(d.delta_str, a, b), w, rtol=1e-10,
                             atol=1e-10)
  assert einsum.reduced_weight_axes(einsum_str) == tuple(
      i for i, c in enumerate(weights) if c in red)


def test_reduced_weight_axes():
  assert einsum.reduced_weight_axes('bi,io->bo') == (0,)
  assert einsum.reduced_weight_axes('bi,imn->bmn') == (0,)
  assert einsum.reduced_weight_axes('bhk,khd->bd') == (0, 1)
  assert einsum.reduced_weight_axes('ebd,edf->ebf') == (1,)


@pytest.mark.parametrize(
    'einsum_str, match',
    [
        ('bi,io', 'exactly one "->"'),
        ('bi,io,oz->bz', '3 operand'),
        ('bi->bi', '1 operand'),
        ('bi,...o->bo', 'ellipsis in the weights'),
        ('b1,io->bo', 'only hold letters'),
        ('bii,io->bo', 'repeats'),
        ('bi,io->bz', "'z'"),
        ('bi,i.o->bo', 'bad ellipsis'),
        ('b,io->bo', 'appear in neither'),
        ('bi,i->b', 'no weight axis reaches the outputs'),
        ('bi,o->bio', 'no weight axis is contracted'),
        ('bi,io->...bo', 'outputs use "..."'),
    ],
)
def test_malformed_strings_are_rejected(einsum_str, match):
  with pytest.raises(ValueError, match=match) as info:
    weights = einsum_str.split('->')[0].split(',')[-1]
    einsum.lora_einsum(einsum_str, (2,) * len(weights), rank=1)
  assert 'einsum_str' in str(info.value)


def test_error_messages_show_expected_form():
  with pytest.raises(ValueError, match="inputs,weights->outputs"):
    einsum.parse_einsum_str('bi,io,oz->bz')
  with pytest.raises(TypeError, match='einsum_str must be a str'):
    einsum.parse_einsum_str(3)


@pytest.mark.parametrize('rank', [0, -1, 1.5, True, None])
def test_bad_rank(rank):
  with pytest.raises(ValueError, match='rank must be a positive int'):
    einsum.lora_einsum('bi,io->bo', (2, 3), rank)


def test_shape_length_mismatch():
  with pytest.raises(ValueError, match='weights_shape'):
    einsum.lora_einsum('bi,io->bo', (2, 3, 4), 1)

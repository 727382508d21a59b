"""Hardening of the NNX core after the redesign: bad input, tied weights,
dtypes of grouped construction.

Rows in the style of the `Bad` table of tests/test_hardening.py (one rule:
`TypeError` for a wrong type, `ValueError` for a wrong value), plus the
issue-11 defects of the NNX core checked against references computed here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peft.nnx as pnnx
from peft.geometry import Geometry
from _bad import Bad
from _bad import check_bad
from _bad import param as _param


def _lin(i=4, o=3, seed=0, **kw):
  return nnx.Linear(i, o, rngs=nnx.Rngs(seed), **kw)


class _Tied(nnx.Module):
  """`a` and `b` share one kernel Variable (tied weights)."""

  def __init__(self):
    self.a = _lin(32, 32)
    self.b = _lin(32, 32, seed=1)
    self.b.kernel = self.a.kernel


def _int_kernel_linear():
  layer = _lin()
  layer.kernel = nnx.Param(jnp.zeros((4, 3), jnp.int32))
  return layer


def _two_adapters():
  model = nnx.Sequential(_lin())
  pnnx.apply_lora(model, rank=2, name='x', rngs=nnx.Rngs(1))
  return model


_BAD_NNX = [
    Bad('nnx/alpha_zero_wrapper',
        lambda: pnnx.LoRALinear(_lin(), rank=2, alpha=0, rngs=nnx.Rngs(0)),
        ('alpha',), (ValueError,)),
    Bad('nnx/alpha_zero_surgery',
        lambda: pnnx.apply_lora(nnx.Sequential(_lin()), rank=2, alpha=0.0,
                                rngs=nnx.Rngs(0)), ('alpha',), (ValueError,)),
    Bad('nnx/alpha_string',
        lambda: pnnx.LoRALinear(_lin(), rank=2, alpha='2', rngs=nnx.Rngs(0)),
        ('alpha',), (TypeError,)),
    Bad('nnx/rank_float', lambda: pnnx.LoRALinear(
        _lin(), rank=1.5, rngs=nnx.Rngs(0)), ('rank',), (TypeError,)),
    Bad('nnx/int_kernel', lambda: pnnx.LoRALinear(
        _int_kernel_linear(), rank=2, rngs=nnx.Rngs(0)),
        ('param_dtype', 'floating'), (TypeError,)),
    Bad('nnx/lora_state_str', lambda: pnnx.lora_state('abc'),
        ('model', 'nnx.Module'), (TypeError,)),
    Bad('nnx/summary_none', lambda: pnnx.summary(None), ('model',),
        (TypeError,)),
    Bad('nnx/replace_none', lambda: pnnx.replace(None, lambda p, m: m),
        ('model',), (TypeError,)),
    Bad('nnx/replace_fn', lambda: pnnx.replace(nnx.Sequential(_lin()), 3),
        ('fn',), (TypeError,)),
    Bad('nnx/pissa_tied_kernel', lambda: pnnx.apply_lora(
        _Tied(), rank=2, where='a', init='pissa', rngs=nnx.Rngs(0)),
        ('shared', 'b'), (ValueError,)),
    Bad('nnx/quantize_tied_kernel', lambda: pnnx.quantize(
        _Tied(), method='int4', where='a'), ('shared', 'b'), (ValueError,)),
    Bad('nnx/geometry_type', lambda: pnnx.LoRAAdapter(
        'io', rank=2, rngs=nnx.Rngs(0)), ('geometry',), (TypeError,)),
    Bad('nnx/adapter_name_type', lambda: pnnx.apply_lora(
        nnx.Sequential(_lin()), rank=2, name=7, rngs=nnx.Rngs(0)),
        ('name',), (TypeError,)),
    Bad('nnx/adapter_name_clash', lambda: pnnx.apply_lora(
        _two_adapters(), rank=2, name='x', rngs=nnx.Rngs(0)),
        ("'x'",), (ValueError,)),
    Bad('nnx/active_unknown', lambda: pnnx.set_active_adapters(
        _two_adapters(), 'nope'), ('nope',), (ValueError,)),
    Bad('nnx/active_bad_weight', lambda: pnnx.set_active_adapters(
        _two_adapters(), {'x': 'heavy'}), ('weight',), (TypeError,)),
    Bad('nnx/adapter_ids_float', lambda: pnnx.set_adapter_ids(
        _two_adapters(), jnp.array([0.5])), ('ids', 'integer'), (TypeError,)),
    Bad('nnx/adapter_ids_range', lambda: pnnx.set_adapter_ids(
        _two_adapters(), jnp.array([0, 3])), ('ids',), (ValueError,)),
    Bad('nnx/combine_how', lambda: pnnx.combine_adapters(
        _two_adapters(), {'x': 1.0}, 'y', how='mean'), ('how',),
        (ValueError,)),
    Bad('nnx/register_not_a_class', lambda: pnnx.register_layer(
        'Linear', geometry=lambda m: None), ('layer_type',), (TypeError,)),
    Bad('nnx/geometry_bad_einsum', lambda: Geometry.from_einsum(
        'bd,dn->b', (3, 4)).check(), ('einsum_str',), (ValueError,)),
    Bad('nnx/dora_not_bool', lambda: pnnx.LoRALinear(
        _lin(), rank=2, dora='yes', rngs=nnx.Rngs(0)), ('dora',),
        (TypeError,)),
]


def test_bad_nnx_table_ids_are_unique():
  import test_hardening  # pylint: disable=g-import-not-at-top
  ids = [c.id for c in _BAD_NNX]
  assert len(ids) == len(set(ids))
  assert not set(ids) & {c.id for c in test_hardening._BAD}


@pytest.mark.parametrize('case', [_param(c) for c in _BAD_NNX])
def test_bad_nnx_input_raises_clear_error(case):
  check_bad(case)


@pytest.mark.parametrize('n', [3, 4, 70])
def test_grouped_construction_keeps_each_kernels_dtype(n):
  """Issue 11 item 3: the grouped fast path (>= 4 identical layers) used to
  give every adapter the first kernel's dtype."""
  dtypes = [jnp.float32, jnp.bfloat16] * (n // 2) + [jnp.float32] * (n % 2)
  model = nnx.Sequential(*[_lin(8, 8, seed=i, param_dtype=d)
                           for i, d in enumerate(dtypes)])
  pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(0))
  got = [layer.lora.a.dtype for layer in model.layers]
  assert got == [jnp.dtype(d) for d in dtypes]


def test_refused_tied_surgery_leaves_the_model_unchanged():
  model = _Tied()
  x = jax.random.normal(jax.random.key(0), (2, 32))
  before = np.asarray(model.b(x))
  with pytest.raises(ValueError):
    pnnx.apply_lora(model, rank=2, where='a', init='pissa', rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.b(x), before)
  assert type(model.a) is nnx.Linear

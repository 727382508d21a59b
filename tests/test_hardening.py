"""Hardening of the whole public API: bad input, numerics, special values.

* A table of bad inputs over the public API (nnx and linen): each raises a
  `ValueError`/`TypeError` whose message names the offending argument.
* No bare `assert` in `peft/` (an AST walk over the sources).
* Hypothesis: random valid einsum strings -> `peft.nnx.lora.LoRAEinsum`
  equals a dense `jnp.einsum` reference built here from the letters; quantize /
  dequantize error bounds per method, computed here from the DESIGN.md formulas.
* No public function mutates its inputs (deep comparison before/after).
* Zero, denormal, huge and NaN-containing kernels through every method: the
  behaviour documented in the lead's report ("Special values").
"""

from __future__ import annotations

import ast
import copy
import pathlib
import string
import tempfile

import flax.linen as nn
from flax import nnx
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import einsum as pe
from peft import params as pp
from peft import quantization as pq
from peft.nnx import lora as nl
from peft.nnx import surgery
from _bad import Bad
from _bad import check_bad
from _bad import param as _param

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_HI = jax.lax.Precision.HIGHEST


def _optional(module: str, name: str):
  """`module.name` (for 'peft': `peft.linen.name` first), or a stub raising
  ImportError when it does not exist (the row then fails, naming it)."""
  import importlib  # pylint: disable=g-import-not-at-top
  modules = ['peft.linen', 'peft'] if module == 'peft' else [module]
  errors = []
  for mod in modules:
    try:
      return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
      errors.append(f'{mod}.{name}: {e}')

  def missing(*args, **kwargs):
    raise ImportError('missing: ' + '; '.join(errors))
  return missing


# ---------------------------------------------------------------------------
# Small models used by the table.


def _linear(i=4, o=3, seed=0):
  return nnx.Linear(i, o, rngs=nnx.Rngs(seed))


class _MLP(nnx.Module):

  def __init__(self, i=32, h=32, o=32):
    self.up = nnx.Linear(i, h, rngs=nnx.Rngs(0))
    self.down = nnx.Linear(h, o, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


class _ConvOnly(nnx.Module):

  def __init__(self):
    self.conv = nnx.Conv(2, 3, (3,), rngs=nnx.Rngs(0))


def _lora_mlp(rank=2):
  return surgery.apply_lora(_MLP(), rank=rank, rngs=nnx.Rngs(2))


def _params_with_lora():
  rng = np.random.default_rng(0)
  return {
      'Dense_0': {
          'kernel': rng.normal(size=(4, 3)).astype(np.float32),
          'bias': np.zeros((3,), np.float32),
          'lora': {'a': rng.normal(size=(4, 2)).astype(np.float32),
                   'b': rng.normal(size=(2, 3)).astype(np.float32)},
      },
      'Dense_1': {'kernel': rng.normal(size=(3, 5)).astype(np.float32)},
  }


def _linen_init(module, x_shape=(1, 4)):
  return module.init(jax.random.key(0), jnp.ones(x_shape))


def _save_then_restore_mismatch():
  from peft import checkpoint  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    path = checkpoint.save_pytree(d + '/p', {'w': np.ones((4, 3), np.float32)})
    checkpoint.restore_pytree(path, {'w': jax.ShapeDtypeStruct(
        (4, 2), jnp.float32)})


def _adapter_rank_mismatch():
  from peft import checkpoint  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    model = _lora_mlp(rank=2)
    checkpoint.save_adapter(d + '/a', model)
    other = _MLP(i=32, h=64, o=32)  # same paths, different kernel shapes
    checkpoint.load_adapter(d + '/a', other)


def _linen_apply_wrong_lora_shape():
  import peft.linen as pl  # pylint: disable=g-import-not-at-top
  layer = pl.LoRADense(rank=2, wrapped=nn.Dense(3))
  params = _linen_init(layer)['params']
  params = jax.tree.map(lambda x: x, params)
  params['lora']['a'] = jnp.ones((4, 5))  # rank 5 params, rank 2 model
  layer.apply({'params': params}, jnp.ones((1, 4)))


def _linen_apply_missing_lora():
  import peft.linen as pl  # pylint: disable=g-import-not-at-top
  layer = pl.LoRADense(rank=2, wrapped=nn.Dense(3))
  params = _linen_init(layer)['params']
  original, _ = pp.split_params(params)
  layer.apply({'params': original}, jnp.ones((1, 4)))


def _simulate_q4_0_bad_axis_at_construction():
  sq = _optional('peft.nnx.quantized', 'SimulateQuantizedLinear')
  sq(_linear(32, 33), method='q4_0')  # must fail here, not at call time


def _quantize_checkpoint(params, method):
  return _optional('peft', 'quantize_checkpoint')(params, method=method)


_X = jnp.ones((4, 3), jnp.float32)
_BAD = [
    # --- peft.einsum
    Bad('einsum/three_operands',
        lambda: pe.parse_einsum_str('bi,io,oj->bj'), ('einsum_str',)),
    Bad('einsum/no_arrow', lambda: pe.parse_einsum_str('bi,io'),
        ('einsum_str',)),
    Bad('einsum/two_arrows', lambda: pe.parse_einsum_str('bi,io->bo->b'),
        ('einsum_str',)),
    Bad('einsum/not_a_string', lambda: pe.parse_einsum_str(3),
        ('einsum_str',), (TypeError,)),
    Bad('einsum/ellipsis_in_weights',
        lambda: pe.parse_einsum_str('bi,...io->bo'), ('einsum_str',
                                                       'ellipsis')),
    Bad('einsum/digit', lambda: pe.parse_einsum_str('b1,io->bo'),
        ('einsum_str',)),
    Bad('einsum/repeated_letter', lambda: pe.parse_einsum_str('bii,io->bo'),
        ('einsum_str',)),
    Bad('einsum/unknown_output', lambda: pe.parse_einsum_str('bi,io->bz'),
        ('einsum_str',)),
    Bad('einsum/rank_zero', lambda: pe.lora_einsum('bi,io->bo', (4, 3), 0),
        ('rank',)),
    Bad('einsum/rank_negative',
        lambda: pe.lora_einsum('bi,io->bo', (4, 3), -2), ('rank',)),
    Bad('einsum/rank_float',
        lambda: pe.lora_einsum('bi,io->bo', (4, 3), 2.5), ('rank',)),
    Bad('einsum/rank_bool',
        lambda: pe.lora_einsum('bi,io->bo', (4, 3), True), ('rank',)),
    Bad('einsum/weights_shape_ndim',
        lambda: pe.lora_einsum('bi,io->bo', (4, 3, 2), 2), ('weights_shape',)),
    Bad('einsum/nothing_contracted',
        lambda: pe.lora_einsum('bi,jo->bjo', (4, 3), 2), ('einsum_str',)),
    # --- peft.quantization
    Bad('quant/unknown_method_enum', lambda: pq.QuantizationMethod('int3'),
        ('method',)),
    Bad('quant/unknown_method_simulate',
        lambda: pq.simulate_quantize(_X, 'int3'), ('method',)),
    Bad('quant/unknown_method_quantize', lambda: pq.quantize(_X, 'fp4'),
        ('method',)),
    Bad('quant/sfp8_has_no_storage', lambda: pq.quantize(_X, 'sfp8'),
        ('SFP8', 'method')),
    Bad('quant/q4_0_axis_not_multiple_of_32',
        lambda: pq.simulate_quantize(jnp.ones((4, 33)), 'q4_0'),
        ('`x`', '32')),
    Bad('quant/q4_0_quantize_axis',
        lambda: pq.quantize(jnp.ones((4, 48)), 'q4_0'), ('`x`', '32')),
    Bad('quant/q4_0_transpose_axis',
        lambda: pq.quantize(jnp.ones((33, 4)), 'q4_0_transpose'),
        ('`x`', '32')),
    Bad('quant/q4_0_scalar', lambda: pq.quantize(jnp.ones(()), 'q4_0'),
        ('`x`',)),
    Bad('quant/integer_input',
        lambda: pq.simulate_quantize(jnp.ones((4, 3), jnp.int32), 'int4'),
        ('`x`',)),
    Bad('quant/axis_out_of_range',
        lambda: pq.simulate_quantize(_X, 'int4', axis_to_reduce=5),
        ('axis_to_reduce',)),
    Bad('quant/axis_wrong_type',
        lambda: pq.simulate_quantize(_X, 'int8', axis_to_reduce='rows'),
        ('axis_to_reduce',), (TypeError,)),
    Bad('quant/axis_repeated',
        lambda: pq.simulate_quantize(_X, 'int8', axis_to_reduce=(0, -2)),
        ('axis_to_reduce',)),
    Bad('quant/dequantize_not_qarray', lambda: pq.dequantize(np.ones(3)),
        ('`q`',), (TypeError,)),
    Bad('quant/ggml_bytes_of_int4',
        lambda: pq.to_ggml_bytes(pq.quantize(_X, 'int4')), ('Q4_0',)),
    Bad('quant/unpack_wrong_shape',
        lambda: pq.unpack_q4_0(jnp.zeros((3, 8), jnp.uint8)), ('`values`',)),
    # --- peft.nnx.lora
    Bad('nnx_lora/rank_zero',
        lambda: nl.LoRALinear(_linear(), rank=0, rngs=nnx.Rngs(0)), ('rank',)),
    Bad('nnx_lora/rank_negative',
        lambda: nl.LoRALinear(_linear(), rank=-1, rngs=nnx.Rngs(0)),
        ('rank',)),
    Bad('nnx_lora/rank_float',
        lambda: nl.LoRALinear(_linear(), rank=1.5, rngs=nnx.Rngs(0)),
        ('rank',)),
    Bad('nnx_lora/unsupported_layer',
        lambda: nl.LoRALinear(nnx.Conv(2, 3, (3,), rngs=nnx.Rngs(0)), rank=2,
                              rngs=nnx.Rngs(0)), ('wrapped',), (TypeError,)),
    Bad('nnx_lora/wrong_wrapper_for_einsum',
        lambda: nl.LoRALinear(nnx.Einsum('bi,io->bo', (4, 3),
                                         rngs=nnx.Rngs(0)),
                              rank=2, rngs=nnx.Rngs(0)),
        ('wrapped', 'LoRAEinsum'), (TypeError,)),
    Bad('nnx_lora/wrong_wrapper_for_linear',
        lambda: nl.LoRAEinsum(_linear(), rank=2, rngs=nnx.Rngs(0)),
        ('wrapped', 'LoRALinear'), (TypeError,)),
    Bad('nnx_lora/rngs_not_rngs',
        lambda: nl.LoRALinearAdapter(4, 3, rank=2, rngs=0), ('rngs',),
        (TypeError,)),
    Bad('nnx_lora/alpha_not_number',
        lambda: nl.LoRALinear(_linear(), rank=2, alpha='big',
                              rngs=nnx.Rngs(0)), ('alpha',)),
    Bad('nnx_lora/unknown_init',
        lambda: nl.LoRALinear(_linear(), rank=2, init='svd',
                              rngs=nnx.Rngs(0)), ('init',)),
    Bad('nnx_lora/adapter_three_operands',
        lambda: nl.LoRAEinsumAdapter('bi,io,oj->bj', (4, 3), rank=2,
                                     rngs=nnx.Rngs(0)), ('einsum_str',)),
    Bad('nnx_lora/adapter_ellipsis_in_weights',
        lambda: nl.LoRAEinsumAdapter('bi,...io->bo', (4, 3), rank=2,
                                     rngs=nnx.Rngs(0)), ('einsum_str',)),
    Bad('nnx_lora/adapter_rank_zero',
        lambda: nl.LoRALinearAdapter(4, 3, rank=0, rngs=nnx.Rngs(0)),
        ('rank',)),
    Bad('nnx_lora/einsum_call_with_other_string',
        lambda: nl.LoRAEinsum(nnx.Einsum('bi,io->bo', (4, 3),
                                         rngs=nnx.Rngs(0)),
                              rank=2, rngs=nnx.Rngs(0))(
                                  jnp.ones((2, 4)), 'bi,io->bo '[::-1][1:]),
        ('einsum_str',)),
    # --- peft.nnx.quantized
    Bad('nnx_quant/simulate_unsupported_layer',
        lambda: _optional('peft.nnx.quantized', 'SimulateQuantizedLinear')(
            nnx.Conv(2, 3, (3,), rngs=nnx.Rngs(0)), method='int4'),
        ('wrapped',), (TypeError,)),
    Bad('nnx_quant/simulate_unknown_method',
        lambda: _optional('peft.nnx.quantized', 'SimulateQuantizedLinear')(
            _linear(), method='int3'), ('method',)),
    Bad('nnx_quant/int4_unknown_method',
        lambda: _optional('peft.nnx.quantized', 'Int4Linear').from_float(
            _linear(32, 32), method='int3'), ('method',)),
    Bad('nnx_quant/int4_sfp8_no_storage',
        lambda: _optional('peft.nnx.quantized', 'Int4Linear').from_float(
            _linear(32, 32), method='sfp8'), ('method',)),
    Bad('nnx_quant/int4_q4_0_axis',
        lambda: _optional('peft.nnx.quantized', 'Int4Linear').from_float(
            _linear(32, 33), method='q4_0'),
        ('32', 'kernel', 'Int4Linear', 'axis 1', '33')),
    Bad('nnx_quant/int4_wrong_layer',
        lambda: _optional('peft.nnx.quantized', 'Int4Linear').from_float(
            nnx.Einsum('bi,io->bo', (4, 3), rngs=nnx.Rngs(0))),
        ('wrapped',), (TypeError,)),
    Bad('nnx_quant/simulate_q4_0_axis_at_construction',
        _simulate_q4_0_bad_axis_at_construction,
        ('SimulateQuantizedLinear', 'axis 1', '33', '32')),
    # --- peft.nnx.surgery
    Bad('surgery/apply_lora_rank_zero',
        lambda: surgery.apply_lora(_MLP(), rank=0, rngs=nnx.Rngs(0)),
        ('rank',)),
    Bad('surgery/apply_lora_where_matches_nothing',
        lambda: surgery.apply_lora(_MLP(), rank=2, where='attn/.*',
                                   rngs=nnx.Rngs(0)), ('where',)),
    Bad('surgery/apply_lora_where_bad_type',
        lambda: surgery.apply_lora(_MLP(), rank=2, where=3.5,
                                   rngs=nnx.Rngs(0)), ('where',),
        (TypeError,)),
    Bad('surgery/apply_lora_bad_regex',
        lambda: surgery.apply_lora(_MLP(), rank=2, where='up(',
                                   rngs=nnx.Rngs(0)), ('where',)),
    Bad('surgery/apply_lora_no_rngs',
        lambda: surgery.apply_lora(_MLP(), rank=2), ('rngs',), (TypeError,)),
    Bad('surgery/apply_lora_bad_rngs',
        lambda: surgery.apply_lora(_MLP(), rank=2, rngs='seed'), ('rngs',),
        (TypeError,)),
    Bad('surgery/apply_lora_unsupported_layers_only',
        lambda: surgery.apply_lora(_ConvOnly(), rank=2, rngs=nnx.Rngs(0)),
        ('model', 'nnx.Linear')),
    Bad('surgery/apply_lora_expected_count',
        lambda: surgery.apply_lora(_MLP(), rank=2, expected_count=3,
                                   rngs=nnx.Rngs(0)), ('expected_count',)),
    Bad('surgery/apply_lora_unknown_kwarg',
        lambda: surgery.apply_lora(_MLP(), rank=2, rngs=nnx.Rngs(0),
                                   ranks=3), ('ranks',), (TypeError,)),
    Bad('surgery/quantize_unknown_method',
        lambda: surgery.quantize(_MLP(), method='int3'), ('method',)),
    Bad('surgery/quantize_sfp8',
        lambda: surgery.quantize(_MLP(), method='sfp8'), ('method',)),
    Bad('surgery/quantize_q4_0_axis',
        lambda: surgery.quantize(_MLP(32, 33, 32), method='q4_0'), ('32',)),
    Bad('surgery/simulate_unknown_method',
        lambda: surgery.simulate_quantization(_MLP(), method='int3'),
        ('method',)),
    Bad('surgery/simulate_where_matches_nothing',
        lambda: surgery.simulate_quantization(_MLP(), method='int4',
                                              where='nope'), ('where',)),
    Bad('surgery/merge_lora_without_lora',
        lambda: surgery.merge_lora(_MLP()), ('LoRA',)),
    Bad('surgery/merge_lora_quantized_base',
        lambda: surgery.merge_lora(surgery.quantize(_lora_mlp(),
                                                    method='int4')),
        ('dequantize',)),
    Bad('surgery/lora_state_without_lora',
        lambda: surgery.lora_state(_MLP()), ('apply_lora',)),
    Bad('surgery/replace_fn_not_callable',
        lambda: surgery.replace(_MLP(), 3), ('fn',), (TypeError,)),
    # --- peft.params
    Bad('params/split_not_a_tree', lambda: pp.split_params([1, 2]),
        ('params',), (TypeError,)),
    Bad('params/merge_not_a_tree',
        lambda: pp.merge_params({'a': np.ones(2)}, 3), ('lora',),
        (TypeError,)),
    Bad('params/fuse_without_lora',
        lambda: pp.fuse_params({'Dense_0': {'kernel': np.ones((4, 3))}}),
        ('lora', 'params')),
    Bad('params/fuse_shape_mismatch',
        lambda: pp.fuse_params({'Dense_0': {
            'kernel': np.ones((4, 3)),
            'lora': {'a': np.ones((5, 2)), 'b': np.ones((2, 3))}}}),
        ('Dense_0',)),
    Bad('params/fuse_missing_b',
        lambda: pp.fuse_params({'Dense_0': {
            'kernel': np.ones((4, 3)), 'lora': {'a': np.ones((4, 2))}}}),
        ('Dense_0',)),
    Bad('params/unfuse_without_lora',
        lambda: pp.unfuse_params({'Dense_0': {'kernel': np.ones((4, 3))}},
                                 {}), ('lora',)),
    Bad('params/unfuse_shape_mismatch',
        lambda: pp.unfuse_params(
            {'Dense_0': {'kernel': np.ones((4, 3))}},
            {'Dense_0': {'lora': {'a': np.ones((4, 2)),
                                  'b': np.ones((2, 7))}}}), ('Dense_0',)),
    Bad('params/merge_conflict',
        lambda: pp.merge_params({'Dense_0': {'kernel': np.ones((4, 3))}},
                                {'Dense_0': {'kernel': np.ones((4, 3))}}),
        ('Dense_0',)),
    # --- peft.checkpoint (params / model shape mismatch)
    Bad('checkpoint/restore_shape_mismatch', _save_then_restore_mismatch,
        ('w',)),
    Bad('checkpoint/load_adapter_shape_mismatch', _adapter_rank_mismatch,
        ('shape',)),
    # --- peft.linen
    Bad('linen/dense_rank_zero',
        lambda: _optional('peft', 'LoRADense')(rank=0, wrapped=nn.Dense(3)),
        ('rank',)),
    Bad('linen/dense_rank_negative',
        lambda: _linen_init(_optional('peft', 'LoRADense')(
            rank=-3, wrapped=nn.Dense(3))), ('rank',)),
    Bad('linen/dense_wraps_conv',
        lambda: _optional('peft', 'LoRADense')(rank=2,
                                               wrapped=nn.Conv(3, (3,))),
        ('wrapped',), (TypeError,)),
    Bad('linen/einsum_wraps_dense',
        lambda: _optional('peft', 'LoRAEinsum')(rank=2, wrapped=nn.Dense(3)),
        ('wrapped',), (TypeError,)),
    Bad('linen/dense_general_wraps_dense',
        lambda: _optional('peft', 'LoRADenseGeneral')(rank=2,
                                                      wrapped=nn.Dense(3)),
        ('wrapped',), (TypeError,)),
    Bad('linen/einsum_adapter_three_operands',
        lambda: _linen_init(_optional('peft', 'LoRAEinsumAdapter')(
            rank=2, einsum_str='bi,io,oj->bj', shape=(4, 3))),
        ('einsum_str',)),
    Bad('linen/einsum_adapter_ellipsis_weights',
        lambda: _linen_init(_optional('peft', 'LoRAEinsumAdapter')(
            rank=2, einsum_str='bi,...io->bo', shape=(4, 3))),
        ('einsum_str',)),
    Bad('linen/dense_adapter_rank_zero',
        lambda: _linen_init(_optional('peft', 'LoRADenseAdapter')(
            rank=0, features=3)), ('rank',)),
    Bad('linen/interceptor_not_callable',
        lambda: _optional('peft', 'ModuleInterceptor')(3),
        ('replace_module_fn',), (TypeError,)),
    Bad('linen/apply_without_lora_params', _linen_apply_missing_lora,
        ('lora',)),
    Bad('linen/apply_lora_shape_mismatch', _linen_apply_wrong_lora_shape,
        ('lora/a', '(4, 5)', '(4, 2)', 'rank=2'), (ValueError,)),
    Bad('linen/simulate_unknown_method',
        lambda: _linen_init(_optional('peft', 'SimulateQuantizedDense')(
            wrapped=nn.Dense(32), method='int3'), (1, 32)), ('method',)),
    Bad('linen/int4_dense_unknown_method',
        lambda: _linen_init(_optional('peft', 'Int4Dense')(
            wrapped=nn.Dense(32), method='int3'), (1, 32)), ('method',)),
    Bad('linen/quantize_checkpoint_unknown_method',
        lambda: _quantize_checkpoint({'Dense_0': {'kernel': np.ones((32, 32),
                                                                    np.float32)}},
                                     'int3'), ('method',)),
    Bad('linen/quantize_checkpoint_q4_0_axis',
        lambda: _quantize_checkpoint({'Dense_0': {'kernel': np.ones((32, 33),
                                                                    np.float32)}},
                                     'q4_0'), ('32', 'Dense_0')),
]


def test_bad_table_ids_are_unique():
  ids = [c.id for c in _BAD]
  assert len(ids) == len(set(ids))


@pytest.mark.parametrize('case', [_param(c) for c in _BAD])
def test_bad_input_raises_clear_error(case):
  check_bad(case)


# ---------------------------------------------------------------------------
# No bare assert in peft/.


def test_no_bare_assert_in_peft():
  found = []
  for path in sorted((_ROOT / 'peft').rglob('*.py')):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, ast.Assert):
        found.append(f'{path.relative_to(_ROOT)}:{node.lineno}')
  assert not found, 'bare assert statements in peft/: ' + ', '.join(found)


# ---------------------------------------------------------------------------
# Hypothesis: random valid einsum strings -> LoRAEinsum == dense reference.


@st.composite
def _einsum_cases(draw):
  letters = list(draw(st.permutations(
      [c for c in string.ascii_lowercase if c != 'r'])))
  n_con = draw(st.integers(1, 3))
  n_bat = draw(st.integers(0, 2))
  n_out = draw(st.integers(1, 2))
  n_free = draw(st.integers(0, 2))  # input-only axes kept in the output
  ellipsis = draw(st.booleans())
  con = letters[:n_con]
  bat = letters[n_con:n_con + n_bat]
  out = letters[n_con + n_bat:n_con + n_bat + n_out]
  free = letters[n_con + n_bat + n_out:n_con + n_bat + n_out + n_free]
  inputs = draw(st.permutations(free + bat + con))
  weights = draw(st.permutations(bat + con + out))
  outputs = draw(st.permutations(free + bat + out))
  prefix = '...' if ellipsis else ''
  es = (f'{prefix}{"".join(inputs)},{"".join(weights)}->'
        f'{prefix}{"".join(outputs)}')
  size = {c: draw(st.integers(1, 3)) for c in con + bat + out + free}
  ell_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0,
                                  max_size=2))) if ellipsis else ()
  rank = draw(st.integers(1, 3))
  alpha = draw(st.sampled_from([None, 0.5, 3.0]))
  return dict(es=es, inputs=inputs, weights=weights, outputs=outputs,
              con=con, bat=bat, out=out, size=size, ell=ell_shape, rank=rank,
              alpha=alpha, seed=draw(st.integers(0, 2**16)))


def _numpy_init(seed):
  """An initializer drawing from numpy (no XLA compile per new shape)."""
  rng = np.random.default_rng(seed)

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(rng.standard_normal(shape), dtype)
  return init


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(_einsum_cases())
def test_lora_einsum_matches_dense_reference(case):
  size = case['size']
  seed = case['seed']
  k_shape = tuple(size[c] for c in case['weights'])
  base = nnx.Einsum(case['es'], k_shape, kernel_init=_numpy_init(seed),
                    rngs=nnx.Rngs(0))
  layer = nl.LoRAEinsum(base, rank=case['rank'], alpha=case['alpha'],
                        a_init=_numpy_init(seed + 1),
                        b_init=_numpy_init(seed + 2), rngs=nnx.Rngs(1))
  x_shape = case['ell'] + tuple(size[c] for c in case['inputs'])
  x = np.random.default_rng(seed + 3).standard_normal(x_shape).astype(
      np.float32)
  # One XLA compile per example (eager calls would compile op by op).
  got = np.asarray(nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x)))

  # Independent reference. Layout (API.md): a = batch + contracted + rank,
  # b = batch + rank + output letters, each group in weight-string order.
  w = ''.join(case['weights'])
  bat = [c for c in w if c in case['bat']]
  con = [c for c in w if c in case['con']]
  out = [c for c in w if c in case['out']]
  a = np.asarray(layer.lora.a[...], np.float64)
  b = np.asarray(layer.lora.b[...], np.float64)
  assert a.shape == tuple(size[c] for c in bat + con) + (case['rank'],)
  assert b.shape == tuple(size[c] for c in bat) + (case['rank'],) + tuple(
      size[c] for c in out)
  a_str = ''.join(bat + con) + 'r'
  b_str = ''.join(bat) + 'r' + ''.join(out)
  scale = 1.0 if case['alpha'] is None else case['alpha'] / case['rank']
  kernel = np.asarray(base.kernel[...], np.float64)
  kernel = kernel + scale * np.einsum(f'{a_str},{b_str}->{w}', a, b)
  ref = np.einsum(case['es'], x.astype(np.float64), kernel)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------
# Hypothesis: quantize/dequantize error bounds per method.


@st.composite
def _kernels(draw, max_log=6.0):
  # A few fixed shapes (the XLA compile cache then serves every example);
  # values drawn over twelve orders of magnitude, with zeros sprinkled in.
  shape = draw(st.sampled_from([(32, 32), (64, 96)]))
  seed = draw(st.integers(0, 2**16))
  log_scale = draw(st.floats(-6.0, max_log))
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape) * 10.0**log_scale
  if draw(st.booleans()):  # some exact zeros, a zero channel, a zero block
    w[rng.random(w.shape) < 0.2] = 0.0
    w[:, 0] = 0.0
    w[0, :] = 0.0
  return w.astype(np.float32)


@pytest.mark.parametrize('method,bits', [('int4', 4), ('int8', 8)])
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(w=_kernels())
def test_int_error_bound(method, bits, w):
  qa = pq.quantize(jnp.asarray(w), method)
  got = np.asarray(pq.dequantize(qa), np.float64)
  w64 = w.astype(np.float64)
  amax = np.abs(w64).max(axis=0, keepdims=True)
  scale = np.where(amax > 0, (2 ** (bits - 1) - 1) / np.where(amax > 0, amax,
                                                               1), np.inf)
  bound = 0.5 / scale  # zero channel: bound 0
  slack = 1e-6 * amax
  assert np.all(np.abs(got - w64) <= bound + slack)
  assert not np.isnan(got).any()
  np.testing.assert_array_equal(got[:, amax[0] == 0], 0.0)


@pytest.mark.parametrize('method', ['q4_0', 'q4_0_transpose'])
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(w=_kernels(max_log=4.0))  # float16 d: |max| < 8 * 65504
def test_q4_0_error_bound(method, w):
  qa = pq.quantize(jnp.asarray(w), method)
  got = np.asarray(pq.dequantize(qa), np.float64)
  w64 = w.astype(np.float64)
  # Blocks of 32 along the last axis (Q4_0) or the second-to-last (transpose).
  blocks = w64 if method == 'q4_0' else w64.T
  got_b = got if method == 'q4_0' else got.T
  blocks = blocks.reshape(blocks.shape[0], -1, 32)
  got_b = got_b.reshape(blocks.shape)
  idx = np.abs(blocks).argmax(axis=-1)[..., None]  # first on ties
  m = np.take_along_axis(blocks, idx, axis=-1)
  d = m / -8.0
  d16 = d.astype(np.float16).astype(np.float64)
  err = np.abs(got_b - blocks)
  # Inside the range [-8|d|, 7|d|] (oriented by the sign of d) the error is at
  # most |d|/2 (+ the float16 rounding of d, times |q - 8| <= 8); the values
  # of the opposite sign beyond 7|d| clip, at most |d| away.
  lo = np.minimum(-8 * d, 7 * d)
  hi = np.maximum(-8 * d, 7 * d)
  inside = (blocks >= lo) & (blocks <= hi)
  slack = 8 * np.abs(d16 - d) + 1e-6 * np.abs(d)
  assert np.all(err[inside] <= (np.abs(d) / 2 + slack)[..., 0:1].repeat(
      32, -1)[inside])
  assert np.all(err <= np.abs(d) + slack)
  assert not np.isnan(got).any()


# ---------------------------------------------------------------------------
# No public function mutates its inputs.


def _snapshot(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_same(before, after):
  sb, sa = jax.tree.structure(before), jax.tree.structure(after)
  assert sb == sa, (sb, sa)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _params_calls():
  p = _params_with_lora()
  original, lora = pp.split_params(_params_with_lora())
  fused = pp.fuse_params(_params_with_lora())
  return [
      ('split_params', lambda t: pp.split_params(t), p),
      ('merge_params', lambda t: pp.merge_params(*t), (original, lora)),
      ('fuse_params', lambda t: pp.fuse_params(t, scale=0.5), p),
      ('unfuse_params', lambda t: pp.unfuse_params(*t), (fused, lora)),
  ]


@pytest.mark.parametrize('name', ['split_params', 'merge_params',
                                  'fuse_params', 'unfuse_params'])
def test_params_functions_do_not_mutate(name):
  (fn, tree), = [(f, t) for n, f, t in _params_calls() if n == name]
  before = copy.deepcopy(tree)
  ids = [id(x) for x in jax.tree.leaves(tree)]
  fn(tree)
  _assert_same(before, tree)
  assert [id(x) for x in jax.tree.leaves(tree)] == ids


@pytest.mark.parametrize('method', ['int4', 'q4_0'])
def test_quantize_checkpoint_does_not_mutate(method):
  params = {'Dense_0': {'kernel': np.random.default_rng(0).normal(
      size=(32, 64)).astype(np.float32), 'bias': np.ones(64, np.float32)}}
  before = copy.deepcopy(params)
  _quantize_checkpoint(params, method)
  _assert_same(before, params)
  assert params['Dense_0']['kernel'].dtype == np.float32


@pytest.mark.parametrize('method', ['int4', 'int8', 'sfp8', 'q4_0',
                                    'q4_0_transpose'])
def test_quantization_functions_do_not_mutate(method):
  w = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
  before = w.copy()
  pq.simulate_quantize(w, method)
  if method != 'sfp8':
    pq.dequantize(pq.quantize(w, method))
  np.testing.assert_array_equal(w, before)


def _kernels_of(*layers):
  return [np.array(l.kernel[...], copy=True) for l in layers]


def test_surgery_keeps_other_references_intact():
  """Layers the user still holds keep their type and weights after surgery."""
  model = _MLP()
  up, down = model.up, model.down
  k_before = _kernels_of(up, down)
  surgery.apply_lora(model, rank=2, rngs=nnx.Rngs(0))
  assert type(up) is nnx.Linear and type(down) is nnx.Linear
  assert model.up.wrapped is up  # wrapped, not copied
  _assert_same(k_before, _kernels_of(up, down))
  # Train the adapter a little (non-zero b), then merge: the old base layers
  # and their kernels are not modified (merge_lora's docstring).
  model.up.lora.b[...] = jnp.ones_like(model.up.lora.b[...])
  wrapper = model.up
  a_before = _snapshot(nnx.state(wrapper, nnx.LoRAParam))
  surgery.merge_lora(model)
  _assert_same(k_before, _kernels_of(up, down))
  _assert_same(a_before, _snapshot(nnx.state(wrapper, nnx.LoRAParam)))
  assert type(model.up) is nnx.Linear and model.up is not up


def test_quantize_surgery_keeps_float_layer_intact():
  model = _MLP()
  up = model.up
  k_before = _kernels_of(up)
  surgery.quantize(model, method='int4')
  assert type(up) is nnx.Linear
  _assert_same(k_before, _kernels_of(up))
  surgery.simulate_quantization(_MLP(), method='int4')


def test_simulate_quantization_leaves_kernel_values():
  model = _MLP()
  k_before = _kernels_of(model.up, model.down)
  surgery.simulate_quantization(model, method='int4')
  _assert_same(k_before, _kernels_of(model.up.wrapped, model.down.wrapped))


def _types_and_state(model):
  types = {p: type(m).__name__ for p, m in nnx.iter_graph(model)
           if isinstance(m, nnx.Module)}
  return types, _snapshot(nnx.state(model))


@pytest.mark.parametrize('op', ['apply_lora_bad_kwarg', 'quantize_one_bad'])
def test_failed_surgery_leaves_model_unchanged(op):
  """All replacements are built before the model is touched (docstrings)."""
  model = _MLP(32, 32, 33)  # down: (32, 33), not Q4_0-able
  types, state = _types_and_state(model)
  with pytest.raises((ValueError, TypeError)):
    if op == 'apply_lora_bad_kwarg':
      surgery.apply_lora(model, rank=2, init='bogus', rngs=nnx.Rngs(0))
    else:
      surgery.quantize(model, method='q4_0')  # up is fine, down fails
  types_after, state_after = _types_and_state(model)
  assert types_after == types
  _assert_same(state, state_after)


def test_lora_wrappers_do_not_touch_wrapped():
  base = _linear(8, 4)
  k_before = _kernels_of(base)
  bias_before = np.array(base.bias[...], copy=True)
  nl.LoRALinear(base, rank=2, rngs=nnx.Rngs(0))
  _assert_same(k_before, _kernels_of(base))
  np.testing.assert_array_equal(bias_before, base.bias[...])


def test_linen_apply_does_not_mutate_params():
  layer = _optional('peft', 'LoRADense')(rank=2, wrapped=nn.Dense(3))
  params = jax.tree.map(np.asarray, _linen_init(layer)['params'])
  params = jax.tree.map(lambda x: np.array(x, copy=True), params)
  before = copy.deepcopy(params)
  layer.apply({'params': params}, jnp.ones((2, 4)))
  _assert_same(before, params)


def test_lora_state_and_summary_do_not_mutate():
  model = _lora_mlp()
  before = _snapshot(nnx.state(model))
  surgery.lora_state(model)
  surgery.summary(model)
  surgery.select(model)
  surgery.merge_lora(model, dry_run=True)
  surgery.quantize(model, method='int4', dry_run=True)
  _assert_same(before, _snapshot(nnx.state(model)))


# ---------------------------------------------------------------------------
# Special values: zero, denormal, huge and NaN-containing kernels.

_METHODS = ['int4', 'int8', 'sfp8', 'q4_0', 'q4_0_transpose']


def _special(kind: str) -> np.ndarray:
  w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
  if kind == 'zero':
    return np.zeros_like(w)
  if kind == 'zero_channel':
    w[:, 5] = 0.0
    w[5, :] = 0.0
    return w
  if kind == 'denormal':
    return np.full_like(w, 1e-40)
  if kind == 'huge':
    return np.full_like(w, 1e30)
  if kind == 'nan':
    w[3, 7] = np.nan
    return w
  raise ValueError(kind)


def _sim_and_real(w, method):
  sim = np.asarray(pq.simulate_quantize(jnp.asarray(w), method))
  real = None
  if method != 'sfp8':
    real = np.asarray(pq.dequantize(pq.quantize(jnp.asarray(w), method)))
  return sim, real


@pytest.mark.parametrize('method', _METHODS)
@pytest.mark.parametrize('kind', ['zero', 'zero_channel', 'denormal'])
def test_zero_and_denormal_kernels_give_finite_results(method, kind):
  w = _special(kind)
  for out in _sim_and_real(w, method):
    if out is None:
      continue
    assert np.isfinite(out).all()
    # Zeros stay zero; a denormal-only kernel flushes to (signed) zero or
    # stays within one denormal of itself.
    np.testing.assert_array_equal(out[w == 0], 0.0)
    assert np.all(np.abs(out - w) <= np.abs(w))


@pytest.mark.parametrize('method', ['int4', 'int8', 'sfp8'])
def test_huge_kernel_per_channel_methods_are_exact(method):
  w = _special('huge')
  for out in _sim_and_real(w, method):
    if out is not None:
      np.testing.assert_allclose(out, w, rtol=1e-6)


@pytest.mark.filterwarnings('ignore::RuntimeWarning')  # gguf's own overflow
@pytest.mark.parametrize('method', ['q4_0', 'q4_0_transpose'])
def test_huge_kernel_q4_0_overflows_float16_scale_like_ggml(method):
  """ggml stores d = max/-8 as float16: |max| > 8 * 65504 overflows to inf.

  Same as `gguf.quants` (documented limitation of the format): the block
  dequantizes to +-inf, and to NaN where the code is 8 (0 * inf). Eager
  `quantize` refuses such values (ValueError naming `x` and float16); traced
  `quantize` (no check possible) keeps ggml's bytes.
  """
  gguf = pytest.importorskip('gguf')
  w = _special('huge')[:4]
  w[0, 3] = 3.0  # one ordinary value in a huge block
  w[1] = np.random.default_rng(1).standard_normal(64)  # an ordinary row
  x = w if method == 'q4_0' else w.T.copy()
  with pytest.raises(ValueError, match=r'`x`.*float16'):
    pq.quantize(jnp.asarray(x), method)
  sim = np.asarray(pq.simulate_quantize(jnp.asarray(x), method))
  real = np.asarray(pq.dequantize(
      jax.jit(pq.quantize, static_argnums=1)(jnp.asarray(x), method)))
  ref = gguf.quants.dequantize(
      gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0),
      gguf.GGMLQuantizationType.Q4_0)
  if method == 'q4_0_transpose':
    sim, real = sim.T, real.T
  np.testing.assert_array_equal(sim, ref)
  np.testing.assert_array_equal(real, ref)
  # The ordinary row is not affected: confined to the overflowing blocks.
  assert np.isfinite(sim[1]).all()


def _group(shape, method, i=3, j=1):
  """Mask of the channel (INT*/SFP8: column j) or Q4_0 block holding [i, j]."""
  mask = np.zeros(shape, bool)
  if method == 'q4_0':
    mask[i, (j // 32) * 32:(j // 32) * 32 + 32] = True
  elif method == 'q4_0_transpose':
    mask[(i // 32) * 32:(i // 32) * 32 + 32, j] = True
  else:
    mask[:, j] = True
  return mask


def _nan_paths(method):
  return ['simulate'] + ([] if method == 'sfp8' else ['quantize'])


def _run(w, method, path):
  if path == 'simulate':
    return np.asarray(pq.simulate_quantize(jnp.asarray(w), method))
  # Traced: eager `quantize` refuses non-finite input (see the tests below).
  quantize = jax.jit(pq.quantize, static_argnums=1)
  return np.asarray(pq.dequantize(quantize(jnp.asarray(w), method)))


# (method, path) -> xfail reason. Empty: NaN handling is defined for every
# method and path (peft.quantization module docstring, "Special values").
_NAN_XFAIL: dict[tuple[str, str], str] = {}


def _nan_params():
  out = []
  for method in _METHODS:
    for path in _nan_paths(method):
      reason = _NAN_XFAIL.get((method, path))
      marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
      out.append(pytest.param(method, path, id=f'{method}-{path}',
                              marks=marks))
  return out


@pytest.mark.parametrize('method,path', _nan_params())
def test_nan_is_kept_and_confined_to_its_channel_or_block(method, path):
  """simulate: NaN in -> NaN exactly where it was; never garbage.

  Every other weight, in the NaN's channel (INT4/INT8/SFP8) or block (Q4_0)
  too, is what the kernel with a 0 in place of the NaN gives (scales come
  from the finite values). quantize: integer codes cannot hold NaN, so eager
  `quantize` raises a ValueError naming `x`, the count and the index; traced
  `quantize` stores the code of 0. Checked for two shapes, because XLA's CPU
  max reduction propagates NaN for some shapes and not for others.
  """
  for shape in [(32, 32), (64, 64)]:
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    clean = w.copy()
    w[3, 1] = np.nan
    clean[3, 1] = 0.0
    out, ref = _run(w, method, path), _run(clean, method, path)
    if path == 'simulate':
      assert np.isnan(out[3, 1]), (shape, 'the NaN was dropped', out[3, 1])
    else:
      with pytest.raises(ValueError, match=r'`x`.*1 non-finite.*\(3, 1\)'):
        pq.quantize(jnp.asarray(w), method)
      assert out[3, 1] == 0.0, (shape, out[3, 1])
    keep = np.ones(shape, bool)
    keep[3, 1] = False
    np.testing.assert_array_equal(out[keep], ref[keep], err_msg=str(shape))


@pytest.mark.parametrize('method', _METHODS)
def test_inf_is_confined_to_its_channel_or_block(method):
  """An inf weight stays inf (simulate); the rest is quantized without it.

  As for NaN: the scale of its channel (INT*/SFP8) or block (Q4_0) comes from
  the finite values, so every other weight is what the kernel with a 0 in
  place of the inf gives. Eager `quantize` refuses it; traced, code of 0.
  """
  for path in _nan_paths(method):
    for sign in (1.0, -1.0):
      w = np.random.default_rng(0).standard_normal((64, 64)).astype(
          np.float32)
      clean = w.copy()
      w[3, 1] = sign * np.inf
      clean[3, 1] = 0.0
      out, ref = _run(w, method, path), _run(clean, method, path)
      group = _group(w.shape, method)
      np.testing.assert_array_equal(out[~group], ref[~group])
      keep = np.ones(w.shape, bool)
      keep[3, 1] = False
      np.testing.assert_array_equal(out[keep], ref[keep])
      if path == 'simulate':
        assert out[3, 1] == sign * np.inf, out[3, 1]
      else:
        assert out[3, 1] == 0.0, out[3, 1]
        with pytest.raises(ValueError, match=r'`x`.*1 non-finite'):
          pq.quantize(jnp.asarray(w), method)


@pytest.mark.parametrize('method', _METHODS)
def test_zero_scale_never_spreads_nan_through_layers(method):
  """An all-zero Linear through Simulate/Int4 layers gives zeros, not NaN."""
  lin = nnx.Linear(64, 64, kernel_init=nnx.initializers.zeros,
                   rngs=nnx.Rngs(0))
  x = jnp.ones((2, 64))
  sim_cls = _optional('peft.nnx.quantized', 'SimulateQuantizedLinear')
  y = sim_cls(lin, method=method)(x)
  np.testing.assert_array_equal(np.asarray(y), 0.0)
  if method != 'sfp8':
    int4 = _optional('peft.nnx.quantized', 'Int4Linear').from_float(
        lin, method=method)
    np.testing.assert_array_equal(np.asarray(int4(x)), 0.0)

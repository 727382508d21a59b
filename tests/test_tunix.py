"""tunix's NNX Llama3: LoRA on all seven projections, trained by PeftTrainer.

tunix's attention projections are its own `Einsum` layers (`einsum_str`,
`shape`, kernel `w`), registered lazily by `peft.nnx.registry`; the MLP
projections are `nnx.Linear`. `apply_lora` with the usual projection regex
must wrap all 14 layers of a 2-layer model (not only the 6 MLP ones), and
tunix's `PeftTrainer`, which trains exactly the `nnx.LoRAParam` variables,
must lower the loss while leaving every base parameter bit-identical.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peft.nnx as pnnx

sys.path.insert(0, os.path.dirname(__file__))
from _tunix import WARNING_FILTERS  # noqa: E402
from _tunix import import_tunix  # noqa: E402
from _tunix import tunix_flax_config  # noqa: E402,F401  (autouse fixture)

llama3, peft_trainer = import_tunix('tunix.models.llama3.model',
                                    'tunix.sft.peft_trainer')

pytestmark = WARNING_FILTERS + [
    # PeftTrainer's step calls optax.global_norm (optax warns in optax).
    pytest.mark.filterwarnings(
        'ignore:optax.global_norm is deprecated:DeprecationWarning'),
]

_WHERE = r'.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'


def _model():
  config = llama3.ModelConfig(
      num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64,
      num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=10_000,
      norm_eps=1e-5)
  model = llama3.Llama3(config, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(2), 16))
  for _, layer in nnx.iter_modules(model):  # tunix's MLP starts at zero
    if isinstance(layer, nnx.Linear):
      layer.kernel[...] = 0.2 * jax.random.normal(next(keys),
                                                  layer.kernel.shape)
  return config, model


def _inputs(tokens):
  b, l = tokens.shape
  return {'input_tokens': tokens, 'input_mask': jnp.ones((b, l), jnp.bool_),
          'positions': jnp.broadcast_to(jnp.arange(l), (b, l)),
          'attention_mask': jnp.broadcast_to(
              jnp.tril(jnp.ones((l, l), jnp.bool_)), (b, l, l))}


def test_all_seven_projections_are_wrapped():
  _, model = _model()
  paths = pnnx.apply_lora(model, rank=4, where=_WHERE, dry_run=True)
  expected = sorted(f'layers/{i}/{block}/{name}' for i in range(2)
                    for block, names in (('attn', 'qkvo'),
                                         ('mlp', ('gate', 'up', 'down')))
                    for name in [f'{n}_proj' for n in names])
  assert sorted(paths) == expected
  pnnx.apply_lora(model, rank=4, where=_WHERE, rngs=nnx.Rngs(1))
  q = model.layers[0].attn.q_proj
  assert isinstance(q, pnnx.LoRA) and q.lora.a.shape == (32, 4)
  assert q.lora.b.shape == (4, 4, 8) and q.shape == (32, 4, 8)
  o = model.layers[0].attn.o_proj
  assert o.lora.a.shape == (4, 8, 4) and o.lora.b.shape == (4, 32)


def test_tunix_einsum_lora_matches_dense_reference():
  _, model = _model()
  layer = model.layers[0].attn.q_proj
  w = layer.w[...]
  wrapped = pnnx.LoRA(layer, rank=3, alpha=6.0,
                      b_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 5, 32))
  delta = jnp.einsum('dr,rnh->dnh', wrapped.lora.a[...], wrapped.lora.b[...])
  ref = jnp.einsum('BTD,DNH->BTNH', x, w + 2.0 * delta,
                   precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(wrapped(x), ref, rtol=2e-5, atol=2e-5)


def test_peft_trainer_fine_tunes_only_the_adapters():
  config, model = _model()
  pnnx.apply_lora(model, rank=4, alpha=8.0, where=_WHERE, rngs=nnx.Rngs(1))
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  base_before = jax.tree.map(np.array, nnx.state(model, base))
  rng = np.random.default_rng(0)
  batch = peft_trainer.TrainingInput(
      input_tokens=jnp.asarray(rng.integers(0, config.vocab_size, (4, 16)),
                               jnp.int32),
      input_mask=jnp.ones((4, 16), jnp.bool_))

  def gen_model_input(x):
    return _inputs(x.input_tokens)

  loss = lambda: float(peft_trainer._default_loss_fn(  # pylint: disable=protected-access
      model, **gen_model_input(batch)))
  trainer = peft_trainer.PeftTrainer(
      model, optax.adam(1e-2),
      peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=10,
                                  pbar_description=None),
  ).with_gen_model_input_fn(gen_model_input)
  loss0 = loss()
  trainer.train([batch] * 10)
  assert trainer.train_steps == 10
  assert loss() < loss0 - 0.05, (loss0, loss())
  after = nnx.state(model, base)
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, np.asarray(b))

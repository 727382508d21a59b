"""What an adapter records of its base: fingerprints and array checksums.

`load_adapter` compares the recorded fingerprint (paths, shapes, dtypes and a
sampled checksum of the wrapped layers' variables) with the base it loads
onto, and warns (`BaseMismatchWarning`) or raises when they differ; sha256
digests of the saved arrays detect damaged files.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from peft.checkpoint._orbax import Path
from peft.checkpoint._orbax import _flat
from peft.checkpoint._orbax import _norm
from peft.checkpoint._orbax import _shape_dtype
from peft.checkpoint._orbax import _show
from peft.checkpoint.config import _json_key

__all__ = ['BaseMismatchWarning']


class BaseMismatchWarning(UserWarning):
  """`load_adapter` found a base model that differs from the adapter's base.

  The adapter's `adapter_config.json` records a fingerprint of the layers it
  was trained on (paths, shapes, dtypes and a checksum of a sample of their
  values); loading onto a base whose fingerprint differs issues this warning
  (or raises `ValueError` with `strict=True`). Filter it by class.

  Examples:
    >>> issubclass(BaseMismatchWarning, UserWarning)
    True
  """


_SAMPLE = 1024  # values per array in the base fingerprint's checksum


def _sample_checksum(x: Any) -> float | None:
  """float64 weighted sum of a strided sample of `x` (None if abstract)."""
  if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, 'shape'):
    return None
  n = int(np.prod(x.shape, dtype=np.int64))
  if n == 0:
    return 0.0
  stride = max(1, n // _SAMPLE)
  try:
    if isinstance(x, jax.Array) and not (
        len(x.devices()) == 1 and next(iter(x.devices())).platform == 'cpu'
    ):
      # Sample on the device: only ~1024 values travel to the host.
      sample = np.asarray(jax.device_get(jax.numpy.ravel(x)[::stride]))
    else:  # numpy, or a CPU array numpy reads without a copy
      sample = np.ravel(np.asarray(x))[::stride]
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None  # traced: no values
  values = sample.astype(np.float64)
  values = np.where(np.isfinite(values), values, 0.0)
  weights = 1.0 + np.arange(values.size) % 7
  with np.errstate(over='ignore', invalid='ignore'):
    total = float(np.sum(values * weights))
  return total if np.isfinite(total) else None  # None: not compared


def _fingerprint(path: Path, layer: Any) -> list[dict[str, Any]]:
  """Paths, shapes, dtypes and checksums of the variables of a base layer."""
  from peft.nnx.lora import LoRAScale  # pylint: disable=g-import-not-at-top

  # Every variable of the base layer (float kernels and biases, quantized
  # storage and scales), not the adapter's and not RNG state.
  state = nnx.state(layer, nnx.Not(nnx.Any(nnx.LoRAParam, LoRAScale,
                                           nnx.RngState)))
  out = []
  for sub, leaf in sorted(_flat(nnx.to_pure_dict(state)).items(),
                          key=lambda kv: _norm(kv[0])):
    shape, dtype = _shape_dtype(leaf)
    out.append({
        'path': [_json_key(k) for k in tuple(path) + tuple(sub)],
        'shape': list(shape),
        'dtype': dtype,
        'checksum': _sample_checksum(leaf),
    })
  return out


def _fingerprint_diff(saved: list[dict[str, Any]],
                      current: list[dict[str, Any]]) -> list[str]:
  want = {_norm(tuple(e['path'])): e for e in saved}
  have = {_norm(tuple(e['path'])): e for e in current}
  diffs = []
  for k in sorted(want.keys() - have.keys()):
    diffs.append(f'{_show(k)}: in the adapter\'s base, not in this one')
  for k in sorted(have.keys() - want.keys()):
    diffs.append(f'{_show(k)}: in this base, not in the adapter\'s')
  for k in sorted(want.keys() & have.keys()):
    w, h = want[k], have[k]
    if (w.get('shape'), w.get('dtype')) != (h['shape'], h['dtype']):
      diffs.append(f'{_show(k)}: adapter\'s base {w.get("dtype")}'
                   f'{w.get("shape")}, this base {h["dtype"]}{h["shape"]}')
    elif (isinstance(w.get('checksum'), (int, float))
          and h.get('checksum') is not None
          and not np.isclose(w['checksum'], h['checksum'], rtol=1e-9,
                             atol=1e-30)):
      diffs.append(f'{_show(k)}: values differ (checksum {w["checksum"]!r}'
                   f' saved, {h["checksum"]!r} now)')
  return diffs


def _leaf_digest(x: Any) -> str:
  a = np.ascontiguousarray(np.asarray(x))
  h = hashlib.sha256()
  h.update(f'{a.dtype.str}{a.shape}'.encode())
  h.update(a.tobytes())
  return 'sha256:' + h.hexdigest()


def _digests(tree: Any) -> dict[str, str]:
  return {_show(p): _leaf_digest(v) for p, v in _flat(tree).items()}

"""Every public name (each `__all__`) exists and has its own docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import peft


def _modules():
  names = ['peft']
  for info in pkgutil.walk_packages(peft.__path__, 'peft.'):
    if info.name.split('.')[-1].startswith('_') or info.name == 'peft.demo':
      continue
    names.append(info.name)
  return names


@pytest.mark.parametrize('module_name', _modules())
def test_every_public_name_has_a_docstring(module_name):
  module = importlib.import_module(module_name)
  assert module.__doc__ and module.__doc__.strip(), module_name
  missing = []
  for name in getattr(module, '__all__', ()):
    obj = getattr(module, name)  # AttributeError: listed but missing
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
      continue
    doc = obj.__dict__.get('__doc__') if inspect.isclass(obj) else obj.__doc__
    if not (doc and doc.strip()):
      missing.append(name)
  assert not missing, f'{module_name}: no docstring on {missing}'


def test_wrapper_classes_document_themselves():
  import peft.nnx as pnnx
  for cls in (pnnx.LoRALinear, pnnx.LoRAEinsum, pnnx.LoRALinearGeneral,
              pnnx.LoRA, pnnx.LoRAAdapter):
    assert cls.__doc__ and 'Examples' in cls.__doc__, cls

"""Runs the examples in the docstrings of every peft module (doctest)."""

import doctest
import importlib
import pkgutil

import pytest

import peft

_MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(peft.__path__, 'peft.')
    if name != 'peft.__main__'
)


@pytest.mark.parametrize('name', _MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS
                           | doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0, f'{result.failed} doctest(s) failed in {name}'


def test_public_modules_have_examples():
  total = sum(
      len([t for t in doctest.DocTestFinder().find(importlib.import_module(n))
           if t.examples]) for n in _MODULES)
  assert total >= 40

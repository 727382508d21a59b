"""Every ```python block of README.md and docs/*.md runs, in page order.

Blocks of one page share a namespace, so a page reads like a session: later
blocks use what earlier ones defined. A block whose info string is
```python skip-test``` is not run (none should need it).
"""

import pathlib
import re

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PAGES = [_ROOT / 'README.md'] + sorted((_ROOT / 'docs').glob('*.md'))
_BLOCK = re.compile(r'^```python[ \t]*([^\n]*)\n(.*?)^```', re.M | re.S)


def _blocks(page):
  return [(m.group(2), m.group(1).strip()) for m in
          _BLOCK.finditer(page.read_text())]


@pytest.mark.parametrize('page', _PAGES, ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  namespace = {'__name__': f'docs_{page.stem}'}
  for i, (code, info) in enumerate(_blocks(page)):
    if 'skip-test' in info:
      continue
    try:
      exec(compile(code, f'{page.name}[block {i}]', 'exec'), namespace)
    except Exception as e:  # pragma: no cover - the message is the point
      raise AssertionError(
          f'{page.name}, python block {i} failed: {e!r}\n---\n{code}') from e


def test_every_page_has_runnable_examples():
  for page in _PAGES[1:]:
    if page.name == 'api.md':  # generated from the docstrings (doctested)
      continue
    assert _blocks(page), f'{page.name} has no python example'

"""The bad-input table shared by the tests/test_hardening*.py files.

Each file lists `Bad` rows (a call, the exception classes it may raise, the
strings its message must name) and runs them with `check_bad`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest


@dataclasses.dataclass(frozen=True)
class Bad:
  """One bad call: `fn()` raises one of `exc` naming every string in `names`."""

  id: str
  fn: Callable[[], Any]
  names: tuple[str, ...]
  exc: tuple[type, ...] = (ValueError, TypeError)
  xfail: str | None = None


def param(case: Bad):
  """`case` as a pytest parameter with its id (strict xfail if it has one)."""
  marks = ()
  if case.xfail:
    marks = (pytest.mark.xfail(strict=True, reason=case.xfail),)
  return pytest.param(case, id=case.id, marks=marks)


def check_bad(case: Bad) -> None:
  """`case.fn()` raises one of `case.exc` whose message names `case.names`."""
  with pytest.raises(case.exc) as info:
    case.fn()
  message = str(info.value)
  for name in case.names:
    assert name in message, (
        f'{case.id}: {type(info.value).__name__} message does not name'
        f' {name!r}: {message}')

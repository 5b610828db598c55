"""The vocabulary of config rules: each registry (data, models, objectives and every objective
module, sampling, parallel) states what its fields accept with these constructors, and
`config.validate` applies them (kdiff_jax/schema.py holds the fields and their defaults).

  Rule           a predicate with the words that say what it accepts ("one of [...]", "> 0")
  one_of(...)    a value from a fixed list
  number(...)    a finite int or float within bounds (integer=True: an int)
  boolean()      True or False
  text()         a string
  sequence(...)  a tuple of entries that each pass a rule
  interval(...)  a pair (lo, hi) with lo <= hi (or lo < hi)
"""
import dataclasses
import math
from typing import Any, Callable

@dataclasses.dataclass(frozen=True)
class Rule:
  """accepts(value) -> bool; `text` completes "must be ..." in the error message."""

  accepts: Callable[[Any], bool]
  text: str

  def __call__(self, value) -> bool:
    try:
      return bool(self.accepts(value))
    except (TypeError, ValueError):
      return False


def one_of(*allowed) -> Rule:
  return Rule(lambda v: any(v == a and type(v) is type(a) for a in allowed),
              f"one of {list(allowed)}")


def _is_number(value, integer: bool, finite: bool) -> bool:
  if isinstance(value, bool):
    return False
  if integer:
    return isinstance(value, int)
  return isinstance(value, (int, float)) and not math.isnan(value) and (
      math.isfinite(value) or not finite)


def number(low=None, high=None, *, low_open: bool = False, high_open: bool = False,
           integer: bool = False, finite: bool = True, note: str = "") -> Rule:
  """A finite number (an int if integer; +-inf allowed if not finite) in [low, high]; open ends
  where low_open / high_open."""
  def accepts(v):
    return (_is_number(v, integer, finite)
            and (low is None or (v > low if low_open else v >= low))
            and (high is None or (v < high if high_open else v <= high)))
  kind = "an int" if integer else ("a finite number" if finite else "a number (inf allowed)")
  if low is not None and high is not None:
    bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  elif low is not None:
    bounds = f" {'>' if low_open else '>='} {low:g}"
  elif high is not None:
    bounds = f" {'<' if high_open else '<='} {high:g}"
  else:
    bounds = ""
  return Rule(accepts, kind + bounds + (f" ({note})" if note else ""))


def boolean() -> Rule:
  return Rule(lambda v: isinstance(v, bool), "True or False")


def text() -> Rule:
  return Rule(lambda v: isinstance(v, str), "a string")


def sequence(item: Rule, *, length: int | None = None, min_length: int = 0) -> Rule:
  """A tuple whose entries each pass `item` (of exactly `length` entries, if given)."""
  def accepts(v):
    return (isinstance(v, tuple) and (length is None or len(v) == length)
            and len(v) >= min_length and all(item(x) for x in v))
  size = f"{length} " if length is not None else (f"at least {min_length} " if min_length else "")
  return Rule(accepts, f"a tuple of {size}entries, each {item.text}")


def interval(item: Rule, *, strict: bool = False) -> Rule:
  """A pair (lo, hi) of `item`s with lo <= hi (lo < hi if strict)."""
  def accepts(v):
    return (isinstance(v, tuple) and len(v) == 2 and item(v[0]) and item(v[1])
            and (v[0] < v[1] if strict else v[0] <= v[1]))
  return Rule(accepts, f"a pair (lo, hi) with lo {'<' if strict else '<='} hi, each {item.text}")

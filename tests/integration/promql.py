"""The expressions of a PromQL condition that must return data, for testing alerts against a live cluster.

An alert's `expr` is a condition: it returns nothing while all is well, so "it returned
no data" cannot tell a healthy cluster from a misspelt metric. `operands` takes the
condition apart and returns the expressions that MUST return data:

- split at top-level `or`, then at top-level `and` / `unless` (lowest precedence first);
- split each part at a top-level comparison (`==`, `!=`, `>`, `<`, `>=`, `<=`), dropping
  the `bool`, `on(...)`/`ignoring(...)` and `group_left(...)`/`group_right(...)` modifiers;
- a part wholly inside parentheses is unwrapped and split again.

"Top level" means outside (), [], {} and string literals, so label matchers (`=`, `!=`,
`=~`) and aggregation clauses are never cut. Arithmetic (`time() - x`, `3 * y`) is kept
whole: it is evaluated as one expression. Every returned operand must yield a scalar or
a non-empty vector from a live cluster; the test evaluates them with /api/v1/query.
"""

from __future__ import annotations

import re

_OR = re.compile(r"\bor\b")
_AND = re.compile(r"\b(?:and|unless)\b")
_CMP = re.compile(r"==|!=|>=|<=|>|<")
_MODIFIERS = re.compile(
    r"^\s*(?:bool\b)?\s*(?:(?:on|ignoring)\s*\([^)]*\))?\s*(?:(?:group_left|group_right)\s*(?:\([^)]*\))?)?"
)
_OPEN, _CLOSE = "([{", ")]}"


def _top_level(expr: str) -> list[bool]:
    """For each character: is it outside brackets and string literals?"""
    out, depth, quote, escaped = [], 0, None, False
    for ch in expr:
        if quote:
            out.append(False)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'`":
            quote = ch
            out.append(False)
        elif ch in _OPEN:
            out.append(False)
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in {expr!r}")
            out.append(False)
        else:
            out.append(depth == 0)
    if depth or quote:
        raise ValueError(f"unbalanced brackets or quotes in {expr!r}")
    return out


def split_top(expr: str, pattern: re.Pattern) -> list[str]:
    """`expr` cut at every top-level match of `pattern` (the matches dropped), parts stripped."""
    mask = _top_level(expr)
    parts, start = [], 0
    for m in pattern.finditer(expr):
        if all(mask[m.start() : m.end()]) and m.start() >= start:
            parts.append(expr[start : m.start()])
            start = m.end()
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def _unwrap(expr: str) -> str | None:
    """The inside of `( ... )` when the parentheses enclose the whole expression, else None."""
    e = expr.strip()
    if not (e.startswith("(") and e.endswith(")")):
        return None
    depth = 0
    for i, ch in enumerate(e):  # the first "(" must close at the very end
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(e) - 1:
            return None
    return e[1:-1]


def operands(expr: str) -> list[str]:
    """The expressions inside condition `expr` that must return data (see the module docstring)."""
    out: list[str] = []
    for part in split_top(expr, _OR):
        for sub in split_top(part, _AND):
            sub = _MODIFIERS.sub("", sub, count=1).strip()
            sides = split_top(sub, _CMP)
            if len(sides) == 1:
                inner = _unwrap(sub)
                out.extend(operands(inner) if inner is not None else [sub])
                continue
            for side in sides:
                side = _MODIFIERS.sub("", side, count=1).strip()
                if not side:
                    raise ValueError(f"empty operand in {expr!r}")
                inner = _unwrap(side)
                out.extend(operands(inner) if inner is not None else [side])
    return out

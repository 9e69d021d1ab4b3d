"""Label and field selectors as kube-apiserver parses them from query strings.

Label selector grammar (set-based, `k8s.io/apimachinery/pkg/labels`): requirements separated by
commas; each is `key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`, `key`
(exists) or `!key` (does not exist). `!=` and `notin` also match objects without the key, as on a
real server. Field selectors support `=`, `==` and `!=` on the fields a resource declares.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    """The client sent a selector the server cannot parse (HTTP 400)."""


_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_REQUIREMENT = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s*\(([^)]*)\)\s*$")
_EQUALITY_REQUIREMENT = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*$")
_EXISTS_REQUIREMENT = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


@dataclass(frozen=True)
class _Requirement:
    key: str
    operator: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!exists":
            return self.key not in labels
        if self.operator == "in":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def parse_label_selector(text: str | None) -> Callable[[Mapping[str, str]], bool]:
    """Compile a label selector into a predicate over an object's labels."""
    if not text or not text.strip():
        return lambda labels: True
    requirements: list[_Requirement] = []
    for part in _split_top_level(text):
        if match := _SET_REQUIREMENT.match(part):
            values = frozenset(v.strip() for v in match.group(4).split(",") if v.strip())
            if not values:
                raise SelectorError(f"unable to parse requirement: {part!r}: values set can't be empty")
            requirements.append(_Requirement(match.group(1), match.group(3), values))
        elif match := _EQUALITY_REQUIREMENT.match(part):
            operator = "notin" if match.group(3) == "!=" else "in"
            requirements.append(_Requirement(match.group(1), operator, frozenset([match.group(4)])))
        elif match := _EXISTS_REQUIREMENT.match(part):
            requirements.append(_Requirement(match.group(2), "!exists" if match.group(1) else "exists", frozenset()))
        else:
            raise SelectorError(f"unable to parse requirement: {part!r}")
    return lambda labels: all(requirement.matches(labels) for requirement in requirements)


_FIELD_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9.]+)\s*(==|=|!=)\s*(.*?)\s*$")


def parse_field_selector(
    text: str | None, supported_fields: Mapping[str, Callable[[dict[str, Any]], str]]
) -> Callable[[dict[str, Any]], bool]:
    """Compile a field selector into a predicate over a whole object."""
    if not text or not text.strip():
        return lambda obj: True
    checks: list[Callable[[dict[str, Any]], bool]] = []
    for part in text.split(","):
        match = _FIELD_REQUIREMENT.match(part)
        if not match:
            raise SelectorError(f"invalid selector: {text!r}; can't understand {part!r}")
        field, operator, value = match.groups()
        if field not in supported_fields:
            raise SelectorError(f'field label not supported: {field}')
        getter = supported_fields[field]
        if operator == "!=":
            checks.append(lambda obj, getter=getter, value=value: getter(obj) != value)
        else:
            checks.append(lambda obj, getter=getter, value=value: getter(obj) == value)
    return lambda obj: all(check(obj) for check in checks)

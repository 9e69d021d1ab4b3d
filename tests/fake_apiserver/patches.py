"""PATCH bodies: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

Strategic merge patch is applied as a merge patch: lists are replaced, not merged by their
patch-merge key, and `$patch` directives are not understood (a documented deviation).
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """The patch cannot be applied (HTTP 422 for JSON patch, 400 for malformed bodies)."""


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer_tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer {pointer!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _parent(document: Any, tokens: list[str]) -> Any:
    node = document
    for token in tokens[:-1]:
        if isinstance(node, list):
            node = node[int(token)]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise PatchError(f"path /{'/'.join(tokens)} does not exist")
    return node


def json_patch(document: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    result = copy.deepcopy(document)
    for operation in operations:
        op, tokens = operation.get("op"), _pointer_tokens(operation.get("path", ""))
        if not tokens:
            raise PatchError("JSON patch on the whole document is not supported")
        try:
            parent, last = _parent(result, tokens), tokens[-1]
            if op == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
                if current != operation.get("value"):
                    raise PatchError(f"test operation failed at {operation['path']}")
            elif op == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif op in ("add", "replace"):
                value = copy.deepcopy(operation.get("value"))
                if isinstance(parent, list):
                    if last == "-":
                        parent.append(value)
                    elif op == "add":
                        parent.insert(int(last), value)
                    else:
                        parent[int(last)] = value
                else:
                    if op == "replace" and last not in parent:
                        raise PatchError(f"replace operation does not apply: doc is missing key {operation['path']}")
                    parent[last] = value
            else:
                raise PatchError(f"unsupported JSON patch operation {op!r}")
        except (KeyError, IndexError, ValueError, TypeError) as error:
            if isinstance(error, PatchError):
                raise
            raise PatchError(f"cannot apply {op} at {operation.get('path')}: {error}") from error
    return result

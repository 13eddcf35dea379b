"""The OpenAPI description in ``docs/openapi.yaml``, loaded for the tests that check and fuzz it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SPEC_PATH = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return spec


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow ``$ref`` (local JSON pointers) until a node without one."""
    for _ in range(20):
        if not (isinstance(node, dict) and "$ref" in node):
            return node
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    raise AssertionError(f"$ref chain too long at {node}")


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) for every operation in the description."""
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]

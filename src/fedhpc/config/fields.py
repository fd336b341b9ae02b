"""The field helper every typed config uses (documentation and JSON-Schema constraints per field)."""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def opt(default: Any = MISSING, doc: str = "", **schema: Any) -> Any:
    """A dataclass field with its documentation and extra JSON-Schema constraints."""
    meta = {"doc": doc, "schema": schema}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    if isinstance(default, type) and hasattr(default, "__dataclass_fields__"):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)

"""Rules that the pydantic models and the API server both enforce, each declared once.

pydantic constraints (`ge`, `le`, `max_length`, `pattern`, enums) become OpenAPI keywords in the
generated CRD by themselves. What OpenAPI cannot say (a rule across fields, the sign of a quantity,
an object name's form) is an `Invariant`: a Python predicate for pydantic beside the CEL rule the
CRD carries, with one message for both. `{field}` in a message stands for the field's path
(`spec.gpu.memory`); the CRD generator fills it in, pydantic names the field in the error location.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Invariant:
    """A rule over one schema node: `holds` for pydantic, `cel` for the API server."""

    # False when the value breaks the rule; it may instead raise ValueError with a message more
    # precise than `message` (pydantic shows the value, CEL only knows the rule).
    holds: Callable[[Any], bool]
    cel: str
    message: str
    field_path: str | None = None  # the field to blame, relative to the node (".memory")
    reason: str = "FieldValueInvalid"

    def check(self, value: Any) -> Any:
        """Return `value`, or raise ValueError with the rule's message when it breaks the rule."""
        if not self.holds(value):
            raise ValueError(self.message.replace("{field}", "the value"))
        return value

    def to_schema(self) -> dict[str, str]:
        """The x-kubernetes-validations entry."""
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        out["reason"] = self.reason
        return out


def validations(*invariants: Invariant) -> dict[str, Any]:
    """The JSON-schema extra that carries `invariants` into the CRD."""
    return {"x-kubernetes-validations": [inv.to_schema() for inv in invariants]}


def check_all(value: Any, invariants: tuple[Invariant, ...]) -> None:
    """Check every invariant, raising on the first that fails."""
    for inv in invariants:
        inv.check(value)

"""Kubernetes quantities and Go-style durations, parsed without any Kubernetes library."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal, InvalidOperation

# The suffixes Kubernetes accepts in a resource.Quantity (k8s.io/apimachinery/pkg/api/resource).
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
# The pattern Kubernetes publishes for quantities in its OpenAPI schemas.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# The same without a minus sign: a quantity of zero or more.
UNSIGNED_QUANTITY_PATTERN = QUANTITY_PATTERN.replace(r"^(\+|-)?", r"^\+?", 1)
# A quantity whose number has a digit other than 0: together with the pattern above, more than
# zero. The number ends where the suffix or exponent begins, so the digit is in the number.
NONZERO_QUANTITY_PATTERN = r"^\+?[0-9.]*[1-9]"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_NUMBER_SUFFIX_RE = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)$")

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"
_DURATION_RE = re.compile(DURATION_PATTERN)
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_quantity(value: int | str) -> Decimal:
    """Return a Kubernetes quantity ("24Gi", "500M", 1024) as a Decimal number of base units."""
    if isinstance(value, bool):
        raise ValueError(f"expected a Kubernetes quantity such as 24Gi, got {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    # Whole-string match, no trimming: the API server's pattern (RE2) refuses "24Gi " and "24Gi\n".
    text = str(value)
    if not _QUANTITY_RE.fullmatch(text):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity; use a number with an optional suffix "
            "such as 24Gi, 16000Mi or 20G"
        )
    match = _NUMBER_SUFFIX_RE.match(text)
    assert match is not None  # the pattern above guarantees a leading number
    number, suffix = match.groups()
    try:
        base = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid numbers
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from exc
    if suffix in _BINARY:
        return base * _BINARY[suffix]
    if suffix in _DECIMAL:
        return base * _DECIMAL[suffix]
    return base * (Decimal(10) ** int(suffix[1:]))  # an exponent such as e9


def quantity_to_mib(value: int | str) -> int:
    """Bytes given as a quantity, rounded up to whole MiB (GPU memory is reported in MiB)."""
    exact = parse_quantity(value) / (2**20)
    whole = int(exact)
    return whole if whole == exact else whole + 1


def parse_duration(value: str) -> float:
    """Return a Go-style duration ("90s", "30m", "1h30m") in seconds."""
    text = value
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(
            f"{value!r} is not a duration; use a number with a unit, such as 90s, 30m or 1h30m"
        )
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART_RE.findall(text))


def format_duration(value: timedelta | float) -> str:
    """A duration the way `parse_duration` reads it, to whole seconds: 45s, 2m30s, 1h5m."""
    seconds = round(value.total_seconds() if isinstance(value, timedelta) else value)
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts) or "0s"

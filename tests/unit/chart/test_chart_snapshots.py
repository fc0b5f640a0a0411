"""Snapshots of the rendered chart for a few value sets, so every change to the output is seen.

A chart change that alters the output fails here until the snapshots are re-rendered with
`make chart-snapshots` and the diff is reviewed and committed with the change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from chart_helpers import VALUE_SETS

SNAPSHOTS = Path(__file__).parent / "snapshots"
SNAPSHOT_SETS = ["default", "restricted", "namespaced", "models"]
# The agent token is random per render (a fresh install generates one).
_TOKEN = re.compile(r"^(  token: ).*$", re.MULTILINE)


def normalize(manifest: str) -> str:
    return _TOKEN.sub(r"\1<generated>", manifest)


@pytest.mark.parametrize("name", SNAPSHOT_SETS)
def test_rendered_chart_matches_snapshot(render_text: Callable[..., str], name: str) -> None:
    # As on an upgrade, where the API server already serves ModelDeployments.
    rendered = normalize(
        render_text(VALUE_SETS[name], "--api-versions", "modelfleet.io/v1alpha1/ModelDeployment")
    )
    path = SNAPSHOTS / f"{name}.yaml"
    if os.environ.get("MODELFLEET_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(rendered)
    assert path.is_file(), f"no snapshot {path.name}: run `make chart-snapshots`"
    assert rendered == path.read_text(), (
        f"the chart renders differently for value set {name!r}: review the change, then run "
        "`make chart-snapshots` and commit tests/unit/chart/snapshots/"
    )


def test_token_is_normalized() -> None:
    assert normalize("data:\n  token: c2VjcmV0\n") == "data:\n  token: <generated>\n"

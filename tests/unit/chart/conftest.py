"""Fixtures for the chart tests: the helm binary, rendering value sets, the hack/ generators."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import CHART, HACK, NAMESPACE, RELEASE, Render

# The generators under hack/ are scripts, not a package: make them importable for their tests.
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))


def find_helm() -> str | None:
    """helm from MODELFLEET_HELM, else the control-plane build cache (hack/build-control-plane.sh).

    In CI (CI=true) a missing helm is built like every other control-plane binary; elsewhere the
    chart tests are skipped with a message that says how to get it.
    """
    if env := os.environ.get("MODELFLEET_HELM"):
        return env
    script = [str(HACK / "build-control-plane.sh")]
    if os.environ.get("CI") != "true":
        script.append("--cached-only")
    proc = subprocess.run(script, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"building the control-plane binaries failed:\n{proc.stderr}")
        return shutil.which("helm")
    helm = Path(proc.stdout.strip().splitlines()[-1]) / "helm"
    return str(helm) if helm.is_file() else None


@pytest.fixture(scope="session")
def helm() -> str:
    found = find_helm()
    if not found:
        message = "helm is not built yet: run hack/build-control-plane.sh (or set MODELFLEET_HELM)"
        if os.environ.get("CI"):
            # `make test` builds helm first; in CI a missing helm is a broken set-up, not a skip.
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def render_text(helm: str) -> Callable[..., str]:
    """`helm template` of the chart with the given values; fails the test on a helm error.

    Renders are cached for the session (the chart does not change while the tests run).
    """

    cache: dict[str, str] = {}

    def render(values: dict[str, Any] | None = None, *extra: str) -> str:
        key = json.dumps([values, extra], sort_keys=True)
        if key not in cache:
            cache[key] = render_uncached(values, *extra)
        return cache[key]

    def render_uncached(values: dict[str, Any] | None, *extra: str) -> str:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        args += ["--values", "-"] if values else []
        proc = subprocess.run(
            [helm, *args, *extra],
            input=json.dumps(values or {}),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return render


@pytest.fixture(scope="session")
def render(render_text: Callable[..., str]) -> Render:
    """The rendered objects of `helm template` with the given values."""

    def objects(values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
        return [doc for doc in yaml.safe_load_all(render_text(values, *extra)) if doc]

    return objects

"""The Dockerfile passes hadolint and builds the image the chart expects.

No container engine runs on the machines the tests run on, so the image is not built here: the
Dockerfile is linted, its shape checked, and its install step (pip wheel + install with the pins)
is what `make install` does too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> Path:
    version = re.search(r"^HADOLINT_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert version, "the Makefile names no HADOLINT_VERSION"
    binary = ROOT / ".tools" / f"hadolint-{version[1]}" / "bin" / "hadolint"
    assert binary.is_file(), f"{binary.relative_to(ROOT)} is missing: run `make lint-dockerfile`"
    return binary


def test_hadolint_finds_nothing() -> None:
    proc = subprocess.run(
        [str(hadolint()), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_problem(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kopf\n")
    proc = subprocess.run(
        [str(hadolint()), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # latest tag


def test_multi_stage_non_root_single_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert len(stages) == 2
    assert stages[0][1] == "builder"
    assert "--constraint constraints.txt" in text
    assert re.search(r"^COPY --from=builder /opt/modelfleet /opt/modelfleet$", text, re.M)
    user = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    assert len(user) == 1
    assert int(user[0][0]) > 0
    assert re.search(r'^ENTRYPOINT \["modelfleet"\]$', text, re.M)
    # The chart runs the image as the same numeric user.
    values = yaml.safe_load((ROOT / "charts" / "modelfleet" / "values.yaml").read_text())
    for component in ("operator", "agent", "gateway"):
        assert values[component]["podSecurityContext"]["runAsUser"] == int(user[0][0])


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[1] == "*"
    assert {"!pyproject.toml", "!constraints.txt", "!README.md", "!operator/"} <= set(lines)

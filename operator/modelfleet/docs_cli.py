"""`modelfleet docs`: write the documentation pages generated from code."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelfleet.settings import render_configuration_doc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="docs", help="docs folder (default: docs)")


def run(args: argparse.Namespace) -> int:
    Path(args.dir, "configuration.md").write_text(render_configuration_doc(), encoding="utf-8")
    return 0

"""`modelfleet crd`: print the generated CRD, or write it to a file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelfleet.api.crd import render_crd_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", action="append", default=[], help="write to this file (repeatable)"
    )


def run(args: argparse.Namespace) -> int:
    text = render_crd_yaml()
    if not args.output:
        sys.stdout.write(text)
    for path in args.output:
        Path(path).write_text(text, encoding="utf-8")
    return 0

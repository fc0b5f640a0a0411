"""The stand-in's weight download: what vLLM writes to the Hugging Face cache before it loads.

vLLM (through huggingface_hub) downloads a model into `$HF_HOME/hub/models--<org>--<name>` and
reads it back from there on the next start. The stand-in writes a small marker in the same place,
so that a cache volume the replica cannot write fails the start as it does for vLLM
(`PermissionError`), and a test can see which replicas wrote through a shared cache. Without
HF_HOME (a stand-in started by hand or by a test) nothing is written.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path

SNAPSHOT = "sim"


def model_cache_dir(hf_home: str, model: str) -> Path:
    """Where huggingface_hub keeps `model` under HF_HOME."""
    return Path(hf_home) / "hub" / ("models--" + model.replace("/", "--"))


def fetch_weights(model: str, env: Mapping[str, str], instance: str) -> str:
    """Download `model` into the cache unless it is there; says which. Raises OSError (as
    vLLM's download does) when the cache cannot be written."""
    hf_home = env.get("HF_HOME")
    if not hf_home:
        return "no HF_HOME: nothing cached"
    snapshot = model_cache_dir(hf_home, model) / "snapshots" / SNAPSHOT
    marker = snapshot / "config.json"
    if marker.is_file():
        return f"found in the cache at {snapshot}"
    snapshot.mkdir(parents=True, exist_ok=True)
    # Written whole under a temporary name, then renamed: two replicas sharing the cache never
    # read half a file.
    partial = snapshot / f".config.json.{os.getpid()}.incomplete"
    # The host name: in a Pod, its name (the test tells the replicas apart by it).
    partial.write_text(json.dumps({"host": socket.gethostname(), "instance": instance}) + "\n")
    partial.replace(marker)
    return f"downloaded into {snapshot}"

"""The stand-in writes to the Hugging Face cache as vLLM's download does."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from modelfleet.sim.vllm.weights import fetch_weights, model_cache_dir


def test_downloaded_once_then_found_in_the_cache(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf")}
    first = fetch_weights("google/gemma-3-4b-it", env, "gemma-instance-1")
    assert first.startswith("downloaded into")
    cached = model_cache_dir(env["HF_HOME"], "google/gemma-3-4b-it")
    assert cached == tmp_path / "hf" / "hub" / "models--google--gemma-3-4b-it"
    marker = cached / "snapshots" / "sim" / "config.json"
    assert json.loads(marker.read_text()) == {
        "host": socket.gethostname(),
        "instance": "gemma-instance-1",
    }
    # A second replica on the same cache (a PVC, a node path) does not download again.
    assert fetch_weights("google/gemma-3-4b-it", env, "gemma-instance-2").startswith("found")
    assert "gemma-instance-1" in marker.read_text()
    assert [p.name for p in marker.parent.iterdir()] == ["config.json"]


def test_nothing_is_written_without_hf_home(tmp_path: Path) -> None:
    assert fetch_weights("org/m", {}, "m-instance-1") == "no HF_HOME: nothing cached"


def test_a_cache_that_cannot_be_written_fails_the_start(tmp_path: Path) -> None:
    # A file where the cache directory should be: the download raises, as it does for a
    # volume the replica's uid may not write (root passes permission checks, so not chmod).
    (tmp_path / "hf").write_text("")
    with pytest.raises(OSError, match="hf"):
        fetch_weights("org/m", {"HF_HOME": str(tmp_path / "hf")}, "m-instance-1")

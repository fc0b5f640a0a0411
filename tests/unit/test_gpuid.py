"""Global GPU IDs: format, parse, clear errors, and the round trip as a property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelfleet.gpuid import GpuIdError, format_gpu_id, parse_gpu_id

label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
node_names = st.lists(label, min_size=1, max_size=4).map(".".join).filter(lambda n: len(n) <= 253)


@given(node=node_names, index=st.integers(min_value=0, max_value=1023))
def test_round_trip(node: str, index: int) -> None:
    assert parse_gpu_id(format_gpu_id(node, index)) == (node, index)


def test_examples() -> None:
    assert format_gpu_id("gpu-node-a", 3) == "gpu-node-a:3"
    assert parse_gpu_id("gpu-node-a.example.com:12") == ("gpu-node-a.example.com", 12)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("gpu-node-a", "must look like <node-name>:<gpu-index>"),
        (":3", "must look like"),
        ("gpu-node-a:x", "must be a GPU index"),
        ("gpu-node-a:-1", "must be a GPU index"),
        ("gpu-node-a:03", "must be a GPU index"),
        ("Gpu_Node:1", "not a DNS subdomain"),
        ("a:b:1", "not a DNS subdomain"),
        ("gpu:5000", "above 1023"),
    ],
)
def test_malformed_ids_say_what_was_expected(text: str, words: str) -> None:
    with pytest.raises(GpuIdError, match=words):
        parse_gpu_id(text)


def test_format_refuses_bad_parts() -> None:
    with pytest.raises(GpuIdError, match="GPU index"):
        format_gpu_id("node", -1)
    with pytest.raises(GpuIdError, match="DNS subdomain"):
        format_gpu_id("node:1", 0)

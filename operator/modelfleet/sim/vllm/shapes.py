"""The pure part of the stand-in: prompts to deterministic answers, and vLLM's OpenAI JSON shapes.

No I/O: the server (server.py) parses a request, calls these, and writes what they return.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from typing import Any

from modelfleet.sim.vllm.config import SimConfig

DEFAULT_MAX_TOKENS = 16


class SimError(Exception):
    """A request the stand-in refuses, answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param


def build_error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    """The OpenAI error shape, as vLLM's OpenAI server answers it."""
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}
    ).encode()


def _text_of(content: Any) -> str:
    """Message content is a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def compute_chat_prompt(messages: Any) -> tuple[list[str], list[str]]:
    """(all prompt words, words of the last user message) of a chat request."""
    if not isinstance(messages, list) or not messages:
        raise SimError(400, "messages must be a non-empty list", "BadRequestError", "messages")
    words: list[str] = []
    last_user: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise SimError(
                400, "each message needs a role and content", "BadRequestError", "messages"
            )
        text = _text_of(message.get("content")).split()
        words += text
        if message["role"] == "user":
            last_user = text
    return words, last_user


def compute_completion_prompt(prompt: Any) -> list[str]:
    """Words of a text-completion prompt (a string, or a list whose first item is used)."""
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    if isinstance(prompt, list):  # token ids
        return [str(t) for t in prompt]
    if not isinstance(prompt, str):
        raise SimError(400, "prompt must be a string", "BadRequestError", "prompt")
    return prompt.split()


def compute_max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SimError(
            400, "max_tokens must be a positive integer", "BadRequestError", "max_tokens"
        )
    return value


def compute_output(words: list[str], max_tokens: int) -> tuple[list[str], str]:
    """The echoed tokens and the finish reason: the prompt's words, cut at max_tokens."""
    if len(words) > max_tokens:
        return words[:max_tokens], "length"
    return list(words), "stop"


def token_pieces(tokens: list[str]) -> list[str]:
    """Stream pieces whose concatenation equals the non-streaming text."""
    return [tok if i == 0 else " " + tok for i, tok in enumerate(tokens)]


def build_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def build_chat_response(
    rid: str, model: str, created: int, text: str, finish: str, n: int, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            for i in range(n)
        ],
        "usage": usage,
    }


def build_completion_response(
    rid: str, model: str, created: int, text: str, finish: str, n: int, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            for i in range(n)
        ],
        "usage": usage,
    }


def build_chat_chunk(
    rid: str,
    model: str,
    created: int,
    index: int,
    delta: dict[str, Any],
    finish: str | None,
    with_usage: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def build_completion_chunk(
    rid: str, model: str, created: int, index: int, text: str, finish: str | None, with_usage: bool
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        ],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def compute_embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from the text's hash."""
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(b - 127.5) / 127.5 for b in raw[: dim * 4 : 4]]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]


def compute_embedding_inputs(value: Any) -> list[str]:
    """Embedding input: a string, a list of strings, or token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise SimError(400, "input must be a string or a list of strings", "BadRequestError", "input")


def build_embeddings_response(
    inputs: list[str], model: str, dim: int, encoding: str
) -> dict[str, Any]:
    data = []
    tokens = 0
    for i, text in enumerate(inputs):
        vector = compute_embedding(text, dim)
        tokens += max(1, len(text.split()))
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "id": f"embd-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }


def build_models_response(config: SimConfig, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": config.model,
                "parent": None,
                "max_model_len": config.max_model_len,
            }
            for name in config.served_names
        ],
    }

"""Event loop setup shared by the long-running servers (gateway, vLLM stand-in)."""

from __future__ import annotations

import asyncio


def install_uvloop() -> bool:
    """Use uvloop when it is installed: it cuts the event loop's CPU per proxied request.

    benchmarks/RESULTS.md (Gateway) has the figures. Returns whether uvloop is in use.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a platform without uvloop wheels
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True

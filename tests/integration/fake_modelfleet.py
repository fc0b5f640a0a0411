"""A trivial stand-in for the `modelfleet` CLI, used to prove the pod runner end to end.

`agent` and `sim-vllm` serve HTTP on --host/--port: GET /health answers 200 (after
MODELFLEET_SIM_STARTUP_DELAY_S seconds for sim-vllm, like a model that loads; 503 after GET /sick
until GET /well) and GET /argv returns the command line and the environment the runner passed, so
tests can check them. The
process writes its pid to $FAKE_PID_DIR/<host>_<port>.pid when that variable is set, so a test can
kill it and watch the runner restart it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["agent", "sim-vllm"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int)
    args, _unknown = parser.parse_known_args(argv)
    port = args.port or (9400 if args.command == "agent" else 8000)
    if args.command == "sim-vllm":
        time.sleep(float(os.environ.get("MODELFLEET_SIM_STARTUP_DELAY_S", "0")))
    reply = json.dumps(
        {"argv": argv, "env": {k: v for k, v in os.environ.items() if k.startswith("MODELFLEET")}}
    ).encode()

    sick = [False]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in ("/sick", "/well"):
                sick[0] = self.path == "/sick"
            body = reply if self.path == "/argv" else b"ok"
            code = 200 if self.path in ("/argv", "/health", "/sick", "/well") else 404
            if self.path == "/health" and sick[0]:
                code = 503
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((args.host, port), Handler)
    pid_dir = os.environ.get("FAKE_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"{args.host}_{port}.pid").write_text(str(os.getpid()))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

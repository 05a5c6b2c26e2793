"""Helpers shared by the parameter-server tests: real threads and real sockets only."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SECRET = b"unit-test secret, 32 bytes long!"
#: Upper bound on any wait in these tests: a hang fails the test instead of blocking it.
WAIT = 15.0


def run_workers(*workers: Callable[[], Any]) -> list[Any]:
    """Run each callable in its own thread; return results in order, re-raising any error."""
    with ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="test-worker") as pool:
        futures = [pool.submit(w) for w in workers]
        return [f.result(timeout=WAIT) for f in futures]


def outcome(fn: Callable[[], Any]) -> Callable[[], tuple[str, Any]]:
    """Wrap ``fn`` so that it returns ("ok", result) or ("error", exception) instead of raising."""

    def wrapped() -> tuple[str, Any]:
        try:
            return "ok", fn()
        except Exception as exc:
            return "error", exc

    return wrapped


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(poll)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk

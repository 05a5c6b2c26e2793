"""The control channel of a parameter server hosted inside the cluster (Spark Connect).

Under Spark Connect the client cannot reach the server's process, so the job side of a fit asks
it through tiny Spark tasks: each opens one connection, passes the mutual HMAC handshake of a
worker (each side proves it knows the per-fit secret), sends one CONTROL request and reads one
CONTROL reply. Requests and replies are ordinary messages (a JSON meta and raw arrays); the
server never unpickles anything. The one pickle is in the final reply: the user's callbacks'
state, read by the client from a peer that proved it holds the secret.

:class:`ControlServer` answers with a handler the hosting process supplies; it is built on
``socketserver`` (a thread per connection), which is all a handful of requests per fit needs.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spark_keras_ml.ps import protocol
from spark_keras_ml.ps.connections import HANDSHAKE_SECONDS
from spark_keras_ml.ps.protocol import Message, Op

logger = logging.getLogger(__name__)

#: A request is a small JSON object; a reply may carry every weight of the model.
MAX_REQUEST_BYTES = 1 << 20

Handler = Callable[[dict[str, Any]], tuple[dict[str, Any], Sequence[np.ndarray]]]


class ControlServer:
    """Answers CONTROL requests with ``handler(meta) -> (meta, arrays)`` on ``host``, port 0.

    A handler that raises sends the peer an ERROR frame with its message. A context manager:
    no thread or socket outlives it.
    """

    def __init__(self, host: str, secret: bytes, handler: Handler, timeout: float) -> None:
        outer = self

        class _Request(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        class _Server(socketserver.ThreadingTCPServer):
            daemon_threads = False
            block_on_close = True
            allow_reuse_address = False

        self._secret = secret
        self._handler = handler
        self._timeout = timeout
        self.last_request = time.monotonic()
        self._server = _Server((host, 0), _Request)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="skml-ps-control", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def __enter__(self) -> ControlServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self._timeout)
        try:
            deadline = time.monotonic() + HANDSHAKE_SECONDS
            protocol.deliver_challenge(conn, self._secret, deadline)
            protocol.answer_challenge(conn, self._secret, deadline)
            conn.settimeout(self._timeout)
            request = protocol.recv_message(conn, MAX_REQUEST_BYTES)
            if request.op is not Op.CONTROL:
                raise protocol.ProtocolError(f"expected CONTROL, received {request.op.name}")
            self.last_request = time.monotonic()
            try:
                meta, arrays = self._handler(request.meta)
            except Exception as exc:  # the asking task reports it
                logger.exception("control request %r failed", request.meta.get("request"))
                protocol.send_error(conn, f"{type(exc).__name__}: {exc}")
                return
            protocol.send_message(conn, Op.CONTROL, meta, arrays)
        except (OSError, protocol.ProtocolError) as exc:
            logger.warning("dropped a control connection: %s", exc)
        finally:
            protocol.shutdown_quietly(conn)
            conn.close()


def ask(
    address: tuple[str, int],
    secret: bytes,
    meta: dict[str, Any],
    max_reply: int,
    timeout: float = 60.0,
) -> Message:
    """Send one CONTROL request to the server at ``address``; its reply, of at most
    ``max_reply`` bytes (an ERROR frame raises
    :class:`~spark_keras_ml.ps.protocol.RemoteError`)."""
    with socket.create_connection(address, timeout=timeout) as conn:
        # Mutual: the reply may carry the user's callbacks, which the client unpickles, so
        # the server too proves it knows the per-fit secret.
        deadline = time.monotonic() + HANDSHAKE_SECONDS
        protocol.answer_challenge(conn, secret, deadline)
        protocol.deliver_challenge(conn, secret, deadline)
        conn.settimeout(timeout)
        protocol.send_message(conn, Op.CONTROL, meta)
        return protocol.recv_message(conn, max_reply)

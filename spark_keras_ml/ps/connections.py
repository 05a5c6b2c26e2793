"""The server's connections: which are still in the handshake, which are workers, and the
idle clock of the watchdog.

Anyone who can reach the port can open a connection, so what an unauthenticated peer may hold
is bounded: the handshake has one overall deadline (:data:`HANDSHAKE_SECONDS`, however long
``timeout`` is), at most :data:`MAX_HANDSHAKES` connections are in it at once (the accept loop
leaves further ones in the listen backlog until one ends, so a burst of real workers waits
instead of failing), and only authenticated traffic moves the idle clock: a port scan's
connect-and-close probes used to reset it, so a fit whose workers had all died was never
declared stuck.

The idle clock starts when the first worker of the current run says HELLO. Before that, the
Spark job may still be computing the input (an uncached join, a slow UDF, a slow read), which
is no sign of a stuck task: the job's own failure and cancellation end a fit whose tasks never
start. After it, silence counts while no worker is connected and some partition is unfinished
(a connected worker's silence is its socket's timeout).

The accept loop is the server's own rather than ``socketserver.ThreadingTCPServer``, whose
``serve_forever()`` and ``service_actions()`` would host it and the watchdog, but: its handler
threads are unnamed and untracked, while ``threads()`` and ``stop()`` need each one with its
connection (to shut down a handler blocked in ``recv``); ``server_close()`` joins them with no
timeout, while ``stop()`` must return within seconds; ``shutdown()`` deadlocks unless
``serve_forever()`` is running, while ``stop()`` without ``start()`` must be harmless; and
``handle_error()`` prints to stderr. Overriding all of that would leave socketserver only a
``select()`` loop.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from spark_keras_ml.ps import protocol

logger = logging.getLogger(__name__)

#: Seconds a peer has, from the accept, to pass the whole mutual handshake (three small frames
#: each way): far more than a real worker needs, short enough that a peer trickling bytes holds
#: its thread for seconds, not ``timeout`` per byte (8 hours at the default timeout).
HANDSHAKE_SECONDS = 5.0
#: Connections in the handshake at once; the accept loop takes no more until one ends.
MAX_HANDSHAKES = 16


def listen(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a port the kernel picks, listening."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen(64)
    except OSError:
        listener.close()
        raise
    return listener


class Connections:
    """Thread-safe registry of the handler threads, their sockets, and the idle clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: dict[threading.Thread, socket.socket] = {}
        self._handshaking: set[threading.Thread] = set()
        self._workers: set[threading.Thread] = set()
        # None until a worker of the current run says HELLO (see the module's doc).
        self._last_activity: float | None = None

    # --- handlers -----------------------------------------------------------------------------

    def room(self) -> bool:
        """Whether the accept loop may take another connection into the handshake."""
        with self._lock:
            return len(self._handshaking) < MAX_HANDSHAKES

    def add(self, thread: threading.Thread, conn: socket.socket) -> None:
        with self._lock:
            self._handlers[thread] = conn
            self._handshaking.add(thread)

    def handshake(
        self, conn: socket.socket, peer: object, secret: bytes, deadline: float, timeout: float
    ) -> bool:
        """The mutual handshake of the calling handler's connection, all of it by ``deadline``;
        then every socket operation gets ``timeout``. False (logged) when the peer ran out of
        time; a peer that fails the challenge raises."""
        try:
            protocol.deliver_challenge(conn, secret, deadline)
            protocol.answer_challenge(conn, secret, deadline)
        except TimeoutError:
            logger.warning(
                "dropped parameter-server peer %s: no handshake within %g s",
                peer,
                HANDSHAKE_SECONDS,
            )
            return False
        conn.settimeout(timeout)
        self._authenticated()
        return True

    def _authenticated(self) -> None:
        """The calling handler's peer passed the handshake: it is a worker from now on."""
        thread = threading.current_thread()
        with self._lock:
            self._handshaking.discard(thread)
            self._workers.add(thread)
            self._touch()

    def remove(self) -> None:
        """The calling handler ends; a worker leaving is activity (the silence starts now)."""
        thread = threading.current_thread()
        with self._lock:
            self._handlers.pop(thread, None)
            self._handshaking.discard(thread)
            if thread in self._workers:
                self._workers.discard(thread)
                self._touch()

    def items(self) -> list[tuple[threading.Thread, socket.socket]]:
        with self._lock:
            return list(self._handlers.items())

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._handlers)

    def handshaking(self) -> int:
        with self._lock:
            return len(self._handshaking)

    # --- the idle clock -----------------------------------------------------------------------

    def start_clock(self) -> None:
        """A worker of the current run said HELLO: its training task has started."""
        with self._lock:
            if self._last_activity is None:
                self._last_activity = time.monotonic()

    def reset_clock(self) -> None:
        """A rerun of the job computes its input again: wait for its first worker anew."""
        with self._lock:
            self._last_activity = None

    def touch(self) -> None:
        """A worker sent a message."""
        with self._lock:
            self._touch()

    def _touch(self) -> None:
        if self._last_activity is not None:
            self._last_activity = time.monotonic()

    def idle(self) -> float | None:
        """Seconds without a worker connected or sending, once the clock has started; None
        while any worker is connected or before the first one of the run said HELLO."""
        with self._lock:
            if self._last_activity is None or self._workers:
                return None
            return time.monotonic() - self._last_activity

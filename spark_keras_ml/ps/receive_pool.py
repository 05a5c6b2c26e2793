"""Receive buffers the server's handlers share, so that its memory does not grow with the
workers.

A handler used to read every frame into a buffer of its own, grown to the model's size and
kept for the fit: 8 workers pushing a 50 MB model held 400 MB of buffers on the driver, and the
copies around them (a float64 round sum, a temporary per push) brought the growth to 10-14
times the model. Here a fixed number of model-sized buffers (:data:`RECEIVE_BUFFERS`) serve
every handler: a handler takes one when a frame's header announces a large body, and gives it
back once the message is done with, or earlier, before it waits on other workers (a sync round,
a staleness bound), since the arrays of a push are views of the buffer and a rule copies what
it keeps before it waits. A handler that finds none free waits for one; its worker's bytes wait
in the socket meanwhile. Frames of at most :data:`SMALL_FRAME` bytes (HELLO, BYE, a report
step's push, a small model) are read into a small buffer of the handler's own and never wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from spark_keras_ml.ps.bookkeeping import TrainingAborted
from spark_keras_ml.ps.protocol import ReceiveBuffer

#: Model-sized buffers shared by every handler of a server. One: the server then holds the
#: weights, a round's mean and this buffer, three times the model. A second let a handler read
#: a push while another adds the one before, but measured no faster (8 workers, 5 and 50 MB
#: models on 2 cores: the reads and the arithmetic share the cores anyway).
RECEIVE_BUFFERS = 1
#: Bodies up to this size are read into a buffer of the handler's own.
SMALL_FRAME = 64 * 1024


class ReceivePool:
    """:data:`RECEIVE_BUFFERS` receive buffers, lent to handlers one at a time.

    ``timeout`` bounds a handler's wait for a buffer (holders give theirs back within a socket
    operation's timeout, so waiting longer means the fit is stuck); ``abort`` is told why.
    """

    def __init__(
        self, timeout: float, abort: Callable[[str], None], size: int = RECEIVE_BUFFERS
    ) -> None:
        self._free = [ReceiveBuffer() for _ in range(size)]
        self._size = size
        self._timeout = timeout
        self._abort = abort
        self._cond = threading.Condition()
        self._closed = False
        #: The most buffers ever lent at once (for tests and benchmarks).
        self.peak_lent = 0

    def lease(self) -> Lease:
        """What one handler reads its frames into."""
        return Lease(self)

    def close(self) -> None:
        """Wake every waiting handler: the server is stopping."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> ReceiveBuffer:
        deadline = time.monotonic() + self._timeout
        with self._cond:
            while not self._free:
                if self._closed:
                    raise TrainingAborted("the parameter server was stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = (
                        f"no receive buffer came free in {self._timeout:g} s: the handlers "
                        "holding them are stuck (raise `timeout` if epochs are just slow)"
                    )
                    self._abort(reason)
                    raise TrainingAborted(reason)
                self._cond.wait(min(left, 1.0))
            buffer = self._free.pop()
            self.peak_lent = max(self.peak_lent, self._size - len(self._free))
            return buffer

    def _give(self, buffer: ReceiveBuffer) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()


class Lease(ReceiveBuffer):
    """One handler's view of the pool: ``view`` takes a shared buffer for a large body (and
    keeps it until :meth:`release`), or reads a small one into the handler's own."""

    def __init__(self, pool: ReceivePool) -> None:
        super().__init__()
        self._pool = pool
        self._held: ReceiveBuffer | None = None

    def view(self, n: int) -> memoryview:
        if self._held is not None:
            return self._held.view(n)
        if n <= SMALL_FRAME:
            return super().view(n)
        self._held = self._pool._take()
        return self._held.view(n)

    def release(self) -> None:
        """The last message's arrays are no longer read: another handler may overwrite them."""
        held, self._held = self._held, None
        if held is not None:
            self._pool._give(held)

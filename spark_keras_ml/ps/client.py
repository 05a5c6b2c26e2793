"""The parameter-server client. Runs on the executors, inside the training task.

One persistent connection per worker for the whole fit; every socket operation has a timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import numpy as np

from spark_keras_ml.ps import protocol
from spark_keras_ml.ps.messages import EpochEnd, GradientMoments, Hello, Push, Reply
from spark_keras_ml.ps.protocol import Op, ProtocolError

#: Extra seconds a client waits beyond the server's own limit, so the server's clearer timeout
#: error (naming the missing partitions) arrives before the client gives up on its own.
_CLIENT_GRACE_SECONDS = 30.0


class ParameterClient:
    """Talks to one :class:`~spark_keras_ml.ps.server.ParameterServer` (executor side).

    ``like`` is the model's own weights: they bound the size of any reply the client accepts.

    With ``reuse_buffers``, replies are read into two buffers in turn, so the arrays a call
    returns stay valid only until the second call after it: enough for a worker, which needs the
    weights of one reply only until it has pushed the delta against them. It spares a model-size
    allocation per reply, which for large models costs more than the read itself.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        like: Sequence[np.ndarray],
        timeout: float = 600.0,
        reuse_buffers: bool = False,
    ) -> None:
        self._address = (host, port)
        self._secret = secret
        self._max_body = protocol.message_bytes_limit(like)
        self._timeout = timeout + _CLIENT_GRACE_SECONDS
        self._sock: socket.socket | None = None
        self._buffers = (
            (protocol.ReceiveBuffer(), protocol.ReceiveBuffer()) if reuse_buffers else None
        )
        self._calls = 0

    def connect(self) -> ParameterClient:
        sock = socket.create_connection(self._address, timeout=self._timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol.answer_challenge(sock, self._secret)
            protocol.deliver_challenge(sock, self._secret)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return self

    def __enter__(self) -> ParameterClient:
        return self.connect()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        self.close(None if exc is None else f"{type(exc).__name__}: {exc}")

    def hello(
        self, *, partition: int, rows: int, attempt: int = 0, run: int = 0, **memory: Any
    ) -> tuple[Reply, list[np.ndarray]]:
        """Register this worker (see :class:`~spark_keras_ml.ps.messages.Hello`, whose memory
        fields ``memory`` may set).

        Returns the reply, with ``resume_step`` and ``steps_per_epoch``, and the weights to
        start from. In sync it returns once every worker has registered.
        """
        identity = Hello(partition=partition, attempt=attempt, run=run, rows=rows, **memory)
        return self._call(Op.HELLO, identity.encode())

    def push(
        self,
        delta: Sequence[np.ndarray],
        *,
        step: int,
        rows: int,
        epoch: int | None = None,
        end: EpochEnd | None = None,
        gradients: bool = False,
        precision: str = "float32",
        moments: GradientMoments | None = None,
    ) -> tuple[Reply, list[np.ndarray]]:
        """Send one step's update, already compressed to ``precision`` (``compress_delta``);
        ``end`` goes with the last push of an epoch (see :class:`~spark_keras_ml.ps.messages.Push`).

        Returns the reply and the weights to train the next step from.
        """
        push = Push(step, rows, epoch, gradients, precision, end, moments)
        return self._call(Op.PUSH, push.encode(), delta)

    def pull(self) -> tuple[Reply, list[np.ndarray]]:
        """The server's current weights and version, without pushing anything."""
        return self._call(Op.PULL, {})

    def close(self, error: str | None = None) -> None:
        """Say goodbye (or report ``error`` so the server can fail the fit at once), then close."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if error is None:
                protocol.send_message(sock, Op.BYE)
            else:
                protocol.send_message(sock, Op.ERROR, {"message": error[:2000]})
        except OSError:
            pass
        finally:
            sock.close()

    def _call(
        self, op: Op, meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()
    ) -> tuple[Reply, list[np.ndarray]]:
        if self._sock is None:
            raise RuntimeError("the parameter client is not connected")
        protocol.send_message(self._sock, op, meta, arrays)
        self._calls += 1
        buffer = None if self._buffers is None else self._buffers[self._calls % 2]
        reply = protocol.recv_message(self._sock, self._max_body, buffer)
        if reply.op is not Op.WEIGHTS:
            raise ProtocolError(f"expected WEIGHTS in reply to {op.name}, received {reply.op.name}")
        return Reply.decode(reply.meta), reply.arrays

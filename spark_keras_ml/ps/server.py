"""The parameter server: in the driver, or in a process inside the cluster under Spark Connect.

One listening socket on port 0, one accept thread, one handler thread per worker connection.
Every connection must pass the mutual HMAC challenge before any payload is read; a peer that
breaks the protocol is dropped and the others keep being served. Use it as a context manager
so that no thread, socket or port outlives the fit::

    with ParameterServer(weights, num_workers=2, secret=new_secret()) as server:
        ...  # run the Spark job; workers connect to server.address
        final = server.final_weights()
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from spark_keras_ml.ps import protocol
from spark_keras_ml.ps.bookkeeping import PER_EPOCH, Schedule, Superseded, TrainingAborted
from spark_keras_ml.ps.connections import HANDSHAKE_SECONDS, Connections, listen
from spark_keras_ml.ps.messages import Hello, MetricState, Push, Reply
from spark_keras_ml.ps.metrics import EpochAggregator
from spark_keras_ml.ps.protocol import Message, Op, ProtocolError, RemoteError
from spark_keras_ml.ps.push_checks import PushChecks
from spark_keras_ml.ps.receive_pool import Lease, ReceivePool
from spark_keras_ml.ps.updates import SyncRule, make_rule

if TYPE_CHECKING:
    from spark_keras_ml.ps.optimizer import ServerOptimizer

logger = logging.getLogger(__name__)

#: How often the accept loop looks at the stop flag: the bound on how long ``stop()`` waits for it.
_ACCEPT_POLL_SECONDS = 0.1
#: How long ``stop()`` waits for each thread before giving up on it.
_JOIN_SECONDS = 2.0

EpochCallback = Callable[[int, dict[str, float]], None]


class ParameterServer:
    """Holds the weights of one fit and applies the workers' deltas (driver side).

    Parameters
    ----------
    weights:
        The initial weights (``model.get_weights()``); they fix the shapes and dtypes every push
        must match.
    num_workers:
        How many partitions train; they are numbered ``0 .. num_workers - 1``.
    secret:
        The per-fit key of the HMAC handshake.
    mode:
        ``"sync"``, ``"async"`` or ``"hogwild"``: which update rule applies the deltas.
    schedule:
        When workers exchange: the server computes each worker's steps per epoch from it and
        sends it with the worker's first weights. With ``report_step`` each epoch ends with a
        push of no rows (and no arrays) that carries the logs measured after the merge.
    host:
        The address to bind; the driver host, never all interfaces by default.
    timeout:
        Seconds allowed for any one socket operation or wait, including a whole sync round, and
        the longest silence from the running workers before the fit is declared stuck.
    max_staleness:
        Async only: how many steps a worker may run ahead of the slowest running one.
    allow_rejoin:
        Sync only: a lost worker does not fail the fit; a rerun of the job resumes it.
    max_bad_updates:
        Non-finite deltas are rejected; one more than this many fails the fit.
    on_epoch:
        Called with ``(epoch, logs)`` once every worker has reported an epoch's logs, before the
        push that completed the epoch is applied, so that what it decides (``request_stop``)
        reaches every worker of a sync round at the same time.
    on_epoch_applied:
        Called with ``(epoch, weights)`` (a copy) once the push that completed the epoch is
        applied: in sync, the weights after the epoch's last round (checkpoints, best weights).
    finish_states:
        Computes metrics from their states summed over the workers (see
        :class:`~spark_keras_ml.ps.metrics.EpochAggregator`).
    on_abort:
        Called once, from a server thread, with the reason when training is aborted (the
        estimator cancels its Spark job there).
    optimizer:
        Sync/batch: pushes are gradients; each round's row-weighted mean is replied to every
        worker's optimizer replica and stepped by this one. HELLO replies carry its state.
    outer:
        Sync only: each round's mean delta is applied by this optimizer, as the negative of a
        gradient (an outer optimizer over local SGD, as in DiLoCo); None adds the mean delta.
    delta_scale:
        Async and hogwild: what each delta is multiplied by before it is added
        (:func:`~spark_keras_ml.ps.scaling.delta_scale` says what a fit uses).
    boost_caps:
        How far a mean of deltas may be lengthened, per weight (:mod:`~spark_keras_ml.ps.scaling`).
    trainable:
        Flags each weight; async and hogwild blend the others as statistics
        (:mod:`~spark_keras_ml.ps.statistics`).
    """

    def __init__(
        self,
        weights: Sequence[np.ndarray],
        *,
        num_workers: int,
        secret: bytes,
        mode: str = "sync",
        schedule: Schedule = PER_EPOCH,
        host: str = "127.0.0.1",
        timeout: float = 600.0,
        max_staleness: int | None = None,
        allow_rejoin: bool = False,
        max_bad_updates: int = 3,
        on_epoch: EpochCallback | None = None,
        on_epoch_applied: Callable[[int, list[np.ndarray]], None] | None = None,
        finish_states: Callable[[list[MetricState]], dict[str, float]] | None = None,
        on_abort: Callable[[str], None] | None = None,
        optimizer: ServerOptimizer | None = None,
        outer: ServerOptimizer | None = None,
        delta_scale: float = 1.0,
        boost_caps: Sequence[float] | None = None,
        trainable: Sequence[bool] | None = None,
    ) -> None:
        self._rule = make_rule(
            mode,
            weights,
            num_workers,
            schedule=schedule,
            max_staleness=max_staleness,
            allow_rejoin=allow_rejoin,
            optimizer=optimizer,
            outer=outer,
            scale=delta_scale,
            boost_caps=boost_caps,
            trainable=trainable,
        )
        self._optimizer = optimizer
        self._gradients = optimizer is not None
        # Sync/batch: the rule whose rounds' means the replies carry.
        self._rounds = self._rule if self._gradients and isinstance(self._rule, SyncRule) else None
        self._secret = secret
        self._host = host
        self._timeout = timeout
        self._max_body = protocol.message_bytes_limit(weights)
        self._checks = PushChecks(weights, self._rule, max_bad_updates)
        self._epochs = EpochAggregator(num_workers, on_epoch, finish_states)
        self._on_abort = on_abort
        self._abort_reported = False
        self._run = 0
        # Early stopping: the last epoch every worker finishes, once a callback asked to stop.
        self._stop_after: int | None = None
        # Once a driver-side Keras callback changed it: the learning rate every reply carries.
        self._learning_rate: float | None = None
        # The epoch each partition's worker is in, as of the last reply it was sent.
        self._current_epoch: dict[int, int] = {}
        self._on_epoch_applied = on_epoch_applied
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._compile_thread: threading.Thread | None = None
        self._connections = Connections()
        self._pool = ReceivePool(timeout, self._rule.abort)
        self._lock = threading.Lock()
        self.hellos: dict[int, Hello] = {}  # per partition, its last HELLO (its memory)
        self._stopping = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, listener: socket.socket | None = None) -> ParameterServer:
        """Accept workers, on ``listener`` if given: one already listening, whose address was
        handed out before this server was built (workers wait in its backlog until now)."""
        self._listener = listener if listener is not None else listen(self._host)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"skml-ps-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        if self._optimizer is not None:  # while the tasks start, not in a round
            self._compile_thread = self._optimizer.compile_in_background(f"skml-ps-{self.port}")
        logger.debug("parameter server listening on %s:%d", *self.address)
        return self

    def stop(self) -> None:
        """Stop accepting, drop every connection and join every thread. Safe to call twice."""
        self._stopping.set()
        self._rule.abort("the parameter server was stopped")
        self._pool.close()
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_SECONDS)
        if self._listener is not None:
            self._listener.close()
        handlers = self._connections.items()
        for _, conn in handlers:
            protocol.shutdown_quietly(conn)
        for thread in [*(t for t, _ in handlers), self._compile_thread]:
            if thread is not None:
                thread.join(_JOIN_SECONDS)

    def __enter__(self) -> ParameterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the parameter server is not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    port = property(lambda self: self.address[1])

    def threads(self) -> list[threading.Thread]:
        """Every thread this server started that is still alive (for leak checks)."""
        threads = self._connections.threads()
        threads += [t for t in (self._accept_thread, self._compile_thread) if t is not None]
        return [t for t in threads if t.is_alive()]

    def connected(self) -> int:
        """Connections open now (workers, and peers in their handshake)."""
        return len(self._connections.items())

    def abort(self, reason: str) -> None:
        """Fail the fit: every waiting and later request gets ``reason``."""
        self._rule.abort(reason)

    def request_stop(self, epoch: int) -> None:
        """Stop training after ``epoch`` (the epoch the callbacks just saw), or after a later
        one that some worker has already started, so that every worker finishes the same epochs.

        In sync the others still wait in the round that completes ``epoch``: they stop with it.
        In async a worker may be an epoch ahead: everyone then finishes that epoch too.
        """
        with self._lock:
            if self._stop_after is None:
                self._stop_after = max([epoch, *self._current_epoch.values()])

    def set_learning_rate(self, rate: float) -> None:
        """Train on at ``rate`` (a driver-side Keras callback set it): every later reply carries
        it to the workers' optimizers; in sync/batch the server's steps at it from the next
        round (the closed ones first at the old rate). An outer optimizer keeps its own."""
        if self._optimizer is not None:
            self._rule.weights()
            self._optimizer.set_learning_rate(rate)
        with self._lock:
            self._learning_rate = rate

    def add_logs(self, values: dict[str, float]) -> None:
        """Keys a driver-side callback added to the last epoch's logs (Keras' History has them)."""
        self._epochs.add_logs(values)

    def prepare_rerun(self) -> int:
        """Called by the driver before it reruns a failed sync job (see ``syncRetries``).

        Returns the number of the new run, which its workers send in HELLO. A task of the failed
        run may still be alive for a few seconds (Spark kills Python workers after a grace
        period); if it registered into the rerun's first round, the rerun's own worker for that
        partition would later start a new round under the feet of the others.
        """
        with self._lock:
            self._run += 1
            run = self._run
        self._rule.restart()
        self._connections.reset_clock()  # the rerun computes its input again
        return run

    # --- results ------------------------------------------------------------------------------

    def final_weights(self) -> list[np.ndarray]:
        return [np.array(w, copy=True) for w in self._rule.weights()[1]]

    @property
    def version(self) -> int:
        return self._rule.version

    @property
    def history(self) -> dict[str, list[float]]:
        return self._epochs.history

    @property
    def epoch_rows(self) -> list[int]:
        """Rows trained in each completed epoch, summed over the workers."""
        return list(self._epochs.rows)

    @property
    def counts(self) -> dict[str, int]:
        """Pushes applied, duplicates skipped, and non-finite deltas rejected."""
        return {k: self._rule.counts[k] for k in ("applied", "duplicates", "rejected")}

    @property
    def failure(self) -> str | None:
        """Why training was aborted, if it was (a worker error, a timeout, a lost worker)."""
        return self._rule.abort_reason

    # --- connections (a loop of its own, not socketserver's: see ps/connections.py) -----------

    def _accept_loop(self) -> None:
        listener = self._listener
        if listener is None:
            return
        while not self._stopping.is_set():
            # At MAX_HANDSHAKES connections in the handshake, further ones wait in the backlog.
            waiting = [listener] if self._connections.room() else []
            ready, _, _ = select.select(waiting, [], [], _ACCEPT_POLL_SECONDS)
            self._watch()
            if not ready or self._stopping.is_set():
                continue
            try:
                conn, peer = listener.accept()
            except OSError:
                continue
            deadline = time.monotonic() + HANDSHAKE_SECONDS
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve,
                args=(conn, peer, deadline),
                name=f"skml-ps-conn-{peer[1]}",
                daemon=True,
            )
            self._connections.add(thread, conn)
            thread.start()

    def _watch(self) -> None:
        """The idle watchdog, and the one place that reports an abort to ``on_abort``.

        Open connections time out on their own (socket and round timeouts); the watchdog covers
        what they cannot see: once a worker of the run has started, no worker connected while
        some partition has not finished (a task that never started or never came back). Before
        that the job may be computing its input, however long (see ``ps/connections.py``).
        """
        idle = self._connections.idle()
        if idle is not None and idle > self._timeout and self._rule.abort_reason is None:
            unfinished = self._rule.unfinished()
            if unfinished:
                self._rule.abort(
                    f"no worker connected for {idle:.0f} s (timeout={self._timeout:g} s) "
                    f"while partitions {unfinished} had not finished: their tasks are stuck, "
                    "dead or never started"
                )
        reason = self.failure
        if reason is not None and not self._abort_reported and not self._stopping.is_set():
            self._abort_reported = True
            logger.error("training aborted: %s", reason)
            if self._on_abort is not None:
                try:
                    self._on_abort(reason)
                except Exception:
                    logger.exception("on_abort callback failed")

    def _serve(self, conn: socket.socket, peer: Any, deadline: float) -> None:
        worker: tuple[int, int] | None = None  # (partition, attempt) once registered
        # Each message is handled (its delta applied or copied) before its buffer goes back.
        lease = self._pool.lease()
        try:
            if not self._connections.handshake(conn, peer, self._secret, deadline, self._timeout):
                return
            while not self._stopping.is_set():
                message = protocol.recv_message(conn, self._max_body, lease)
                self._connections.touch()
                if message.op is Op.BYE:
                    if worker is not None:
                        self._rule.finish(*worker)
                    return
                try:
                    worker = self._handle(conn, message, worker, lease)
                finally:
                    lease.release()
        except TrainingAborted as exc:
            protocol.send_error(conn, str(exc))
        except RemoteError as exc:
            partition = None if worker is None else worker[0]
            self._rule.abort(f"the worker for partition {partition} failed: {exc}")
        except TimeoutError:
            if worker is not None and not self._stopping.is_set():
                self._rule.abort(
                    f"partition {worker[0]} sent nothing for {self._timeout:g} s: its worker is "
                    "stuck or dead (raise `timeout` if its epochs are just slow)"
                )
        except (ProtocolError, OSError) as exc:
            if not self._stopping.is_set():
                logger.warning("dropped parameter-server peer %s: %s", peer, exc)
                if worker is not None:
                    self._rule.lost(*worker, str(exc))
        except Exception as exc:
            # Anything unforeseen must still end the fit at once: a dead handler that aborts
            # nothing would leave every other worker waiting out the whole timeout.
            logger.exception("parameter-server handler for %s failed", worker)
            partition = None if worker is None else worker[0]
            self._rule.abort(f"the server failed while serving partition {partition}: {exc!r}")
            protocol.send_error(conn, f"server error: {exc!r}")
        finally:
            lease.release()
            conn.close()
            self._connections.remove()

    def _handle(
        self, conn: socket.socket, message: Message, worker: tuple[int, int] | None, lease: Lease
    ) -> tuple[int, int]:
        if message.op is Op.HELLO:
            if worker is not None:
                raise ProtocolError("a second HELLO on one connection")
            hello = Hello.decode(message.meta)
            if hello.run != self._run:
                raise Superseded(
                    f"partition {hello.partition} of run {hello.run} arrived during run {self._run}"
                )
            self._connections.start_clock()  # a training task has started
            self.hellos[hello.partition] = hello
            registration = self._rule.register(
                hello.partition, hello.attempt, hello.rows, self._timeout
            )
            with self._lock:
                rate = self._learning_rate
            reply = Reply(
                version=registration.version,
                resume_step=registration.resume_step,
                steps_per_epoch=registration.steps_per_epoch,
                learning_rate=rate,
            )
            # Sync/batch: the optimizer's state for the worker's replica (no round closes
            # before this worker pushes, so it is the state that goes with these weights).
            state = [] if self._optimizer is None else self._optimizer.state()
            protocol.send_message(conn, Op.WEIGHTS, reply.encode(), registration.weights + state)
            return hello.partition, hello.attempt
        if worker is None:
            raise ProtocolError(f"{message.op.name} before HELLO")
        if message.op is Op.PUSH:
            self._handle_push(conn, Push.decode(message.meta), message.arrays, worker, lease)
            return worker
        if message.op is Op.PULL:
            version, weights = self._rule.weights()
            protocol.send_message(conn, Op.WEIGHTS, Reply(version=version).encode(), weights)
            return worker
        raise ProtocolError(f"unexpected {message.op.name} from a worker")

    def _handle_push(
        self,
        conn: socket.socket,
        push: Push,
        arrays: list[np.ndarray],
        worker: tuple[int, int],
        lease: Lease,
    ) -> None:
        partition, attempt = worker
        if push.gradients != self._gradients:
            # Applying a gradient as a delta (or the reverse) would train silently wrong.
            wanted, got = ("gradients", "a delta") if self._gradients else ("deltas", "gradients")
            raise ProtocolError(f"this server takes {wanted} (sync/batch), received {got}")
        delta: list[np.ndarray] | None = None
        if arrays or push.rows:  # a push of no rows may come without arrays (a report step)
            delta = protocol.decompress_delta(arrays, push.precision)
            self._checks.match(delta, push.moments)
        # A delta behind zero rows is never applied, so only the others need checking.
        usable = push.rows == 0 or (delta is not None and self._checks.finite(partition, delta))
        epoch, end = push.epoch, push.end  # end: set on the epoch's last push (with its epoch)
        completed = False
        if epoch is not None and end is not None and self._rule.is_current(*worker):
            # Before the push: in sync, the round this push closes then carries whatever the
            # epoch's callbacks decided to every worker at once.
            completed = self._epochs.add(epoch, partition, end)
        version, weights = self._rule.push(
            partition,
            attempt,
            push.step,
            delta if usable else None,
            push.rows if usable else 0,
            self._timeout,
            push.moments,
            lease.release,  # before the rule waits on other workers: the delta is copied
        )
        if completed and epoch is not None and self._on_epoch_applied is not None:
            self._on_epoch_applied(epoch, [np.array(w, copy=True) for w in weights])
        with self._lock:
            if epoch is not None:  # the worker goes on with the next epoch after an end
                self._current_epoch[partition] = epoch + 1 if end is not None else epoch
            stop_after, rate = self._stop_after, self._learning_rate
        rounds = self._rounds if arrays else None
        if rounds is not None:  # sync/batch: the round's mean, which every replica applies
            weights = rounds.round_mean(push.step) or []
        update = rounds is not None
        reply = Reply(
            version=version,
            rejected=not usable,
            stop_after=stop_after,
            update=update,
            learning_rate=rate,
        )
        protocol.send_message(conn, Op.WEIGHTS, reply.encode(), weights)
        if rounds is not None:  # the server's own step on that mean, while the workers train on
            rounds.settle()

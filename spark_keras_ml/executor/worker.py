"""One worker's schedule against the parameter server (:class:`PartitionWorker`): one
``model.fit`` over every epoch, stopped at each exchange.

Keras is imported inside the functions, after
:func:`~spark_keras_ml.executor.backend.prepare_backend`, which picks the backend and sizes its
thread pools before their first import.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from spark_keras_ml.config import TrainConfig
from spark_keras_ml.executor.data_cache import Cached
from spark_keras_ml.executor.spill import SpilledRows
from spark_keras_ml.executor.values import as_tensors
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.messages import EpochEnd, GradientMoments, MetricState
from spark_keras_ml.ps.protocol import ProtocolError, compress_delta

if TYPE_CHECKING:
    import keras

    from spark_keras_ml.executor.gradient_moments import MomentRecorder
    from spark_keras_ml.executor.step_function import StepFunction
    from spark_keras_ml.executor.train import Trainee

logger = logging.getLogger(__name__)

#: How far (largest absolute difference) a sync/batch worker's weights may be from the server's
#: at an epoch's end before it warns: optimizer replicas fed the same mean gradients agree
#: exactly on one machine, and only arithmetic that differs between machines moves them apart.
REPLICA_DRIFT_WARNING = 1e-3


def exchanges_in_step(model: keras.Model) -> bool:
    """Whether exchanges can run inside the train step: on TensorFlow, unless the step is
    compiled by XLA (``jit_compile``, which "auto" turns on where a GPU is), which cannot
    compile the ``tf.numpy_function`` they are; such a step exchanges from outside instead."""
    import keras

    return keras.backend.backend() == "tensorflow" and not model.jit_compile


class PartitionWorker:
    """One worker's schedule against the parameter server: :meth:`register`, then :meth:`run`.

    The server says how many steps an epoch has; step ``s`` is step ``s % steps`` of epoch
    ``s // steps``. A step is an exchange: the worker pushes what it learnt since the last one
    and goes on from the weights in the reply. Between exchanges it trains
    ``config.local_steps`` mini-batches on its own (``frequency="steps"``), a whole epoch
    (``"epoch"``) or one batch (``"batch"``). When rows are held out, each epoch ends with one
    more step, of no rows, whose push carries the val_* metrics measured on the weights the
    epoch's last exchange returned: the model the user gets, not the worker's own.

    Shuffles depend only on (seed, partition, epoch), so a retried attempt sees the same batches
    as the first one; it starts at the server's ``resume_step``, training the steps before it
    again without pushing them. In sync/batch a step pushes the batch's gradients, not a delta:
    the same ``fit`` runs, and each worker's optimizer replica steps on the round's mean
    gradient (:mod:`~spark_keras_ml.executor.gradients`).
    """

    def __init__(
        self,
        config: TrainConfig,
        trainee: Trainee,
        client: ParameterClient,
        data: tuple[Cached, Cached],
        partition: int,
    ) -> None:
        self._config = config
        self._model = trainee.model
        self._replica = trainee.replica
        #: An error raised inside the train step, which TensorFlow would hand on as its own.
        self._failure: BaseException | None = None
        self._client = client
        self._train, self._held_out = data
        self.partition = partition
        self._weights: list[np.ndarray] = []
        #: What the local model held right after the last exchange: deltas are measured from it.
        self._base: list[np.ndarray] = []
        self._steps = 0
        self._resume_step = 0
        self._current_epoch = 0
        #: Within the current epoch: the exchange to make next, and rows trained since the last.
        self._exchange = 0
        self._rows_since = 0
        self._batches_since = 0
        #: Whether the mid-epoch exchanges run inside the train step (TensorFlow), and what
        #: records the moments of the gradients between exchanges there.
        self._in_graph = False
        self._recorder: MomentRecorder | None = None
        self._step_function: StepFunction | None = None
        #: Early stopping: the last epoch every worker must finish, once the server says so.
        self._stop_after: int | None = None
        #: The learning rate the server's last reply carried (a driver-side Keras callback set
        #: it), and the one the optimizer has: taken as an epoch starts, between train calls.
        self._learning_rate: float | None = None
        self._rate_taken: float | None = None
        #: Pushes (steps) this attempt made.
        self.pushes = 0
        #: Epochs done, counting those before a resume.
        self.completed = config.first_epoch

    @property
    def epochs_done(self) -> int:
        """Epochs of this fit completed (by this attempt or an earlier one)."""
        return self.completed - self._config.first_epoch

    def register(self, attempt: int, **memory: Any) -> None:
        """Say HELLO (with what ``memory`` says of the worker's rows and limit): learn the steps
        per epoch, where to resume, and the starting weights."""
        reply, arrays = self._client.hello(
            partition=self.partition,
            attempt=attempt,
            run=self._config.run,
            rows=len(self._train),
            **memory,
        )
        if reply.steps_per_epoch is None or reply.resume_step is None:
            raise ProtocolError("the server's reply to HELLO carries no schedule")
        count = len(self._model.weights)
        self._weights = arrays[:count]
        if self._replica is not None:  # sync/batch: the server's optimizer state follows
            self._replica.load_state(arrays[count:])
        elif len(arrays) != count:
            raise ProtocolError(f"expected {count} weights in reply to HELLO, got {len(arrays)}")
        self._steps, self._resume_step = reply.steps_per_epoch, reply.resume_step
        self._learning_rate = reply.learning_rate
        self._take_learning_rate()

    def run(self) -> None:
        """Train every epoch of the schedule from ``resume_step``; end on the server's weights."""
        first = min(self._resume_step // self._steps, self._config.epochs)
        self.completed = self._config.first_epoch + first
        if first < self._config.epochs:
            if len(self._train):
                self._fit(first)
            else:
                self._run_empty(first)
        self._model.set_weights(self._weights)

    @property
    def _exchanges(self) -> int:
        """Exchanges per epoch: the steps, less the report step."""
        return self._steps - 1 if self._config.report_step else self._steps

    # --- local SGD: one model.fit over every epoch ----------------------------------------------

    def _fit(self, first: int) -> None:
        from spark_keras_ml.executor.local_sgd import Exchanges, epoch_data

        config, model = self._config, self._model
        self._take()
        if self._replica is not None and self._replica.capture is None:
            from spark_keras_ml.executor.gradients import exchange_in_graph

            self._step_function = exchange_in_graph(self._replica, self._in_step)
            self._in_graph = True
        elif self._replica is None and exchanges_in_step(model):
            from spark_keras_ml.executor import local_sgd

            steps = self._batches_per_epoch
            self._step_function, self._recorder = local_sgd.exchange_in_graph(
                model, self._local_steps, steps, first, self._in_step, config.gradient_moments
            )
            self._in_graph = True
        if self._in_graph:
            # No exchange needs Python between the steps of an epoch, so Keras may run a whole
            # epoch in one call of its train function: its Python loop cost about 2 ms a step,
            # as much as a small model's step itself.
            model.steps_per_execution = self._batches_per_epoch
        start = config.first_epoch
        batches = epoch_data(
            self._train,
            config.batch_size,
            config.seed,
            self.partition,
            range(start + first, start + config.epochs),
        )
        try:
            model.fit(
                batches,
                steps_per_epoch=self._batches_per_epoch,
                epochs=config.epochs,
                initial_epoch=first,
                shuffle=False,  # epoch_batches shuffles, by a seed a retried attempt shares
                verbose=0,
                callbacks=[Exchanges(self, len(self._train), config.batch_size)],
            )
        except Exception:
            if self._failure is not None:  # raised in the train step: the error as it was
                raise self._failure from None
            raise
        finally:
            if self._step_function is not None:  # TensorFlow keeps it: let go of this worker
                self._step_function.release()

    def _in_step(self, values: list[np.ndarray], moments: GradientMoments | None = None) -> Any:
        """An exchange called from inside the train step (TensorFlow): in sync/batch with the
        step's update, returning the round's mean; else with the weights and the moments of
        the gradients since the last exchange, returning the weights to go on from."""
        try:
            if self._replica is not None:
                return self._gradient_step(values)
            self._rows_since = self._local_steps * self._config.batch_size  # full batches
            self._exchange_now(self._current_epoch, weights=values, moments=moments)
            return self._weights
        except BaseException as exc:
            self._failure = exc
            raise

    def begin_epoch(self, epoch: int) -> None:
        """Called as ``epoch`` (of this fit) starts."""
        self._take_learning_rate()
        self._current_epoch = epoch
        self._exchange = 0
        self._rows_since = 0
        self._batches_since = 0

    def _take_learning_rate(self) -> None:
        """Train at the learning rate the server last sent. Only here, outside the train
        function: a reply read inside a step (a ``tf.numpy_function``) must not assign a
        variable the running step reads. In sync every worker gets it in the same round's
        reply, so all of them switch as the same epoch starts."""
        rate = self._learning_rate
        if rate is None or rate == self._rate_taken:
            return
        optimizer = self._model.optimizer if self._replica is None else self._replica.optimizer
        optimizer.learning_rate = rate
        self._rate_taken = rate

    def after_batch(self, batch: int, rows: int) -> None:
        """Called after each mini-batch step: exchange every ``local_steps`` of them."""
        if self._in_graph:  # exchanged inside the steps
            return
        if self._replica is not None:  # sync/batch elsewhere: exchange now
            self._sync_state()
            self._replica.apply(self._gradient_step(self._replica.captured_update()))
            return
        self._rows_since += rows
        self._batches_since += 1
        last = batch == self._batches_per_epoch - 1
        if self._batches_since >= self._local_steps and not last:  # the epoch's end pushes last
            self._sync_state()
            self._exchange_now(self._current_epoch)

    def _sync_state(self) -> None:
        """Put the state a running ``fit`` holds back into the model's variables, before they
        are read or set between steps: JAX's trainer keeps it apart during ``fit`` (the
        variables hold nothing meanwhile) and reads the variables again at its next step once
        synced. Keras' own callbacks do this when they touch ``self.model``; the other
        backends train the variables themselves."""
        sync = getattr(self._model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def end_epoch(self, epoch: int, logs: dict[str, float]) -> bool:
        """Called at the end of ``epoch`` with its training logs: the epoch's last exchanges
        and its report; True when training must stop."""
        from spark_keras_ml.executor.metric_state import metric_states

        self._sync_state()
        states = metric_states(self._model)  # before an evaluate resets them
        if self._replica is not None:  # sync/batch: every batch exchanged; then the report
            while self._exchange < self._exchanges:  # a short partition pads the sync rounds
                self._replica.apply(self._gradient_step(self._replica.zero_update()))
            self._report(epoch, logs, states)
            self.completed = self._config.first_epoch + epoch + 1
            return self._stop_after is not None and self.completed > self._stop_after
        if self._in_graph:  # the rows since the last exchange inside the steps
            self._rows_since = max(0, len(self._train) - self._rows_exchanged)
        while self._exchange < self._exchanges - 1:  # a short partition pads the sync rounds
            self._exchange_now(epoch)
        if self._config.report_step:
            self._exchange_now(epoch)
            self._report(epoch, logs, states)
        else:
            self._exchange_now(epoch, self._epoch_end(logs, states))
        self.completed = self._config.first_epoch + epoch + 1
        return self._stop_after is not None and self.completed > self._stop_after

    @property
    def _batches_per_epoch(self) -> int:
        return math.ceil(len(self._train) / self._config.batch_size)

    @property
    def _local_steps(self) -> int:
        """Mini-batches between two exchanges (an epoch's end is always one)."""
        frequency = self._config.frequency
        if frequency == "steps":
            return self._config.local_steps
        return 1 if frequency == "batch" else self._batches_per_epoch

    def _step(self, epoch: int) -> int:
        """The number of the next step of ``epoch``, counted over the fit; moves on."""
        step = epoch * self._steps + self._exchange
        self._exchange += 1
        return step

    @property
    def _rows_exchanged(self) -> int:
        """Rows of this epoch pushed by the exchanges inside its steps (all full batches)."""
        return self._exchange * self._local_steps * self._config.batch_size

    def _exchange_now(
        self,
        epoch: int,
        end: EpochEnd | None = None,
        weights: list[np.ndarray] | None = None,
        moments: GradientMoments | None = None,
    ) -> None:
        """Push what changed since the last exchange; go on from the weights in the reply.
        ``weights`` and ``moments``: the model's and its gradients', when the exchange runs
        inside a step (which then sets the weights)."""
        step, rows = self._step(epoch), self._rows_since
        self._rows_since = self._batches_since = 0
        if weights is None and self._recorder is not None:
            moments = self._recorder.take()
        if step >= self._resume_step:  # else done by an earlier attempt: catch up with it
            at = self._config.first_epoch + epoch
            update = self._update(weights)
            self._push(update, step=step, rows=rows, epoch=at, end=end, moments=moments)
        if weights is None:
            self._take()
        else:
            self._base = self._weights

    def _update(self, weights: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """What changed since the last exchange."""
        weights = self._model.get_weights() if weights is None else weights
        return [now - base for now, base in zip(weights, self._base, strict=True)]

    def _gradient_step(self, update: list[np.ndarray]) -> list[np.ndarray] | None:
        """Sync/batch: push the next batch's update (gradients, non-trainable changes); the
        round's mean update comes back, or None where the step is not to be applied (a round
        without rows, or one an earlier attempt already pushed)."""
        batch, size = self._exchange, self._config.batch_size
        rows = max(0, min(size, len(self._train) - batch * size))  # 0: past a short partition
        epoch = self._current_epoch
        step = self._step(epoch)
        if step < self._resume_step:  # applied already: the server's weights include it
            return None
        reply, arrays = self._client.push(
            compress_delta(update, self._config.delta_precision),
            precision=self._config.delta_precision,
            gradients=True,
            step=step,
            rows=rows,
            epoch=self._config.first_epoch + epoch,
        )
        self.pushes += 1
        if not reply.update:
            raise ProtocolError(f"expected the mean update of round {step}, received weights")
        if reply.stop_after is not None:
            self._stop_after = reply.stop_after
        if reply.learning_rate is not None:
            self._learning_rate = reply.learning_rate
        return arrays or None

    def _report(self, epoch: int, logs: dict[str, float], states: tuple[MetricState, ...]) -> None:
        """The report step: the epoch's logs, val_* measured on the model just received."""
        step = self._step(epoch)
        if step >= self._resume_step:
            end = self._epoch_end(logs, states)
            at = self._config.first_epoch + epoch
            self._push([], step=step, rows=0, epoch=at, end=end)
            self._take()

    def _take(self) -> None:
        """Train on from the server's weights (all of them: batch-norm statistics too)."""
        if self._replica is not None:
            drift = self._replica.take(self._weights)
            if drift > REPLICA_DRIFT_WARNING:
                logger.warning(
                    "partition %d: this worker's weights were %.3g from the server's (at most "
                    "%.0e expected): the workers' arithmetic differs; the server's weights "
                    "are taken",
                    self.partition,
                    drift,
                    REPLICA_DRIFT_WARNING,
                )
        else:
            self._model.set_weights(self._weights)
        self._base = self._weights

    def _run_empty(self, first: int) -> None:
        """A worker without rows still takes part in every round of every epoch."""
        self._take()
        for epoch in range(first, self._config.epochs):
            self.begin_epoch(epoch)
            if self.end_epoch(epoch, {}):
                break

    def _epoch_end(self, logs: dict[str, float], states: tuple[MetricState, ...]) -> EpochEnd:
        """The epoch's training logs and metric states, with val_* metrics of the model as it
        is now on the held-out rows, and the rows behind each."""
        held_out = self._held_out
        if len(held_out):
            from spark_keras_ml.executor.metric_state import metric_states

            scores = self._evaluate(held_out)
            logs = {**logs, **{f"val_{k}": float(v) for k, v in scores.items()}}
            states = (*states, *metric_states(self._model, "val_"))
        # A non-finite metric (a diverged loss) travels as null: EpochEnd.encode sees to it.
        return EpochEnd(
            rows=len(self._train), held_out=len(held_out), logs=dict(logs), states=states
        )

    def _evaluate(self, held_out: Cached) -> dict[str, Any]:
        batch_size = self._config.batch_size
        if isinstance(held_out, SpilledRows):
            from spark_keras_ml.executor.disk_batches import held_out_data

            data = held_out_data(held_out, batch_size)
            steps = math.ceil(len(held_out) / batch_size)  # a stream's length is unknown
            return self._model.evaluate(data, steps=steps, verbose=0, return_dict=True)
        return self._model.evaluate(
            as_tensors(held_out.x),
            held_out.y,
            sample_weight=held_out.weights,
            batch_size=batch_size,
            verbose=0,
            return_dict=True,
        )

    def _push(
        self,
        update: list[np.ndarray],
        *,
        step: int,
        rows: int,
        epoch: int,
        end: EpochEnd | None,
        moments: GradientMoments | None = None,
    ) -> None:
        """Push one step's update; the next step trains from the weights in the reply.

        ``epoch`` counts from the first epoch of the whole fit, resumed ones included.
        """
        precision = self._config.delta_precision
        reply, self._weights = self._client.push(
            compress_delta(update, precision),
            precision=precision,
            gradients=self._replica is not None,
            step=step,
            rows=rows,
            epoch=epoch,
            end=end,
            moments=moments if rows else None,
        )
        self.pushes += 1
        if reply.stop_after is not None:
            self._stop_after = reply.stop_after
        if reply.learning_rate is not None:
            self._learning_rate = reply.learning_rate

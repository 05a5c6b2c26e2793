"""checkpointDir under Spark Connect: read by a one-task job and written by the server process
inside the cluster, through Arrow's file systems; the classic suite's fit tests run here again.

Resuming runs in sync mode only: where the server writes and reads is the same in every mode,
and the store's handling of partial folders is tested on both file systems in the unit tests."""

from __future__ import annotations

import pytest

from spark_keras_ml import KerasEstimator
from tests.conftest import digits_model
from tests.integration.test_checkpoint import (  # noqa: F401 - collected here against Connect
    interrupted_fit_resumes,
    test_a_checkpoint_of_another_model_is_refused,
    test_an_unwritable_checkpoint_dir_fails_before_training,
)

pytestmark = pytest.mark.connect


def test_an_interrupted_sync_fit_resumes_after_its_last_completed_epoch(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    interrupted_fit_resumes(digits, tmp_path, "sync")


def test_an_unwritable_checkpoint_dir_is_named_as_the_executors_see_it(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    est = KerasEstimator(model=digits_model(), numWorkers=2, checkpointDir=str(blocker / "sub"))
    with pytest.raises(ValueError, match=r"a directory the executors can create.*Received"):
        est.fit(train)


def test_a_relative_checkpoint_dir_is_refused_before_any_job(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    est = KerasEstimator(model=digits_model(), numWorkers=2, checkpointDir="checkpoints/run1")
    with pytest.raises(ValueError, match=r"absolute path or a URI.*checkpointDir='checkpoints/"):
        est.fit(train)

"""The verbose Param (Keras' model.fit values), progressBar as its deprecated alias, and the
progress a fit prints for each value."""

from __future__ import annotations

import io
import warnings

import pytest

from spark_keras_ml import KerasEstimator
from spark_keras_ml.callbacks import ProgressBar, Training, progress_callbacks
from spark_keras_ml.validation import validate


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as sys.stdout does in one."""

    def isatty(self) -> bool:
        return True


class Server:
    def request_stop(self, epoch: int) -> None:
        raise AssertionError("progress never stops a fit")


@pytest.mark.parametrize("value", ["auto", 0, 1, 2])
def test_kerass_verbose_values_are_accepted(value: object) -> None:
    validate(KerasEstimator(verbose=value))


@pytest.mark.parametrize("value", [True, 3, -1, "2", 1.0, None, "bar"])
def test_other_verbose_values_are_refused_in_the_packages_format(value: object) -> None:
    stage = KerasEstimator()
    stage._set(verbose=value)
    with pytest.raises(ValueError) as info:
        validate(stage)
    message = str(info.value)
    assert message.startswith("Expected `verbose` to be one of 'auto', 0, 1, 2. Use 1 for a")
    assert message.endswith(f"Received: verbose={value!r}")


def test_verbose_is_auto_by_default() -> None:
    assert KerasEstimator().getVerbose() == "auto"


@pytest.mark.parametrize(("bar", "verbose"), [(True, 1), (False, 0)])
def test_progress_bar_is_a_deprecated_alias_of_verbose(bar: bool, verbose: int) -> None:
    with pytest.warns(DeprecationWarning, match="`progressBar` is deprecated: use `verbose`") as w:
        stage = KerasEstimator(progressBar=bar)
    assert w[0].filename == __file__  # the warning names the caller's line
    assert stage.getVerbose() == verbose
    with pytest.warns(DeprecationWarning):
        stage.setParams(progressBar=bar, verbose=2)
    assert stage.getVerbose() == 2  # verbose, where set, wins


def test_setting_verbose_warns_of_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KerasEstimator(verbose=2).setParams(verbose=0)


def fit_epochs(callbacks: list, logs: list[dict[str, float]], first: int = 0) -> None:  # type: ignore[type-arg]
    training = Training(Server(), epochs=first + len(logs), first_epoch=first)
    for callback in callbacks:
        callback.on_train_begin(training)
    for epoch, values in enumerate(logs, start=first):
        for callback in callbacks:
            callback.on_epoch_end(epoch, values)
    for callback in callbacks:
        callback.on_train_end({})


LOGS = [{"loss": 0.5, "accuracy": 0.75}, {"loss": 0.25, "accuracy": 0.875}]


def test_auto_prints_a_line_per_epoch_where_the_stream_is_no_terminal() -> None:
    out = io.StringIO()
    fit_epochs(progress_callbacks("auto", out), LOGS)
    lines = out.getvalue().splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/2", "Epoch 2/2"]
    assert lines[1].endswith(" - loss: 0.2500 - accuracy: 0.8750"), lines
    assert "\r" not in out.getvalue()


def test_a_bar_asked_for_off_a_terminal_prints_lines_instead_of_garbling_the_log() -> None:
    out = io.StringIO()
    fit_epochs([ProgressBar(out, verbose=1)], LOGS)
    assert "\r" not in out.getvalue()
    assert len(out.getvalue().splitlines()) == 2


def test_auto_draws_a_live_bar_on_a_terminal() -> None:
    out = Terminal()
    fit_epochs(progress_callbacks("auto", out), LOGS, first=3)  # resumed after 3 epochs
    text = out.getvalue()
    assert "\r" in text and "5/5" in text and "0.2500" in text, text


def test_the_plain_text_bar_redraws_one_line() -> None:
    from spark_keras_ml.callbacks import _TextBar

    out = Terminal()
    bar = _TextBar(out, total=4, initial=0)
    bar.set_postfix({"loss": "0.5000"})
    bar.update(1)
    bar.set_postfix({"loss": "0.25"})  # shorter: the rest of the line is blanked out
    bar.update(3)
    bar.close()
    frames = out.getvalue().split("\r")[1:]
    assert frames[-1].startswith("training 4/4 [" + "=" * 30 + "] - loss: 0.25"), frames
    assert len(frames[-1].rstrip("\n")) == len(frames[-2]), frames
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1


def test_verbose_zero_shows_nothing() -> None:
    assert progress_callbacks(0, Terminal()) == []

"""The per-epoch log line of a fit."""

from __future__ import annotations

import pytest

from spark_keras_ml.summary import format_epoch

pytestmark = pytest.mark.timeout(30)


def test_format_epoch() -> None:
    line = format_epoch(0, 3, {"rows": 40.0, "loss": 1.75, "accuracy": 0.875})
    assert line == "Epoch 1/3 - rows: 40 - loss: 1.7500 - accuracy: 0.8750"


def summary():  # type: ignore[no-untyped-def]
    from spark_keras_ml.summary import TrainingSummary

    return TrainingSummary(
        history={"loss": [0.912345, 0.5], "val_accuracy": [0.75, 0.875]},
        rows_per_epoch=[1000, 1000],
        workers=[{"partition": 0}, {"partition": 1}],
        updates={"applied": 40, "duplicates": 0, "rejected": 0},
        wall_seconds=12.34,
        stopped_early=True,
        phases={"prepare": 0.25, "train": 9.5},
    )


def test_a_summary_prints_as_a_short_table() -> None:
    lines = repr(summary()).splitlines()
    assert lines[0] == "Training summary: 2 epochs, stopped early in 12.3 s on 2 workers"
    assert lines[1].split() == ["epoch", "rows", "loss", "val_accuracy"]
    assert lines[2].split() == ["1", "1000", "0.9123", "0.75"]
    assert lines[3].split() == ["2", "1000", "0.5", "0.875"]
    assert lines[4] == "updates: applied 40, duplicates 0, rejected 0"
    assert lines[5] == "seconds by phase: prepare 0.2, train 9.5"
    assert str(summary()) == repr(summary()) and len(lines) == 6


def test_a_summary_shows_as_an_html_table_in_notebooks() -> None:
    page = summary()._repr_html_()
    assert page.startswith("<p><b>Training summary: 2 epochs")
    assert "<th>val_accuracy</th>" in page and "<td>0.875</td>" in page
    assert page.count("<tr>") == 3


def test_a_summary_says_where_the_workers_kept_their_rows_and_their_peak() -> None:
    from dataclasses import replace

    mib = 1 << 20
    workers = [
        {
            "partition": 0,
            "data_cache": "disk",
            "spill_bytes": 300 * mib,
            "peak_rss_bytes": 900 * mib,
            "rss_before_data": 700 * mib,
        },
        {
            "partition": 1,
            "data_cache": "memory",
            "spill_bytes": 0,
            "peak_rss_bytes": 950 * mib,
            "rss_before_data": 720 * mib,
        },
    ]
    lines = repr(replace(summary(), workers=workers)).splitlines()
    assert lines[4] == (
        "rows kept in: 1 disk, 1 memory; spilled 300 MiB; largest worker peak 950 MiB "
        "(230 MiB above its baseline)"
    )
    assert "rows kept in" in replace(summary(), workers=workers)._repr_html_()

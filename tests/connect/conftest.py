"""The Connect suite: one Spark Connect server for the whole session, its master local[2].

Run with ``make test-connect``: a process that opened a Connect session answers pyspark's
``is_remote()`` with yes from then on, so these tests need their own pytest process.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.connect.servers import connect_server


@pytest.fixture(scope="session")
def connect_url(tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with connect_server(tmp_path_factory.mktemp("connect-server")) as url:
        yield url


@pytest.fixture(scope="session")
def spark(connect_url) -> Iterator[object]:  # type: ignore[no-untyped-def]
    from pyspark.sql import SparkSession

    session = SparkSession.builder.remote(connect_url).getOrCreate()
    yield session
    session.stop()

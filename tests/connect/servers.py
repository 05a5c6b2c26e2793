"""Real Spark servers for the Connect tests, started from the installed pyspark and stopped
exactly: a Spark Connect server (``sbin/start-connect-server.sh``) and a standalone master with
workers (``bin/spark-class``), all bound to 127.0.0.1.

Each server gets its own pid and log folders, so stopping it stops this server and no other.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pyspark

SPARK_HOME = Path(pyspark.__file__).parent
HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SPARK_HOME=str(SPARK_HOME),
        SPARK_PID_DIR=str(folder / "pids"),
        SPARK_LOG_DIR=str(folder / "logs"),
        SPARK_LOCAL_IP=HOST,
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        # The tests' own callback classes travel by reference, as a user's modules installed
        # on a cluster do: the executors import them from the checkout.
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    env.pop("SPARK_REMOTE", None)
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    return env


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text()[-4000:] for p in sorted((folder / "logs").glob("*")))


def _wait_for_port(port: int, folder: Path, what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} in {seconds} s:\n{_logs(folder)}")


@contextmanager
def connect_server(folder: Path, master: str = "local[2]", **conf: str) -> Iterator[str]:
    """A Spark Connect server on 127.0.0.1 whose Spark master is ``master``; yields its
    ``sc://`` URL."""
    port = free_port()
    settings = {
        "spark.connect.grpc.binding.address": HOST,
        "spark.connect.grpc.binding.port": str(port),
        "spark.driver.host": HOST,
        "spark.driver.bindAddress": HOST,
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "4",
        "spark.default.parallelism": "2",
        # The suite's JVM options (tests/conftest.py) for a cluster master's executors too.
        "spark.executor.extraJavaOptions": os.environ.get("SPARK_SUBMIT_OPTS", ""),
        **conf,
    }
    args = [str(SPARK_HOME / "sbin" / "start-connect-server.sh"), "--master", master]
    args += ["--driver-memory", "1g"]
    for key, value in settings.items():
        args += ["--conf", f"{key}={value}"]
    env = _env(folder)
    # Started in its folder: a relative path a client saves to lands there, not in the checkout.
    subprocess.run(args, env=env, check=True, capture_output=True, cwd=folder)
    try:
        _wait_for_port(port, folder, "the Spark Connect server")
        yield f"sc://{HOST}:{port}"
    finally:
        stop = SPARK_HOME / "sbin" / "stop-connect-server.sh"
        subprocess.run([str(stop)], env=env, check=False, capture_output=True)


@contextmanager
def standalone_cluster(folder: Path, workers: int = 2, cores: int = 1) -> Iterator[str]:
    """A standalone master and ``workers`` workers on 127.0.0.1; yields the master URL."""
    env = _env(folder)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    port = free_port()
    started: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []

    def start(name: str, *args: str) -> None:
        logs.append(log := (folder / "logs" / f"{name}.log").open("wb"))
        started.append(
            subprocess.Popen(
                [spark_class, *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start(
            "master",
            "org.apache.spark.deploy.master.Master",
            "--host",
            HOST,
            "--port",
            str(port),
            "--webui-port",
            str(free_port()),
        )
        _wait_for_port(port, folder, "the standalone master")
        for i in range(workers):
            start(
                f"worker-{i}",
                "org.apache.spark.deploy.worker.Worker",
                "--host",
                HOST,
                "--cores",
                str(cores),
                "--memory",
                "1536m",
                "--webui-port",
                str(free_port()),
                f"spark://{HOST}:{port}",
            )
        yield f"spark://{HOST}:{port}"
    finally:
        for process in reversed(started):
            # Each server runs in its own session: stop it and exactly the processes it started.
            with _quiet():
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(started):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                with _quiet():
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
        for log in logs:
            log.close()


@contextmanager
def _quiet() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass

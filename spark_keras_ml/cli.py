"""Command line: ``python -m spark_keras_ml score`` — a production scoring job.

Loads a saved ``PipelineModel`` or ``KerasTransformer``, scores a table and writes the result::

    python -m spark_keras_ml score --model models/digits --input in.parquet --output out.parquet

With ``--remote sc://HOST:PORT`` (or ``SPARK_REMOTE`` set) it scores through a Spark Connect
server: this process is then only a client, and the paths are the server's to read and write.
It also runs under ``spark-submit`` (``spark-submit -m`` is not a thing, so submit the module's
file: ``spark-submit $(python -c 'import spark_keras_ml.cli as c; print(c.__file__)') score ...``).
Exit codes: 0 scored, 2 bad arguments, 3 no model at the path (or one that cannot be loaded:
damaged, or naming custom-object modules not given with ``--custom-objects``), 4 input missing
or lacking the model's columns, 5 output exists (with ``--mode error``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

logger = logging.getLogger("spark_keras_ml.cli")

FORMATS = ("parquet", "csv", "json")
EXIT_BAD_ARGS, EXIT_BAD_MODEL, EXIT_BAD_INPUT, EXIT_OUTPUT_EXISTS = 2, 3, 4, 5


class ScoringError(Exception):
    """A failure with a message for the user and the process exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m spark_keras_ml", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score a table with a saved model")
    score.add_argument("--model", required=True, help="saved PipelineModel or KerasTransformer")
    score.add_argument("--input", required=True, help="table to score")
    score.add_argument("--output", required=True, help="where to write the scored table")
    score.add_argument("--input-format", choices=FORMATS, default=None)
    score.add_argument("--output-format", choices=FORMATS, default=None)
    score.add_argument("--mode", choices=("overwrite", "error"), default="error")
    where = score.add_mutually_exclusive_group()
    where.add_argument("--master", default=None, help="Spark master (default: spark-submit's)")
    where.add_argument(
        "--remote",
        default=None,
        metavar="sc://HOST:PORT",
        help="score through this Spark Connect server (default: SPARK_REMOTE, if set)",
    )
    score.add_argument(
        "--custom-objects",
        default="",
        metavar="MODULES",
        help="comma-separated modules the saved model may import for its custom Keras objects "
        "(its customObjects); a saved model naming any other is refused",
    )
    return parser.parse_args(argv)


def guess_format(path: str, given: str | None) -> str:
    if given:
        return given
    stem = path.rstrip("/").lower()
    return next((f for f in FORMATS if stem.endswith("." + f)), "parquet")


def load_model(spark: Any, path: str, custom_objects: str = "") -> Any:
    """A PipelineModel or KerasTransformer, chosen from the saved metadata's class.

    ``custom_objects``: the comma-separated modules the model may import (``--custom-objects``);
    loading refuses a saved model that names any other (see ``allow_custom_objects``).
    """
    from pyspark.ml import PipelineModel
    from pyspark.ml.util import DefaultParamsReader

    from spark_keras_ml.persistence import allow_custom_objects, path_exists
    from spark_keras_ml.transformer import KerasTransformer

    modules = [m.strip() for m in custom_objects.split(",") if m.strip()]
    try:
        allow_custom_objects(*modules)
    except ValueError as exc:
        raise ScoringError(f"--custom-objects: {exc}", EXIT_BAD_ARGS) from exc

    try:
        if not path_exists(spark, f"{path.rstrip('/')}/metadata"):
            # Spark's reader would log a Java stack trace at WARN before failing.
            raise FileNotFoundError(f"{path}/metadata does not exist")
        metadata = DefaultParamsReader.loadMetadata(path, spark)
    except Exception as exc:
        raise ScoringError(
            f"Expected a saved PipelineModel or KerasTransformer at --model {path}. Save one "
            f"with model.write().save(path). Received: no Spark ML metadata there ({_first(exc)})",
            EXIT_BAD_MODEL,
        ) from exc
    kind = str(metadata.get("class", ""))
    try:
        if kind.endswith(".PipelineModel"):
            return PipelineModel.load(path)
        if kind.endswith(".KerasTransformer"):
            return KerasTransformer.load(path)
    except (ValueError, FileNotFoundError) as exc:
        # The readers' own errors (a damaged file, customObjects not allowed) already say
        # what was expected and what to do.
        raise ScoringError(str(exc), EXIT_BAD_MODEL) from exc
    raise ScoringError(
        f"Expected a PipelineModel or KerasTransformer at --model {path}. "
        f"Received: a saved {kind or 'unknown stage'}",
        EXIT_BAD_MODEL,
    )


def score(args: argparse.Namespace, spark: Any) -> int:
    model = load_model(spark, args.model, args.custom_objects)
    reader = spark.read.format(guess_format(args.input, args.input_format))
    if guess_format(args.input, args.input_format) == "csv":
        reader = reader.option("header", "true").option("inferSchema", "true")
    try:
        table = reader.load(args.input)
        scored = model.transform(table)
    except ValueError as exc:
        raise ScoringError(str(exc), EXIT_BAD_INPUT) from exc
    except Exception as exc:
        raise ScoringError(
            f"Expected a readable table at --input {args.input} with the columns the model "
            f"reads. Received: {_first(exc)}",
            EXIT_BAD_INPUT,
        ) from exc
    output_format = guess_format(args.output, args.output_format)
    if output_format != "parquet":
        scored = _flatten_vectors(scored, as_json=output_format == "csv")
    try:
        scored.write.mode(args.mode).format(output_format).option("header", "true").save(
            args.output
        )
    except Exception as exc:
        if "already exists" in str(exc).lower():
            raise ScoringError(
                f"Expected --output {args.output} not to exist. Pass --mode overwrite to replace "
                "it. Received: an existing path",
                EXIT_OUTPUT_EXISTS,
            ) from exc
        raise
    logger.info("scored %s with %s into %s", args.input, args.model, args.output)
    return 0


def _flatten_vectors(df: Any, as_json: bool) -> Any:
    """Vectors become arrays (JSON) or JSON strings (CSV), which those formats can hold."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType

    columns = []
    for field in df.schema.fields:
        column = F.col(field.name)
        if isinstance(field.dataType, VectorUDT):
            column = vector_to_array(column)
        if as_json and isinstance(field.dataType, VectorUDT | ArrayType):
            column = F.to_json(column)
        columns.append(column.alias(field.name))
    return df.select(*columns)


def _first(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def run(args: argparse.Namespace, spark: Any) -> int:
    """Score as ``args`` say through ``spark``; the exit code, with the error on stderr when it
    is not 0. The session is the caller's: it stays open."""
    try:
        return score(args, spark)
    except ScoringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("spark_keras_ml score")
    if args.remote:
        builder = builder.remote(args.remote)
    elif args.master:
        builder = builder.master(args.master)
    elif not SparkConf().contains("spark.master") and not os.environ.get("SPARK_REMOTE"):
        builder = builder.master("local[*]")  # neither spark-submit nor Connect: run embedded
    spark = builder.getOrCreate()
    try:
        return run(args, spark)
    finally:
        spark.stop()


if __name__ == "__main__":
    raise SystemExit(main())

"""Inference throughput: KerasTransformer.transform against Spark's predict_batch_udf and against
single-process ``model.predict``, with the same model, data and batch size (1024).

    .venv/bin/python -m benchmarks.inference [--quick]

Both Spark paths write to the no-op sink (``write.format("noop")``), so that collecting rows to
the driver does not dominate; each runs once to warm up (Python workers, TensorFlow, the model
cache). Then the three paths take turns for three rounds, and each figure is the median of its
three timings. Rows/s on the dense holdout (20,000 rows) and on the dense train set (200,000).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from benchmarks import workloads
from benchmarks.common import Report, log, section_main, spark_session

BATCH = 1024


REPEATS = 3


def timed(*actions: Any) -> list[float]:
    """Median seconds of each action over ``REPEATS`` rounds, the actions taking turns within a
    round: single runs on a shared machine swing widely, and in turn they swing together."""
    seconds: list[list[float]] = [[] for _ in actions]
    for _ in range(REPEATS):
        for i, action in enumerate(actions):
            started = time.perf_counter()
            action()
            seconds[i].append(time.perf_counter() - started)
    return [statistics.median(s) for s in seconds]


def noop(df: Any) -> None:
    df.write.format("noop").mode("overwrite").save()


def predict_batch_udf_for(model_path: str) -> Any:
    """Spark's own batch-inference UDF, loading the same saved model in each Python worker."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, FloatType

    def make_predict_fn() -> Any:
        import keras

        model = keras.saving.load_model(model_path)

        def predict(inputs: Any) -> Any:
            return model.predict_on_batch(inputs)

        return predict

    return predict_batch_udf(
        make_predict_fn,
        return_type=ArrayType(FloatType()),
        batch_size=BATCH,
        input_tensor_shapes=[[64]],
    )


def run(report: Report, quick: bool) -> None:
    from pyspark.ml.functions import vector_to_array

    from spark_keras_ml import KerasTransformer

    spark = spark_session()
    w = workloads.dense(0.2 if quick else 1.0)
    model = w.model()
    model_path = os.path.join(tempfile.mkdtemp(prefix="skml-bench-"), "dense.keras")
    model.save(model_path)
    ours = KerasTransformer(model=model, inferenceBatchSize=BATCH)
    theirs = predict_batch_udf_for(model_path)
    train, test = w.train_frame(spark), w.test_frame(spark)
    for label, frame, x in (("holdout", test, w.x_test), ("train set", train, w.x_train)):
        rows = len(x)
        model.predict(x[:BATCH], batch_size=BATCH, verbose=0)  # warm-up
        transform = ours.transform(frame)
        udf_frame = frame.select("*", theirs(vector_to_array("features")).alias("prediction"))
        noop(transform), noop(udf_frame)  # warm-up: workers, TensorFlow, model caches
        seconds = timed(
            lambda t=transform: noop(t),
            lambda u=udf_frame: noop(u),
            lambda x=x: model.predict(x, batch_size=BATCH, verbose=0),
        )
        our_rate, udf_rate, single = (rows / s for s in seconds)
        log(
            f"{label} ({rows:,} rows): transform {our_rate:,.0f} rows/s, predict_batch_udf "
            f"{udf_rate:,.0f} rows/s, single-process predict {single:,.0f} rows/s"
        )
        report.series(
            "inference",
            {
                "rows": rows,
                "transform": our_rate,
                "predict_batch_udf": udf_rate,
                "single_process": single,
            },
        )
        full = label == "train set"
        report.add(
            "inference",
            f"transform vs predict_batch_udf, {label}",
            ours=our_rate,
            unit="rows/s",
            reference=udf_rate,
            reference_name="predict_batch_udf",
            target=1.0 if full else None,
        )
        report.add(
            "inference",
            f"transform vs single-process predict, {label}",
            ours=our_rate,
            unit="rows/s",
            reference=single,
            reference_name="model.predict, batch 1024",
            target=0.5 if full else None,
        )
    spark.stop()


def main() -> None:
    section_main("inference", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()

"""Size of a saved KerasTransformer against the .keras file of the same model.

    .venv/bin/python benchmarks/saved_model_size.py

For the digits MLP (64-64-10) and the wide MLP (256-1024-1024-10, about 1.3M parameters): the
bytes of ``model.save("m.keras")`` and the bytes of the folder ``KerasTransformer.save`` writes
(Spark ML metadata, the parquet model table, and Hadoop's checksum and marker files).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

logger = logging.getLogger("saved_model_size")


def folder_bytes(path: Path) -> dict[str, int]:
    sizes = {"metadata": 0, "model table": 0, "checksums and markers": 0}
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        if file.name.endswith(".crc") or file.name == "_SUCCESS":
            sizes["checksums and markers"] += file.stat().st_size
        elif "metadata" in file.parts:
            sizes["metadata"] += file.stat().st_size
        else:
            sizes["model table"] += file.stat().st_size
    return sizes


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import keras
    from pyspark.sql import SparkSession

    from spark_keras_ml import KerasTransformer

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    models = {
        "digits 64-64-10": [64, 64, 10],
        "wide 256-1024-1024-10": [256, 1024, 1024, 10],
    }
    logger.info("| model | parameters | .keras bytes | saved folder bytes | ratio | of which |")
    logger.info("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="skml-size-") as folder:
        for name, widths in models.items():
            keras.utils.set_random_seed(0)
            layers = [keras.layers.Dense(w, activation="relu") for w in widths[1:-1]]
            model = keras.Sequential(
                [keras.Input((widths[0],)), *layers, keras.layers.Dense(widths[-1], "softmax")]
            )
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
            archive = Path(folder, f"{widths[-2]}.keras")
            model.save(archive)
            saved = Path(folder, f"{widths[-2]}-stage")
            KerasTransformer(model=model, history={"loss": [1.0] * 10}).save(str(saved))
            parts = folder_bytes(saved)
            total = sum(parts.values())
            logger.info(
                "| %s | %d | %d | %d | %.3f | %s |",
                name,
                model.count_params(),
                archive.stat().st_size,
                total,
                total / archive.stat().st_size,
                ", ".join(f"{k} {v}" for k, v in parts.items()),
            )
    spark.stop()


if __name__ == "__main__":
    main()

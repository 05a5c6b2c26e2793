"""Custom layers and losses on the executors: shipped and named in customObjects they work (and
persist); when an executor cannot import them, the error names the module or the class."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from spark_keras_ml import KerasEstimator, KerasTransformer, allow_custom_objects, persistence
from tests.conftest import digits_model
from tests.integration.saved import edit_metadata

SOURCE = """
import keras


@keras.saving.register_keras_serializable(package="{name}")
class Scale(keras.layers.Layer):
    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        return inputs * self.factor

    def get_config(self):
        return {{**super().get_config(), "factor": self.factor}}


@keras.saving.register_keras_serializable(package="{name}")
def class_loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
"""


def custom_module(folder: Path, name: str):  # type: ignore[no-untyped-def]
    """Write module ``name`` and import it on the driver only."""
    path = folder / f"{name}.py"
    path.write_text(SOURCE.format(name=name))
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name), path
    finally:
        sys.path.remove(str(folder))


def model_with(module):  # type: ignore[no-untyped-def]
    import keras

    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            module.Scale(2.0),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss=module.class_loss, metrics=["accuracy"])
    return model


@pytest.fixture
def allow_list(monkeypatch):  # type: ignore[no-untyped-def]
    """This process's allow-list, emptied for the test and restored after it."""
    monkeypatch.setattr(persistence, "_allowed", set())


def test_shipped_custom_objects_train_predict_and_persist(
    spark, digits, tmp_path, allow_list
) -> None:  # type: ignore[no-untyped-def]
    module, path = custom_module(tmp_path, "skml_custom_shipped")
    spark.sparkContext.addPyFile(str(path))
    train, test = digits
    est = KerasEstimator(
        model=model_with(module), epochs=8, numWorkers=2, customObjects=[module.__name__]
    )
    fitted = est.fit(train)
    assert fitted.history["loss"][-1] < fitted.history["loss"][0]
    fitted.save(str(tmp_path / "model"))
    with pytest.raises(ValueError, match=r"allow_custom_objects\('skml_custom_shipped'\)"):
        KerasTransformer.load(str(tmp_path / "model"))
    allow_custom_objects(module.__name__)
    loaded = KerasTransformer.load(str(tmp_path / "model"))
    assert loaded.getCustomObjects() == [module.__name__]

    def probabilities(stage):  # type: ignore[no-untyped-def]
        rows = stage.transform(test).orderBy("label", "features").select("probability").collect()
        return np.stack([r["probability"].toArray() for r in rows])

    np.testing.assert_array_equal(probabilities(fitted), probabilities(loaded))


def test_a_module_executors_cannot_import_is_named(spark, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    module, _ = custom_module(tmp_path, "skml_custom_driver_only")
    train, _ = digits
    est = KerasEstimator(
        model=model_with(module), epochs=1, numWorkers=2, customObjects=[module.__name__]
    )
    with pytest.raises(RuntimeError) as info:
        est.fit(train)
    message = str(info.value)
    assert "skml_custom_driver_only" in message and "addPyFile" in message, message


def test_a_class_executors_cannot_find_is_named(spark, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    module, _ = custom_module(tmp_path, "skml_custom_unlisted")
    train, _ = digits
    est = KerasEstimator(model=model_with(module), epochs=1, numWorkers=2)
    with pytest.raises(RuntimeError) as info:
        est.fit(train)
    message = str(info.value)
    assert "Scale" in message and "customObjects" in message, message


MARKER = "import pathlib\n\npathlib.Path({marker!r}).write_text('imported')\n"


def test_a_saved_stage_imports_no_module_this_process_did_not_allow(
    spark, digits, tmp_path, allow_list
) -> None:  # type: ignore[no-untyped-def]
    from pyspark.ml import PipelineModel

    name = "skml_marker_on_import"
    marker = tmp_path / "imported"
    source = tmp_path / f"{name}.py"
    source.write_text(MARKER.format(marker=str(marker)))
    spark.sparkContext.addPyFile(str(source))  # importable on the driver and the executors
    _, test = digits
    stage = KerasTransformer(model=digits_model())
    alone, pipeline = tmp_path / "scorer", tmp_path / "pipeline"
    stage.save(str(alone))
    PipelineModel(stages=[stage]).save(str(pipeline))
    (in_pipeline,) = (pipeline / "stages").iterdir()
    for folder in (alone, in_pipeline):
        edit_metadata(folder, lambda m: m["paramMap"].update(customObjects=[name]))

    refused = rf"allow_custom_objects\('{name}'\).*spark.keras.customObjects={name}.*Received"
    for load in (
        lambda: KerasTransformer.load(str(alone)),
        lambda: PipelineModel.load(str(pipeline)),
    ):
        with pytest.raises(ValueError, match=refused):
            load().transform(test).count()
    assert not marker.exists()

    spark.conf.set("spark.keras.customObjects", f"other.module, {name}")
    try:
        assert PipelineModel.load(str(pipeline)).transform(test).count() == test.count()
    finally:
        spark.conf.unset("spark.keras.customObjects")
    assert marker.exists()

    allow_custom_objects(name)
    loaded = KerasTransformer.load(str(alone))
    assert loaded.getCustomObjects() == [name]
    assert loaded.transform(test).count() == test.count()


def test_allow_custom_objects_refuses_what_is_no_module_name(allow_list) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"Expected dotted module names.*Received: \['os; rm'\]"):
        allow_custom_objects("fine.module", "os; rm")
    assert persistence._allowed == set()

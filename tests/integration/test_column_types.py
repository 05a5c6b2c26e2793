"""Every column type a DataFrame holds reaches the model as its keras.Input declares: integer ids
exactly, raw strings into lookup layers, a dict of inputs and outputs by name, padded sequences
into masking models; values that would change on the way are refused naming the column."""

from __future__ import annotations

import numpy as np
import pytest

from spark_keras_ml import KerasEstimator, KerasTransformer
from tests.integration.test_cli import score_here

pytestmark = pytest.mark.usefixtures("spark")

#: Ids no float32 holds: each rounds to a neighbour's float (2^40 + 1 and 2^40 + 2 share one).
BASE = 2**40
USERS = np.arange(BASE + 1, BASE + 6, dtype="int64")
CITIES = ["paris", "oslo", "rome", "lima"]


def structured_rows(n: int = 400) -> list[tuple[str, int, float, float]]:
    """(city, user id, age, churned): churn depends on the city and on the exact id."""
    rng = np.random.default_rng(3)
    city = rng.choice(CITIES, n)
    user = rng.choice(USERS, n)
    age = rng.uniform(18, 80, n)
    churned = ((city == "oslo") | (user % 2 == 0)).astype(float)
    return [(str(c), int(u), float(a), float(y)) for c, u, a, y in zip(city, user, age, churned)]


def structured_model():  # type: ignore[no-untyped-def]
    """The structured-data examples' style: a dict of raw inputs, looked up inside the model."""
    import keras

    keras.utils.set_random_seed(5)
    inputs = {
        "city": keras.Input(shape=(1,), dtype="string", name="city"),
        "user": keras.Input(shape=(1,), dtype="int64", name="user"),
        "age": keras.Input(shape=(1,), name="age"),
    }
    features = keras.layers.Concatenate()(
        [
            keras.layers.StringLookup(vocabulary=CITIES, output_mode="one_hot")(inputs["city"]),
            keras.layers.IntegerLookup(vocabulary=USERS, output_mode="one_hot")(inputs["user"]),
            keras.layers.Normalization(mean=50.0, variance=300.0)(inputs["age"]),
        ]
    )
    hidden = keras.layers.Dense(16, activation="relu")(features)
    output = keras.layers.Dense(1, activation="sigmoid")(hidden)
    model = keras.Model(inputs, output)
    model.compile(
        optimizer=keras.optimizers.Adam(0.02), loss="binary_crossentropy", metrics=["accuracy"]
    )
    return model


def reloaded(fitted, path):  # type: ignore[no-untyped-def]
    fitted.save(str(path))
    return KerasTransformer.load(str(path))


def predictions(model, df, column="prediction"):  # type: ignore[no-untyped-def]
    return [r[column] for r in model.transform(df).select(column).collect()]


@pytest.fixture(scope="module")
def structured(spark):  # type: ignore[no-untyped-def]
    columns = ["city", "user", "age", "churned"]
    return spark.createDataFrame(structured_rows(), columns).repartition(2).cache()


def test_ids_above_float32_reach_an_integer_lookup_exactly(spark) -> None:  # type: ignore[no-untyped-def]
    import keras

    ids = keras.Input(shape=(1,), dtype="int64", name="user")
    index = keras.layers.IntegerLookup(vocabulary=USERS[:4])(ids)
    model = keras.Model(ids, keras.ops.cast(index, "float32"))
    users = [int(u) for u in USERS]  # the last one is out of the vocabulary: index 0
    expected = model.predict(np.array(users).reshape(-1, 1), verbose=0).ravel().tolist()
    assert expected == [1.0, 2.0, 3.0, 4.0, 0.0]

    df = spark.createDataFrame([(u,) for u in users], ["user"])
    scorer = KerasTransformer(model=model, featuresCol="user", outputKind="regressor")
    rows = scorer.transform(df).orderBy("user").collect()
    assert [r["prediction"] for r in rows] == expected


def test_structured_data_of_raw_strings_and_ids_trains_and_scores_alike_in_the_score_job(
    spark,  # type: ignore[no-untyped-def]
    structured,  # type: ignore[no-untyped-def]
    tmp_path,  # type: ignore[no-untyped-def]
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    estimator = KerasEstimator(
        model=structured_model(),
        featuresCols=["city", "user", "age"],  # matched to the dict's keys by name
        labelCol="churned",
        epochs=10,
        batchSize=32,
        numWorkers=2,
        seed=2,
    )
    fitted = estimator.fit(structured)
    assert fitted.history["accuracy"][-1] >= 0.97  # needs the exact ids: rounded, ids merge

    # The fitted model scores as Keras itself does on the same rows.
    rows = structured.orderBy("user", "city", "age").collect()
    model = fitted.getKerasModel()
    import tensorflow as tf

    keras_p = model.predict(
        {
            "city": tf.constant([[r["city"]] for r in rows]),  # Keras takes strings as tensors
            "user": np.array([[r["user"]] for r in rows], dtype="int64"),
            "age": np.array([[r["age"]] for r in rows], dtype="float32"),
        },
        verbose=0,
    ).ravel()
    here = fitted.transform(structured).orderBy("user", "city", "age")
    probabilities = [r["probability"][1] for r in here.select("probability").collect()]
    np.testing.assert_allclose(probabilities, keras_p, rtol=1e-5, atol=1e-6)

    # The production scoring job, from the saved files, on the table as stored: the same scores.
    # (test_saved_pipelines loads in a fresh process; the score command's process is test_cli's.)
    fitted.save(str(tmp_path / "model"))
    structured.write.parquet(str(tmp_path / "input.parquet"))
    output = tmp_path / "scored.parquet"
    code, err = score_here(
        spark, capsys,
        "--model", str(tmp_path / "model"), "--input", str(tmp_path / "input.parquet"),
        "--output", str(output),
    )  # fmt: skip
    assert code == 0, err[-3000:]
    scored = spark.read.parquet(str(output)).orderBy("user", "city", "age")
    assert scored.schema["user"].dataType.simpleString() == "bigint"
    there = [r["probability"][1] for r in scored.select("probability").collect()]
    np.testing.assert_allclose(there, probabilities, rtol=1e-6, atol=1e-7)


def test_an_id_a_float32_input_would_round_is_refused_naming_the_column(structured) -> None:  # type: ignore[no-untyped-def]
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    estimator = KerasEstimator(
        model=model, featuresCol="user", labelCol="churned", epochs=1, numWorkers=2
    )
    with pytest.raises(RuntimeError) as info:
        estimator.fit(structured)
    message = str(info.value)
    assert "`user`" in message and "float32 holds exactly" in message, message
    assert 'dtype="int64"' in message and str(BASE + 1)[:6] in message, message


def test_fractions_into_an_int_input_are_refused_in_transform(spark) -> None:  # type: ignore[no-untyped-def]
    import keras

    ids = keras.Input(shape=(1,), dtype="int32", name="code")
    model = keras.Model(ids, keras.ops.cast(ids, "float32"))
    df = spark.createDataFrame([(1.0,), (2.5,)], ["code"])
    scorer = KerasTransformer(model=model, featuresCol="code", outputKind="regressor")
    with pytest.raises(Exception, match=r"whole numbers for a int32 input in `code`"):
        scorer.transform(df).collect()
    whole = spark.createDataFrame([(1.0,), (7.0,)], ["code"])
    assert [r["prediction"] for r in scorer.transform(whole).collect()] == [1.0, 7.0]


def test_strings_into_a_number_input_are_refused_before_any_job(structured) -> None:  # type: ignore[no-untyped-def]
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    estimator = KerasEstimator(
        model=model, featuresCol="city", labelCol="churned", loss="binary_crossentropy"
    )
    with pytest.raises(ValueError) as info:
        estimator.fit(structured)
    message = str(info.value)
    assert "`city`" in message and "(float32)" in message and "StringLookup" in message
    assert "Received: city of type string" in message


def test_null_strings_are_refused_naming_the_column(spark) -> None:  # type: ignore[no-untyped-def]
    import keras

    words = keras.Input(shape=(1,), dtype="string", name="city")
    model = keras.Model(words, keras.layers.StringLookup(vocabulary=CITIES)(words))
    df = spark.createDataFrame([("oslo",), (None,)], "city string")
    scorer = KerasTransformer(model=model, featuresCol="city", outputKind="raw")
    with pytest.raises(Exception, match=r"no null values in `city`"):
        scorer.transform(df).collect()


def test_text_and_string_arrays_feed_lookup_layers(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import keras
    from pyspark.ml.evaluation import BinaryClassificationEvaluator

    rng = np.random.default_rng(0)
    good, bad = ["great", "fine", "love"], ["awful", "bad", "hate"]
    rows = []
    for i in range(300):
        positive = bool(i % 2)
        words = list(rng.choice(good if positive else bad, 2)) + list(rng.choice(CITIES, 2))
        rng.shuffle(words)
        rows.append((" ".join(words), [str(w) for w in words[:3]], float(positive)))
    df = spark.createDataFrame(rows, "text string, tags array<string>, label double")

    keras.utils.set_random_seed(1)
    text = keras.Input(shape=(), dtype="string", name="text")
    tags = keras.Input(shape=(3,), dtype="string", name="tags")
    vectorize = keras.layers.TextVectorization(output_mode="multi_hot")
    vectorize.adapt([r[0] for r in rows])
    lookup = keras.layers.StringLookup(vocabulary=good + bad + CITIES, output_mode="multi_hot")
    features = keras.layers.Concatenate()([vectorize(text), lookup(tags)])
    output = keras.layers.Dense(1, activation="sigmoid")(features)
    model = keras.Model([text, tags], output)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")

    fitted = KerasEstimator(
        model=model, featuresCols=["text", "tags"], epochs=8, batchSize=32, numWorkers=2
    ).fit(df)
    auc = BinaryClassificationEvaluator().evaluate(fitted.transform(df))
    assert auc >= 0.99
    loaded = reloaded(fitted, tmp_path / "model")  # the vocabularies travel in the .keras file
    assert predictions(loaded, df, "probability") == predictions(fitted, df, "probability")


def test_dict_outputs_take_their_labels_by_name(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import keras

    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4))
    rows = [
        (v.tolist(), float(v[0] + 2 * v[1]), float(v[2] > 0)) for v in x
    ]  # a regression target and a class
    df = spark.createDataFrame(rows, "features array<double>, amount double, kind double")

    keras.utils.set_random_seed(2)
    inputs = keras.Input(shape=(4,), name="features")
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    outputs = {
        "kind": keras.layers.Dense(2, activation="softmax", name="kind_head")(hidden),
        "amount": keras.layers.Dense(1, name="amount_head")(hidden),
    }
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss={"amount": "mse", "kind": "sparse_categorical_crossentropy"},
        metrics={"kind": ["accuracy"]},
    )
    fitted = KerasEstimator(
        model=model, labelCols=["kind", "amount"], epochs=15, batchSize=32, numWorkers=2
    ).fit(df)
    assert fitted.history["kind_accuracy"][-1] >= 0.9
    assert fitted.history["amount_loss"][-1] < 0.1

    # transform's raw output: the outputs in the order of their keys (amount, then kind).
    scored = fitted.transform(df.limit(50)).select("features", "prediction").collect()
    expected = fitted.getKerasModel().predict(
        np.array([r["features"] for r in scored], dtype="float32"), verbose=0
    )
    got = np.array([r["prediction"] for r in scored])
    np.testing.assert_allclose(got[:, :1], expected["amount"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[:, 1:], expected["kind"], rtol=1e-4, atol=1e-5)
    loaded = reloaded(fitted, tmp_path / "model")
    assert predictions(loaded, df) == predictions(fitted, df)


def test_masking_models_train_on_padded_sequences(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Variable-length sequences padded with zeros (ids from 1) into Embedding(mask_zero=True):
    the label is whether token 7 occurs, so padding must not count."""
    import keras
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    rng = np.random.default_rng(4)
    rows = []
    for i in range(600):
        length = int(rng.integers(2, 10))
        tokens = rng.integers(1, 7, length)  # 1..6
        if i % 2:
            tokens[rng.integers(0, length)] = 7
        padded = np.zeros(10, dtype=int)
        padded[:length] = tokens
        rows.append(([int(t) for t in padded], float(i % 2)))
    df = spark.createDataFrame(rows, "tokens array<int>, label double")

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input(shape=(10,), dtype="int32"),
            keras.layers.Embedding(8, 8, mask_zero=True),
            keras.layers.GRU(8),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    fitted = KerasEstimator(
        model=model, featuresCol="tokens", epochs=10, batchSize=32, numWorkers=2
    ).fit(df)
    scored = fitted.transform(df)
    assert MulticlassClassificationEvaluator(metricName="accuracy").evaluate(scored) >= 0.95
    # The mask is honoured: the padded row predicts what its unpadded tokens do.
    embed, gru, dense = fitted.getKerasModel().layers
    short = np.array([[3, 7, 2, 0, 0, 0, 0, 0, 0, 0]], dtype="int32")
    padded = fitted.getKerasModel().predict(short, verbose=0)
    unpadded = keras.ops.convert_to_numpy(dense(gru(embed(short[:, :3]))))
    np.testing.assert_allclose(padded, unpadded, rtol=1e-5, atol=1e-6)
    loaded = reloaded(fitted, tmp_path / "model")
    assert predictions(loaded, df, "probability") == predictions(fitted, df, "probability")


def test_timestamps_are_refused_saying_how_to_make_numbers_of_them(spark) -> None:  # type: ignore[no-untyped-def]
    import datetime

    import keras

    model = keras.Sequential([keras.Input((1,), dtype="int64"), keras.layers.Dense(1)])
    df = spark.createDataFrame([(datetime.datetime(2026, 1, 1), 1.0)], ["seen", "label"])
    estimator = KerasEstimator(model=model, featuresCol="seen", loss="mse")
    with pytest.raises(ValueError, match=r"`seen`.*F\.unix_timestamp.*seen of type timestamp"):
        estimator.fit(df)

"""Transport-security guard and secret hygiene, without Spark."""

from __future__ import annotations

import pytest

from spark_keras_ml.cluster import ALLOW_UNENCRYPTED_CONF, check_transport_security
from spark_keras_ml.config import Layout, TrainConfig
from spark_keras_ml.ps.protocol import new_secret


def reader(settings: dict[str, str]):  # type: ignore[no-untyped-def]
    return lambda key, default: settings.get(key, default)


def test_plain_cluster_is_accepted() -> None:
    check_transport_security(reader({}))


@pytest.mark.parametrize(
    "key", ["spark.authenticate", "spark.ssl.enabled", "spark.network.crypto.enabled"]
)
def test_secured_cluster_is_refused_unless_allowed(key: str) -> None:
    with pytest.raises(RuntimeError, match=rf"{ALLOW_UNENCRYPTED_CONF}=true.*{key}=true"):
        check_transport_security(reader({key: "true"}))
    check_transport_security(reader({key: "true", ALLOW_UNENCRYPTED_CONF: "TRUE"}))


def test_secret_never_shows_in_the_task_config_repr() -> None:
    secret = new_secret()
    config = TrainConfig(
        host="127.0.0.1",
        port=1,
        secret=secret,
        model_bytes=b"model",
        compile_config={},
        frequency="epoch",
        epochs=1,
        batch_size=1,
        timeout=1.0,
        seed=0,
        task_cpus=1,
        layout=Layout(inputs=((1,),)),
    )
    text = repr(config)
    assert "secret" not in text and secret.hex() not in text and repr(secret) not in text
    assert len(secret) == 32 and new_secret() != secret

"""Settings (env prefix, .env, refusals) and wire messages (decode errors name the problem)."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from shared.errors import DecodeError, MessageTooLargeError, SchemaError, TaskConfigError
from shared.messages import TaskSubmission, decode, encode, task_id_for_key
from shared.settings import Settings
from shared.task_types import validate_config


def test_env_prefix_and_dotenv(monkeypatch, tmp_path):
    for name in [k for k in os.environ if k.startswith("TP_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TP_NAMESPACE=fromdotenv\nTP_WORKER_GPU_SLOTS=2\n")
    monkeypatch.setenv("TP_WORKER_GPU_SLOTS", "3")
    s = Settings()
    assert s.namespace == "fromdotenv"
    assert s.worker_gpu_slots == 3  # the environment beats .env
    assert s.tracking_uri == f"sqlite:///{(tmp_path / 'data' / 'mlflow.db')}"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"TP_AMQP_URL": "http://x"}, "amqp_url"),
        ({"TP_REDIS_URL": "mysql://x"}, "redis_url"),
        ({"TP_WORKER_GPU_SLOTS": "-1"}, "worker_gpu_slots"),
        ({"TP_AMQP_CA_FILE": "/nonexistent/ca.pem"}, "TP_AMQP_CA_FILE"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(monkeypatch, env, name):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=name):
        Settings(_env_file=None)


def test_tls_context_and_redaction():
    s = Settings(amqp_url="amqps://user:s3cret@broker:5671/", _env_file=None)
    assert s.amqp_ssl_context() is not None
    assert s.redact(s.amqp_url) == "amqps://user:***@broker:5671/"
    assert Settings(_env_file=None).amqp_ssl_context() is None


def test_decode_refuses_oversize_garbage_and_schema_errors():
    good = TaskSubmission(task_id="x1", task_type="probe", submitted_at=1.0)
    assert decode(encode(good), TaskSubmission, max_bytes=10_000) == good
    with pytest.raises(MessageTooLargeError):
        decode(b"{" + b" " * 5000 + b"}", TaskSubmission, max_bytes=1024)
    with pytest.raises(DecodeError, match="undecodable"):
        decode(b"\x80\x81 pickle?", TaskSubmission, max_bytes=1024)
    bad = json.dumps(
        {
            "task_id": "../../etc",
            "task_type": "probe",
            "submitted_at": 1,
            "priority": 11,
            "schema_version": 2,
        }
    ).encode()
    with pytest.raises(SchemaError) as e:
        decode(bad, TaskSubmission, max_bytes=1024)
    for field in ("task_id", "priority", "schema_version"):
        assert field in str(e.value)


def test_config_errors_name_every_field_and_idempotency_ids_are_stable():
    with pytest.raises(TaskConfigError) as e:
        validate_config("train_model", {"epochs": 0, "modell": "lstm", "device": "tpu"})
    message = str(e.value)
    assert "epochs" in message and "modell" in message and "device" in message
    assert task_id_for_key("nightly") == task_id_for_key("nightly") != task_id_for_key("other")


def test_readme_settings_table_lists_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"| `TP_{name.upper()}` |" in readme, name

"""Settings: one table, CLI > environment > default, clear errors."""

import re

import pytest

from keras_server.cli import main
from keras_server.settings import KNOBS, Settings, SettingsError, load_settings


def test_defaults() -> None:
    settings = load_settings([], environ={})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 5000
    assert settings.batch_size == 32
    assert settings.max_upload_bytes == 16 * 1024 * 1024
    assert settings.redis_url_given is False


def test_environment_then_command_line() -> None:
    env = {"KERAS_SERVER_BATCH_SIZE": "8", "KERAS_SERVER_PORT": "6000"}
    from_env = load_settings([], environ=env)
    assert (from_env.batch_size, from_env.port) == (8, 6000)
    both = load_settings(["--batch-size", "4"], environ=env)
    assert (both.batch_size, both.port) == (4, 6000)


def test_redis_url_given_is_tracked() -> None:
    assert load_settings(["--redis-url", "redis://h:1/0"], environ={}).redis_url_given
    env = {"KERAS_SERVER_REDIS_URL": "redis://h:1/0"}
    assert load_settings([], environ=env).redis_url_given


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size='0': must be a whole number of at least 1"),
        (["--batch-size", "many"], "--batch-size='many': must be a whole number"),
        (["--port", "70000"], "--port='70000': must be a TCP port"),
        (["--result-timeout", "-1"], "--result-timeout='-1': must be a number greater than 0"),
        (["--result-timeout", "nan"], "greater than 0"),
        (["--role", "gpu"], "--role='gpu': must be one of all, web, worker"),
        (["--redis-url", "localhost:6379"], "must start with redis://"),
        (["--max-queue", "100001"], "--max-queue='100001': must be at most 100000"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(argv, environ={})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="KERAS_SERVER_MAX_UPLOAD_MB='big'"):
        load_settings([], environ={"KERAS_SERVER_MAX_UPLOAD_MB": "big"})


def test_every_field_but_derived_ones_has_a_knob() -> None:
    fields = set(Settings.__dataclass_fields__) - {"redis_url_given"}
    assert {knob.field for knob in KNOBS} == fields


def test_entry_point_exits_2_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--batch-size", "-3"]) == 2
    assert "--batch-size='-3'" in capsys.readouterr().err

"""Configuration from the environment (SPEC §3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.matrix.config import Config, ConfigError

BASE = {
    "MATRIX_HOMESERVER": "http://127.0.0.1:8008/",
    "MATRIX_USER_ID": "@lambda:localhost",
    "MATRIX_PASSWORD": "pw",
}


def test_defaults():
    config = Config.from_env({**BASE, "LOG_FORMAT": "json"})
    assert config.homeserver == "http://127.0.0.1:8008"
    assert config.db_path == Path("lambda_matrix.db")
    assert config.store_path == Path("matrix_store")
    assert (config.log_format, config.log_level) == ("json", "info")
    assert config.server_name == "localhost"


def test_token_instead_of_password():
    env = {**BASE, "MATRIX_ACCESS_TOKEN": "syt_x"}
    del env["MATRIX_PASSWORD"]
    assert Config.from_env(env).access_token == "syt_x"


def test_every_problem_is_named_at_once():
    with pytest.raises(ConfigError) as err:
        Config.from_env({"MATRIX_USER_ID": "lambda", "LOG_LEVEL": "loud", "LOG_FORMAT": "xml"})
    message = str(err.value)
    for part in (
        "MATRIX_HOMESERVER is required",
        "MATRIX_USER_ID must look like @name:server",
        "MATRIX_PASSWORD or MATRIX_ACCESS_TOKEN",
        "LOG_LEVEL",
        "LOG_FORMAT",
    ):
        assert part in message


def test_homeserver_must_be_a_url():
    with pytest.raises(ConfigError, match="http"):
        Config.from_env({**BASE, "MATRIX_HOMESERVER": "localhost:8008"})


def test_to_env_round_trips():
    config = Config.from_env({**BASE, "LOG_FORMAT": "json", "LAMBDA_MATRIX_DB": "x/y.db"})
    assert Config.from_env(config.to_env()) == config


def test_delivery_settings_have_defaults_and_are_validated():
    config = Config.from_env(BASE)
    assert (config.agent, config.concurrency, config.catchup_hours) == (
        "core.agent:EchoAgent",
        256,
        24.0,
    )
    tuned = Config.from_env(
        {
            **BASE,
            "LAMBDA_AGENT": "my_pkg.agents:make",
            "LAMBDA_CONCURRENCY": "4",
            "LAMBDA_CATCHUP_HOURS": "0.5",
        }
    )
    assert (tuned.agent, tuned.concurrency, tuned.catchup_hours) == ("my_pkg.agents:make", 4, 0.5)
    with pytest.raises(ConfigError) as err:
        Config.from_env(
            {
                **BASE,
                "LAMBDA_AGENT": "no colon",
                "LAMBDA_CONCURRENCY": "0",
                "LAMBDA_CATCHUP_HOURS": "soon",
            }
        )
    for name in ("LAMBDA_AGENT", "LAMBDA_CONCURRENCY", "LAMBDA_CATCHUP_HOURS"):
        assert name in str(err.value)


def test_who_may_use_the_bot_defaults_to_its_own_server_and_is_validated():
    config = Config.from_env(BASE)
    assert (config.allowed_patterns, config.max_chats) == (("@*:localhost",), 100)
    tuned = Config.from_env(
        {**BASE, "LAMBDA_ALLOWED_USERS": " @*:example.org, @ann:other.org", "LAMBDA_MAX_CHATS": "3"}
    )
    assert tuned.allowed_patterns == ("@*:example.org", "@ann:other.org")
    assert Config.from_env(tuned.to_env()) == tuned
    with pytest.raises(ConfigError) as err:
        Config.from_env({**BASE, "LAMBDA_ALLOWED_USERS": "example.org", "LAMBDA_MAX_CHATS": "-1"})
    assert "LAMBDA_ALLOWED_USERS" in str(err.value) and "LAMBDA_MAX_CHATS" in str(err.value)


def test_the_metrics_address_is_host_and_port_and_unset_means_none():
    assert Config.from_env(BASE).metrics_addr is None
    for raw, host, port in [
        ("127.0.0.1:9464", "127.0.0.1", 9464),
        ("[::1]:9464", "::1", 9464),
        ("localhost:0", "localhost", 0),
    ]:
        config = Config.from_env({**BASE, "LOG_FORMAT": "json", "LAMBDA_METRICS_ADDR": raw})
        assert config.metrics_addr is not None
        assert (config.metrics_addr.host, config.metrics_addr.port) == (host, port)
        assert config.to_env()["LAMBDA_METRICS_ADDR"] == raw
        assert Config.from_env(config.to_env()) == config
    for raw in ("9464", "127.0.0.1", "127.0.0.1:70000", ":9464", "http://127.0.0.1:9464", "::1:9"):
        with pytest.raises(ConfigError, match="LAMBDA_METRICS_ADDR must be host:port"):
            Config.from_env({**BASE, "LAMBDA_METRICS_ADDR": raw})

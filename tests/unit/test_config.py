"""Tests of the server configuration: the original qlib-server keys load, bad values are named."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pydantic
import pytest
import yaml

from qlib_server.config import ServerConfig, load_config, make_config
from qlib_server.errors import ConfigError


def original_template(tmp_path: Path) -> dict:
    """Every key of the original qlib-server ``config_template.yaml``, filled in as a deployment would."""
    return {
        "provider_uri": str(tmp_path / "qlib_data"),
        "region": "cn",
        "flask_server": "0.0.0.0",
        "flask_port": 9710,
        "queue_host": "rabbitmq.internal",
        "queue_user": "qlib",
        "queue_pwd": "secret",
        "task_queue": "qlib_tasks",
        "message_queue": "qlib_messages",
        "max_concurrency": 10,
        "max_process": 10,
        "redis_host": "redis.internal",
        "redis_port": 6379,
        "redis_task_db": 1,
        "auto_update": 0,
        "update_time": "23:45",
        "client_version": ">=0.4.0",
        "server_version": ">=0.4.0",
        "dataset_cache_dir_name": "dataset_cache",
        "features_cache_dir_name": "features_cache",
        "logging_level": "INFO",
        "logging_config": {
            "version": 1,
            "formatters": {"plain": {"format": "[%(process)s](%(asctime)s) %(levelname)s - %(name)s - %(message)s"}},
            "filters": {
                "quiet": {"()": "qlib_server.log.LogFilter", "param": [".*?WARN: data not found for.*?"]},
            },
            "handlers": {
                "console": {"class": "logging.StreamHandler", "level": "DEBUG", "formatter": "plain",
                            "filters": ["quiet"], "stream": "ext://sys.stdout"},
                "file": {"class": "logging.FileHandler", "mode": "w", "filename": str(tmp_path / "qlib_server.log"),
                         "level": "INFO", "formatter": "plain", "filters": ["quiet"]},
            },
            "loggers": {"qlib": {"level": "DEBUG", "handlers": ["console"]}},
            "root": {"handlers": ["file"], "level": "INFO"},
        },
    }


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_original_template_keys_load(tmp_path):
    values = original_template(tmp_path)
    cfg = load_config(write_yaml(tmp_path / "config.yaml", values))
    for key, value in values.items():
        if key == "auto_update":
            assert cfg.auto_update is False
        else:
            assert getattr(cfg, key) == value, key
    assert cfg.amqp_url == "amqp://qlib:secret@rabbitmq.internal:5672/%2F"
    assert cfg.dataset_cache_dir == tmp_path / "qlib_data" / "dataset_cache"


def test_original_template_as_the_original_yaml_text_loads(tmp_path):
    text = textwrap.dedent(f"""\
        provider_uri: {tmp_path}
        region: cn
        flask_server: 127.0.0.1
        flask_port: 9710
        queue_host: 127.0.0.1
        queue_user: guest
        queue_pwd: guest
        task_queue: tasks
        message_queue: messages
        max_concurrency: 10
        max_process: 10
        redis_host: 127.0.0.1
        redis_port: 6379
        redis_task_db: 1
        auto_update: 1
        update_time: '23:45'
        client_version: '>=0.4.0'
        server_version: '>=0.4.0'
        dataset_cache_dir_name: dataset_cache
        features_cache_dir_name: features_cache
        logging_level: INFO
        logging_config:
          version: 1
          filters:
            mail_filter:
              (): qlib_server.log.LogFilter
              param:
                - '.*?WARN: data not found for.*?'
          handlers:
            console:
              class: logging.StreamHandler
              level: DEBUG
          root:
            handlers:
              - console
        """)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.auto_update is True and cfg.max_concurrency == 10 and cfg.update_time == "23:45"
    assert cfg.logging_config["filters"]["mail_filter"]["()"] == "qlib_server.log.LogFilter"


def test_original_logging_config_with_its_filter_is_applied(tmp_path):
    """The dict config, including the ``(): qlib_server.log.LogFilter`` filter, works in a fresh process."""
    config_path = write_yaml(tmp_path / "config.yaml", original_template(tmp_path))
    script = textwrap.dedent(f"""
        import logging
        from qlib_server.config import load_config
        from qlib_server.log import setup_logging
        setup_logging(load_config({str(config_path)!r}))
        logging.getLogger("qlib.data").info("kept message")
        logging.getLogger("qlib.data").warning("WARN: data not found for SH600000")
        logging.getLogger("elsewhere").info("root message")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "kept message" in done.stdout
    assert "data not found" not in done.stdout
    logged = (tmp_path / "qlib_server.log").read_text()
    assert "root message" in logged and "data not found" not in logged


def test_the_originals_retired_keys_are_tolerated(tmp_path):
    values = {**original_template(tmp_path), "flask_ping_interval": 25, "inactivity_timeout": 3600}
    assert load_config(write_yaml(tmp_path / "config.yaml", values)).flask_port == 9710


def test_defaults_need_only_provider_uri():
    cfg = make_config(provider_uri="/data/qlib")
    assert isinstance(cfg, ServerConfig)
    assert (cfg.region, cfg.flask_port, cfg.client_version) == ("cn", 9710, ">=0.4.0")


def test_overrides_win_over_the_file(tmp_path):
    path = write_yaml(tmp_path / "config.yaml", original_template(tmp_path))
    assert load_config(path, flask_port=9999).flask_port == 9999


@pytest.mark.parametrize("key", ["flask_prot", "queue_password", "max_processes", "Provider_uri_typo"])
def test_unknown_key_is_named(tmp_path, key):
    path = write_yaml(tmp_path / "config.yaml", {**original_template(tmp_path), key: 1})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"unknown key {key!r}" in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("flask_port", 70000),
    ("flask_port", 0),
    ("redis_port", -1),
    ("queue_port", "amqp"),
    ("update_time", "25:99"),
    ("update_time", "24:00"),
    ("update_time", "noon"),
    ("client_version", "abc"),
    ("server_version", ">=>0.4"),
    ("region", "mars"),
    ("max_process", 0),
    ("max_concurrency", 0),
    ("redis_task_db", 16),
    ("logging_level", "LOUD"),
    ("allowed_networks", ["10.0.0.0/33"]),
])
def test_bad_values_are_refused_with_the_key_named(tmp_path, key, value):
    path = write_yaml(tmp_path / "config.yaml", {**original_template(tmp_path), key: value})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("invalid configuration: ")
    assert f"{key}:" in message and repr(value) in message


def test_every_fault_is_named_at_once(tmp_path):
    values = {**original_template(tmp_path), "flask_port": 70000, "region": "mars", "bogus": True}
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path / "config.yaml", values))
    message = str(info.value)
    assert "flask_port:" in message and "region:" in message and "unknown key 'bogus'" in message


def test_missing_provider_uri_is_named(tmp_path):
    values = original_template(tmp_path)
    del values["provider_uri"]
    with pytest.raises(ConfigError, match="missing key 'provider_uri'"):
        load_config(write_yaml(tmp_path / "config.yaml", values))


@pytest.mark.parametrize("text, says", [
    ("- provider_uri: /x\n", "must be a mapping"),
    ("provider_uri: [unclosed\n", "cannot read config"),
    ("just a string\n", "must be a mapping"),
])
def test_unreadable_yaml_is_refused(tmp_path, text, says):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        load_config(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen():
    cfg = make_config(provider_uri="/data/qlib")
    with pytest.raises(pydantic.ValidationError):
        cfg.flask_port = 1


def qlib_server_command() -> list[str]:
    """The installed ``qlib-server`` console script next to this interpreter."""
    script = Path(sys.executable).with_name("qlib-server")
    return [str(script)] if script.exists() else [sys.executable, "-m", "qlib_server"]


@pytest.mark.parametrize("key, value", [("flask_port", 70000), ("update_time", "25:99"), ("bogus_key", 1)])
def test_cli_serve_with_a_bad_config_exits_2_naming_the_key(tmp_path, key, value):
    path = write_yaml(tmp_path / "bad.yaml", {**original_template(tmp_path), key: value})
    done = subprocess.run([*qlib_server_command(), "serve", "-c", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("qlib-server: invalid configuration: ")
    assert key in done.stderr
    assert done.stdout == ""


def test_cli_serve_with_a_missing_config_exits_2(tmp_path):
    done = subprocess.run([*qlib_server_command(), "serve", "-c", str(tmp_path / "absent.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert "cannot read config" in done.stderr and "absent.yaml" in done.stderr

"""Server configuration: the keys of the original ``config_template.yaml`` plus a few of ours.

Validated once at start; an unknown key or a bad value stops the server with a message naming it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .inst_processors import is_dotted_name


class ServerConfig(BaseModel):
    """Every setting of a Qlib-Server process, with the original's names and meanings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- keys of the original qlib-server ---
    provider_uri: str
    region: Literal["cn", "us", "tw"] = "cn"
    flask_server: str = "127.0.0.1"
    flask_port: int = Field(9710, ge=1, le=65535)
    queue_host: str = "127.0.0.1"
    queue_port: int = Field(5672, ge=1, le=65535)
    queue_user: str = "guest"
    queue_pwd: str = "guest"
    task_queue: str = "qlib_server_tasks"
    message_queue: str = "qlib_server_results"
    max_concurrency: int = Field(1, ge=1, le=1000, description="prefetch of each data-processor worker")
    max_process: int = Field(2, ge=1, le=256, description="data-processor worker processes (features)")
    light_workers: int = Field(1, ge=1, le=64, description="worker processes for calendars and instrument lists")
    redis_host: str = "127.0.0.1"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_task_db: int = Field(1, ge=0, le=15)
    redis_password: Optional[str] = None
    redis_max_connections: int = Field(256, ge=4, le=10000, description="Redis connections of one handler")
    client_version: str = ">=0.4.0"
    server_version: str = ">=0.4.0"
    dataset_cache_dir_name: str = "dataset_cache"
    features_cache_dir_name: str = "features_cache"
    logging_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    logging_config: Optional[dict[str, Any]] = None
    auto_update: bool = False
    update_time: str = Field("23:45", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    data_check_interval: float = Field(10.0, gt=0, description="seconds between looks at the data files")
    refresh_recent_days: int = Field(7, ge=0, le=31, description="after a data update, the dataset caches used in "
                                     "this many days are extended in the background, most used first (0: none; "
                                     "the others are extended at their next request)")

    # --- ours ---
    async_mode: Literal["gevent", "threading"] = "gevent"
    expression_cache: Optional[Literal["DiskExpressionCache"]] = None
    kernels: int = Field(1, ge=1, le=64, description="qlib kernels a worker uses for one feature task")
    feature_nice: int = Field(5, ge=0, le=19, description="niceness added to feature workers (light lane and "
                              "handler keep theirs)")
    task_timeout: float = Field(600.0, gt=0, description="seconds one task may run before its worker is killed")
    max_deliveries: int = Field(3, ge=1, le=100, description="deliveries of a task before it is dead-lettered")
    request_timeout: float = Field(3600.0, gt=0, description="seconds a client waits before an error answer")
    result_cache_ttl: float = Field(600.0, ge=0, description="seconds an answer is reused for identical requests")
    socketio_message_queue: Optional[str] = Field(None, description="ignored: handlers forward answers themselves")
    allowed_networks: list[str] = Field(default_factory=list)
    auth_token: Optional[str] = None
    max_body_bytes: int = Field(1 << 20, ge=1024, description="a larger request body is answered with status 1")
    max_message_bytes: int = Field(16 << 20, ge=1 << 16,
                                   description="transport limit: a larger message closes the connection")
    max_fields: int = Field(1024, ge=1, description="fields of one feature request (Alpha158 and Alpha360 "
                            "with labels ask 520)")
    max_instruments: int = Field(20000, ge=1)
    max_expression_length: int = Field(2000, ge=16)
    max_expression_depth: int = Field(32, ge=2)
    max_inflight_per_client: int = Field(8, ge=1)
    custom_ops: list[str] = Field(default_factory=list, description="names of custom operators qlib knows")
    inst_processors_allowed: list[str] = Field(default_factory=list, description="Qlib InstProcessor classes "
                                               "(module.Class) feature requests may run, beside Qlib's own")
    max_transfers: int = Field(32, ge=1, le=10000, description="feature transfers (POST /features) of one handler "
                               "at once; more are answered 429")
    max_transfers_per_client: int = Field(8, ge=1, le=10000, description="feature transfers of one client address "
                                          "at once; more are answered 429")
    transfer_timeout: float = Field(30.0, gt=0, le=3600, description="seconds an HTTP client may take to send its "
                                    "request body, or leave a piece of an answer unread, before it is dropped")
    max_event_streams: int = Field(16, ge=1, le=10000, description="status page event streams of one handler "
                                   "at once; more are answered 429")
    max_event_streams_per_client: int = Field(4, ge=1, le=10000, description="status page event streams of one "
                                              "client address at once")
    processor_metrics_port: Optional[int] = Field(9711, ge=1, le=65535,
                                                  description="Prometheus port of a data processor (null: none)")

    @field_validator("client_version", "server_version")
    @classmethod
    def _specifier(cls, value: str) -> str:
        try:
            SpecifierSet(value)
        except InvalidSpecifier as exc:
            raise ValueError(f"not a version specifier: {value!r}") from exc
        return value

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value

    @field_validator("inst_processors_allowed")
    @classmethod
    def _processor_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not is_dotted_name(name):
                raise ValueError(f"{name!r} is not a module.Class name")
        return value

    @model_validator(mode="after")
    def _transport_holds_a_body(self) -> ServerConfig:
        if self.max_message_bytes < self.max_body_bytes + 4096:
            raise ValueError("max_message_bytes must exceed max_body_bytes (a refused body still needs to arrive)")
        return self

    @model_validator(mode="after")
    def _per_client_within_total(self) -> ServerConfig:
        for total, per_client in (("max_transfers", "max_transfers_per_client"),
                                  ("max_event_streams", "max_event_streams_per_client")):
            if getattr(self, per_client) > getattr(self, total):
                raise ValueError(f"{per_client} must not exceed {total}")
        return self

    @property
    def amqp_url(self) -> str:
        return f"amqp://{self.queue_user}:{self.queue_pwd}@{self.queue_host}:{self.queue_port}/%2F"

    @property
    def dataset_cache_dir(self) -> Path:
        return Path(self.provider_uri).expanduser() / self.dataset_cache_dir_name


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {where!r}")
        elif item["type"] == "missing":
            lines.append(f"missing key {where!r}")
        else:
            lines.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def make_config(**values: Any) -> ServerConfig:
    """Build a validated config from keyword values; raise :class:`ConfigError` naming each fault."""
    try:
        return ServerConfig(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from None


def load_config(path: str | Path, **overrides: Any) -> ServerConfig:
    """Read a YAML config file (the original's keys) and validate it."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    raw.pop("flask_ping_interval", None)  # the original's, superseded by Socket.IO's own ping
    raw.pop("inactivity_timeout", None)  # the original's start-up purge, which we do not do
    return make_config(**{**raw, **overrides})

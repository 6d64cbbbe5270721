"""The worker's settings, read here and nowhere else.

Precedence (SPEC §6): CLI flag > environment > config file > defaults. The config file is
`WORKER_CONFIG`, else `config/worker.toml` when present. The AWS settings are botocore's own,
except that `AWS_REGION` is honoured too, since botocore reads only `AWS_DEFAULT_REGION`.
"""

import difflib
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.masking import mask_url_password, remember_secrets
from worker.problems import ExitCode, Problem

DEFAULT_CONFIG_FILE = Path("config/worker.toml")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
# Read by botocore itself; the worker reads them only to keep them out of every line.
AWS_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
SHUTDOWN_CLOSE_SECONDS = 2.0
"""Of the shutdown bound, the part kept for closing the connections and exiting."""


def _default_worker_id() -> str:
    """Name this replica by host and process, as operators see it in `ps` and the broker UI."""
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """Everything the worker can be told; see the README for each setting's meaning."""

    model_config = SettingsConfigDict(
        env_prefix="WORKER_", extra="ignore", populate_by_name=True, validate_default=True
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    amqp_connect_timeout_seconds: float = Field(10.0, gt=0)
    queue: str = "chat-integration-events"
    prefetch: int = Field(64, ge=1, le=65535)
    partitions: int = Field(8, ge=1, le=64)
    spread_partitions: bool = False
    http_port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(256 * 1024, ge=1)
    worker_id: str = Field(default_factory=_default_worker_id)
    log_level: str = "INFO"

    aws_region: str | None = Field(
        None,
        validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION"),
        description="AWS_DEFAULT_REGION wins over AWS_REGION, as in botocore",
    )
    connect_timeout_seconds: float = Field(3.0, gt=0)
    read_timeout_seconds: float = Field(10.0, gt=0)

    throttle_max_attempts: int = Field(10, ge=1)
    throttle_max_seconds: float = Field(300.0, gt=0)
    transient_max_attempts: int = Field(6, ge=1)
    transient_max_seconds: float = Field(120.0, gt=0)
    backoff_base_seconds: float = Field(0.2, gt=0)
    backoff_max_seconds: float = Field(20.0, gt=0)
    dead_letter_retry_delay_seconds: float = Field(1.0, ge=0)
    # Declared before the grace period, which is checked against it.
    shutdown_timeout_seconds: float = Field(25.0, gt=SHUTDOWN_CLOSE_SECONDS)
    shutdown_grace_seconds: float = Field(20.0, ge=0)

    rate_initial: float = Field(20.0, gt=0)
    rate_max: float = Field(10_000.0, gt=0)
    rate_min: float = Field(0.2, gt=0)
    outage_threshold: int = Field(5, ge=1)
    account_threshold: int = Field(3, ge=1)
    account_memory_seconds: float = Field(60.0, gt=0)
    account_undecided_seconds: float = Field(5.0, gt=0)
    endpoint_odd_answers: int = Field(5, ge=1)
    probe_seconds: float = Field(1.0, gt=0)
    probe_max_seconds: float = Field(15.0, gt=0)
    redis_url: SecretStr | None = None
    dedupe_window_seconds: float = Field(24 * 3600.0, ge=0)
    max_hold_seconds: float = Field(20 * 60.0, gt=0, lt=30 * 60.0)
    cautious_prefetch: bool = False

    @field_validator("queue")
    @classmethod
    def _queue_name_fits(cls, value: str) -> str:
        """Keep every derived name (`<queue>.dlq.<Variant>`) within AMQP's 255-byte limit."""
        if not _QUEUE_NAME.match(value):
            raise ValueError("must be 1-200 characters of letters, digits, '.', '_', ':', '-'")
        return value

    @field_validator("shutdown_grace_seconds")
    @classmethod
    def _grace_fits_the_bound(cls, value: float, info: ValidationInfo) -> float:
        """Keep the grace period inside the shutdown bound, with time left to close."""
        bound = info.data.get("shutdown_timeout_seconds")
        if bound is not None and value > bound - SHUTDOWN_CLOSE_SECONDS:
            raise ValueError(
                f"must be at most {bound - SHUTDOWN_CLOSE_SECONDS:g}: shutdown_timeout_seconds "
                f"({bound:g}) less {SHUTDOWN_CLOSE_SECONDS:g} s kept for closing"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        """Accept the standard logging level names in any case."""
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @model_validator(mode="after")
    def _remember_secrets(self) -> Self:
        """Register this configuration's secrets with the masker, so no line can show them."""
        redis_url = self.redis_url.get_secret_value() if self.redis_url else None
        remember_secrets(
            [self.amqp_url.get_secret_value(), redis_url],
            [os.environ.get(name) for name in AWS_SECRET_VARIABLES],
        )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order the sources as SPEC §6 fixes: flags, environment, config file, defaults."""
        toml_file = settings_cls.model_config.get("toml_file")
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file))

    def masked_redis_url(self) -> str | None:
        """Return the Redis URL with its password replaced, or None when unset."""
        return mask_url_password(self.redis_url.get_secret_value()) if self.redis_url else None

    def masked_amqp_url(self) -> str:
        """Return the broker URL with its password replaced, fit for logs and `check`."""
        return mask_url_password(self.amqp_url.get_secret_value())


def config_file_path(explicit: Path | None = None) -> Path | None:
    """Return the config file to read: the flag, `WORKER_CONFIG`, or the default when present."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get("WORKER_CONFIG")
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> WorkerSettings:
    """Read the settings from every source; `overrides` are CLI flags (None means not given).

    Raise a `Problem` for a config file that is missing, unreadable, not TOML or holds an
    unknown key, and for invalid values: one line per setting, naming where the value came
    from (the value itself is not repeated: it may be a secret).
    """
    path = config_file_path(config_file)
    from_file = read_config_file(path) if path is not None else {}

    class _FromFile(WorkerSettings):
        model_config = SettingsConfigDict(toml_file=path)

    flags = {name: value for name, value in overrides.items() if value is not None}
    try:
        return _FromFile(**flags)
    except ValidationError as error:
        lines = invalid_setting_lines(error, flags, from_file, path)
        raise Problem("\n".join(lines), ExitCode.USAGE) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """Return a config file's settings; raise a `Problem` if it cannot be read or has a typo."""
    try:
        values = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise Problem(f"config file not found: {path}", ExitCode.NO_INPUT) from None
    except IsADirectoryError:
        raise Problem(f"config file {path} is a directory", ExitCode.NO_INPUT) from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise Problem(f"cannot read config file {path}: {reason}", ExitCode.NO_INPUT) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise Problem(f"config file {path} is not valid TOML: {error}", ExitCode.USAGE) from None
    known = _known_keys()
    unknown = [
        unknown_key_line(key, value, path)
        for key, value in values.items()
        if key.lower() not in known
    ]
    if unknown:
        raise Problem("\n".join(unknown), ExitCode.USAGE)
    return values


def _known_keys() -> set[str]:
    """Return the keys a config file may hold, in lower case (pydantic-settings ignores case)."""
    keys = set()
    for name, field in WorkerSettings.model_fields.items():
        keys.add(name)
        if isinstance(field.validation_alias, AliasChoices):
            keys.update(str(choice).lower() for choice in field.validation_alias.choices)
    return keys


def unknown_key_line(key: str, value: Any, path: Path) -> str:
    """Name an unknown config key, with the closest setting as a suggestion."""
    if isinstance(value, dict):
        return f"config file {path}: unknown table [{key}]; settings go at the top of the file"
    line = f"config file {path}: unknown setting {key!r}"
    close = difflib.get_close_matches(key.lower(), sorted(WorkerSettings.model_fields), n=1)
    return f"{line} (did you mean {close[0]!r}?)" if close else line


def invalid_setting_lines(
    error: ValidationError,
    flags: Mapping[str, Any],
    from_file: Mapping[str, Any],
    path: Path | None,
) -> list[str]:
    """Return one line per invalid setting: its name, what is wrong, where the value came from."""
    lines = []
    for detail in error.errors(include_input=False, include_url=False, include_context=False):
        message = detail["msg"].removeprefix("Value error, ")
        if not detail["loc"]:
            lines.append(f"settings: {message}")
            continue
        name = str(detail["loc"][0])
        lines.append(f"setting {name}: {message} ({_source_of(name, flags, from_file, path)})")
    return lines


def _source_of(
    name: str, flags: Mapping[str, Any], from_file: Mapping[str, Any], path: Path | None
) -> str:
    """Say which source gave a setting its value, highest precedence first (SPEC §6)."""
    if name in flags:
        return f"from --{name.replace('_', '-')}"
    variable = f"WORKER_{name.upper()}"
    if any(key.upper() == variable for key in os.environ):
        return f"from {variable}"
    if any(key.lower() == name for key in from_file):
        return f"from {path}"
    return "the default"

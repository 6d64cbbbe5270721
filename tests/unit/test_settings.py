"""Settings: defaults, sources and their precedence, secrets kept out of output (SPEC §6)."""

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import WorkerSettings, load_settings

SECRET_URL = "amqps://worker:s3cr3t-pw@broker.example:5671/prod"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in an empty directory with no WORKER_* or region variables from the caller."""
    for name in list(os.environ):
        if name.upper().startswith("WORKER_") or name.upper() in {
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
        }:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults --------------------------------------------------------------------------------


def test_defaults_match_the_spec() -> None:
    settings = load_settings()

    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert settings.queue == "chat-integration-events"
    assert settings.prefetch == 64
    assert settings.http_port == 8080
    assert settings.max_body_bytes == 256 * 1024
    assert settings.aws_region is None


def test_default_retry_budgets() -> None:
    settings = WorkerSettings()

    assert (settings.throttle_max_attempts, settings.throttle_max_seconds) == (10, 300.0)
    assert (settings.transient_max_attempts, settings.transient_max_seconds) == (6, 120.0)


def test_default_worker_id_names_host_and_process() -> None:
    assert WorkerSettings().worker_id.endswith(f"-{os.getpid()}")


# --- environment -----------------------------------------------------------------------------


def test_worker_environment_variables_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_AMQP_URL", SECRET_URL)
    monkeypatch.setenv("WORKER_QUEUE", "orders")
    monkeypatch.setenv("WORKER_PREFETCH", "8")
    monkeypatch.setenv("WORKER_HTTP_PORT", "9090")
    monkeypatch.setenv("WORKER_MAX_BODY_BYTES", "1024")

    settings = load_settings()

    assert settings.amqp_url.get_secret_value() == SECRET_URL
    assert settings.queue == "orders"
    assert settings.prefetch == 8
    assert settings.http_port == 9090
    assert settings.max_body_bytes == 1024


def test_environment_value_out_of_range_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_PREFETCH", "0")

    with pytest.raises(ValidationError):
        load_settings()


# --- config file and precedence --------------------------------------------------------------


def test_config_file_overrides_defaults(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "custom.toml", 'queue = "from-file"\nprefetch = 10\n')

    settings = load_settings(config_file=path)

    assert (settings.queue, settings.prefetch) == ("from-file", 10)


def test_config_file_path_from_worker_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path / "elsewhere" / "w.toml", "prefetch = 11\n")
    monkeypatch.setenv("WORKER_CONFIG", str(path))

    assert load_settings().prefetch == 11


def test_default_config_file_is_read_when_present(tmp_path: Path) -> None:
    write_toml(tmp_path / "config" / "worker.toml", "prefetch = 12\n")

    assert load_settings().prefetch == 12


def test_explicit_config_file_wins_over_worker_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORKER_CONFIG", str(write_toml(tmp_path / "env.toml", "prefetch = 1\n")))
    explicit = write_toml(tmp_path / "flag.toml", "prefetch = 2\n")

    assert load_settings(config_file=explicit).prefetch == 2


def test_environment_overrides_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_toml(tmp_path / "w.toml", "prefetch = 10\n")
    monkeypatch.setenv("WORKER_PREFETCH", "20")

    assert load_settings(config_file=path).prefetch == 20


def test_cli_flag_overrides_environment_and_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path / "w.toml", "prefetch = 10\n")
    monkeypatch.setenv("WORKER_PREFETCH", "20")

    assert load_settings(config_file=path, prefetch=30).prefetch == 30


def test_none_flag_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_toml(tmp_path / "w.toml", 'queue = "from-file"\nprefetch = 10\n')
    monkeypatch.setenv("WORKER_PREFETCH", "20")

    settings = load_settings(config_file=path, prefetch=None, queue=None)

    assert (settings.prefetch, settings.queue) == (20, "from-file")


def test_each_setting_comes_from_its_highest_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path / "w.toml", 'queue = "from-file"\nprefetch = 10\nhttp_port = 7000\n')
    monkeypatch.setenv("WORKER_PREFETCH", "20")
    monkeypatch.setenv("WORKER_HTTP_PORT", "7100")

    settings = load_settings(config_file=path, http_port=7200)

    assert settings.queue == "from-file"
    assert settings.prefetch == 20
    assert settings.http_port == 7200
    assert settings.max_body_bytes == 256 * 1024


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(config_file=tmp_path / "absent.toml")


def test_missing_config_file_named_by_worker_config_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORKER_CONFIG", str(tmp_path / "absent.toml"))

    with pytest.raises(FileNotFoundError):
        load_settings()


def test_shipped_config_file_loads() -> None:
    shipped = Path(__file__).resolve().parents[2] / "config" / "worker.toml"
    if not shipped.is_file():
        pytest.skip("config/worker.toml is not in this checkout")

    assert load_settings(config_file=shipped).queue == "chat-integration-events"


# --- AWS region ------------------------------------------------------------------------------


def test_aws_region_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")

    assert load_settings().aws_region == "eu-west-1"


def test_aws_default_region_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    assert load_settings().aws_region == "us-east-1"


def test_aws_default_region_wins_when_both_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    assert load_settings().aws_region == "us-east-1"


def test_aws_region_flag_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    assert load_settings(aws_region="ap-southeast-2").aws_region == "ap-southeast-2"


# --- queue name ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "has space", "slash/name", "ümlaut", "q" * 201], ids=lambda n: repr(n[:12])
)
def test_invalid_queue_name_is_rejected(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        WorkerSettings(queue=name)

    assert caught.value.errors()[0]["loc"] == ("queue",)


def test_invalid_queue_name_from_the_environment_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKER_QUEUE", "bad name")

    with pytest.raises(ValidationError):
        load_settings()


@pytest.mark.parametrize("name", ["q" * 200, "a", "team_a:chat-events.v2"])
def test_valid_queue_name_is_accepted(name: str) -> None:
    assert WorkerSettings(queue=name).queue == name


def test_log_level_is_normalised_to_upper_case() -> None:
    assert WorkerSettings(log_level="debug").log_level == "DEBUG"


def test_unknown_log_level_is_rejected() -> None:
    with pytest.raises(ValidationError):
        WorkerSettings(log_level="LOUD")


# --- secrets ---------------------------------------------------------------------------------


def test_masked_amqp_url_hides_the_password() -> None:
    settings = load_settings(amqp_url=SECRET_URL)

    assert settings.masked_amqp_url() == "amqps://worker:***@broker.example:5671/prod"


def test_repr_and_str_never_contain_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_AMQP_URL", SECRET_URL)
    settings = load_settings()

    assert "s3cr3t-pw" not in repr(settings)
    assert "s3cr3t-pw" not in str(settings)
    assert "s3cr3t-pw" not in settings.model_dump_json()

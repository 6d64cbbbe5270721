"""Settings: defaults, sources and their precedence, secrets kept out of output (SPEC §6)."""

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.problems import ExitCode, Problem
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

    with pytest.raises(Problem) as raised:
        load_settings()

    assert raised.value.exit_code == ExitCode.USAGE
    assert raised.value.line == (
        "setting prefetch: Input should be greater than or equal to 1 (from WORKER_PREFETCH)"
    )


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
    with pytest.raises(Problem) as raised:
        load_settings(config_file=tmp_path / "absent.toml")

    assert raised.value.exit_code == ExitCode.NO_INPUT
    assert raised.value.line == f"config file not found: {tmp_path / 'absent.toml'}"


def test_missing_config_file_named_by_worker_config_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORKER_CONFIG", str(tmp_path / "absent.toml"))

    with pytest.raises(Problem, match="config file not found"):
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

    with pytest.raises(Problem, match=r"^setting queue: must be .* \(from WORKER_QUEUE\)$"):
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


# --- what a mistake in the settings looks like -----------------------------------------------


def test_an_unknown_config_key_is_rejected_with_the_closest_setting(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "w.toml", "prefetchh = 1\n")

    with pytest.raises(Problem) as raised:
        load_settings(config_file=path)

    assert raised.value.exit_code == ExitCode.USAGE
    assert raised.value.line == (
        f"config file {path}: unknown setting 'prefetchh' (did you mean 'prefetch'?)"
    )


def test_every_unknown_config_key_gets_its_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "w.toml", 'zzz = 1\nqeueu = "x"\n[worker]\nprefetch = 2\n')

    with pytest.raises(Problem) as raised:
        load_settings(config_file=path)

    assert raised.value.line.splitlines() == [
        f"config file {path}: unknown setting 'zzz'",
        f"config file {path}: unknown setting 'qeueu' (did you mean 'queue'?)",
        f"config file {path}: unknown table [worker]; settings go at the top of the file",
    ]


def test_config_keys_are_matched_like_the_settings_source_matches_them(tmp_path: Path) -> None:
    # pydantic-settings ignores case, and the Region is read under its AWS names too
    path = write_toml(tmp_path / "w.toml", 'Prefetch = 3\nAWS_REGION = "eu-west-1"\n')

    settings = load_settings(config_file=path)

    assert (settings.prefetch, settings.aws_region) == (3, "eu-west-1")


def test_a_config_file_that_is_not_toml_is_one_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "w.toml", "prefetch = \n")

    with pytest.raises(Problem) as raised:
        load_settings(config_file=path)

    assert raised.value.exit_code == ExitCode.USAGE
    assert raised.value.line.startswith(f"config file {path} is not valid TOML: ")
    assert "\n" not in raised.value.line


def test_a_config_file_that_is_a_directory_is_no_input(tmp_path: Path) -> None:
    with pytest.raises(Problem) as raised:
        load_settings(config_file=tmp_path)

    assert raised.value.exit_code == ExitCode.NO_INPUT
    assert raised.value.line == f"config file {tmp_path} is a directory"


def test_invalid_settings_give_one_line_each_naming_their_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path / "w.toml", "partitions = 0\n")
    monkeypatch.setenv("WORKER_PREFETCH", "-1")

    with pytest.raises(Problem) as raised:
        load_settings(config_file=path, queue="bad name")

    lines = raised.value.line.splitlines()
    assert lines == [
        "setting queue: must be 1-200 characters of letters, digits, '.', '_', ':', '-' "
        "(from --queue)",
        "setting prefetch: Input should be greater than or equal to 1 (from WORKER_PREFETCH)",
        f"setting partitions: Input should be greater than or equal to 1 (from {path})",
    ]
    assert "_FromFile" not in raised.value.line


def test_an_invalid_secret_is_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_REDIS_URL", "")
    monkeypatch.setenv("WORKER_PREFETCH", "s3cr3t-typed-in-the-wrong-place")

    with pytest.raises(Problem) as raised:
        load_settings()

    assert "s3cr3t" not in raised.value.line
    assert raised.value.line.startswith("setting prefetch: ")


# --- the shutdown bound ----------------------------------------------------------------------


def test_the_default_shutdown_fits_a_30_second_orchestrator_grace_with_margin() -> None:
    settings = WorkerSettings()

    assert settings.shutdown_timeout_seconds <= 25.0
    assert settings.shutdown_grace_seconds <= settings.shutdown_timeout_seconds - 2.0


def test_a_grace_period_that_leaves_no_time_to_close_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKER_SHUTDOWN_GRACE_SECONDS", "24")

    with pytest.raises(Problem) as raised:
        load_settings()

    assert raised.value.line == (
        "setting shutdown_grace_seconds: must be at most 23: shutdown_timeout_seconds (25) "
        "less 2 s kept for closing (from WORKER_SHUTDOWN_GRACE_SECONDS)"
    )


def test_a_longer_bound_allows_a_longer_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_SHUTDOWN_TIMEOUT_SECONDS", "90")
    monkeypatch.setenv("WORKER_SHUTDOWN_GRACE_SECONDS", "80")

    assert load_settings().shutdown_grace_seconds == 80


def test_a_shorter_bound_refuses_the_default_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_SHUTDOWN_TIMEOUT_SECONDS", "10")

    with pytest.raises(
        Problem, match=r"shutdown_grace_seconds: must be at most 8: .*\(the default\)"
    ):
        load_settings()

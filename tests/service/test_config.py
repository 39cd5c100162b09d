"""service.config: defaults, flags over environment variables, refused values named precisely."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

from service.config import (
    SETTINGS,
    Config,
    ConfigError,
    EngineConfig,
    NamedModelDir,
    SchedulerConfig,
    ServerConfig,
    config_table,
    parse_config,
)


def test_defaults_without_flags_or_environment() -> None:
    config = parse_config(None, {})
    assert config == Config()
    assert config.engine.model_dirs == (Path("models/en-fr-small"),)
    assert config.engine.provider == "auto" and config.engine.variant == "auto"
    assert config.scheduler.mode == "continuous"
    assert (config.server.port, config.server.metrics_port) == (50051, 9090)


def test_config_is_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        EngineConfig().provider = "cpu"  # type: ignore[misc]


def test_every_field_has_exactly_one_setting() -> None:
    default = Config()
    expected = {(s.name, f.name) for s in fields(default) for f in fields(getattr(default, s.name))}
    assert sorted((s.section, s.field) for s in SETTINGS) == sorted(expected)


def test_environment_variables_set_values() -> None:
    environ = {
        "TRANSLATOR_MODEL_DIRS": "models/a, models/b",
        "TRANSLATOR_PROVIDER": "CPU",
        "TRANSLATOR_VARIANT": "int8",
        "TRANSLATOR_INTRA_OP_THREADS": "2",
        "TRANSLATOR_SCHEDULER": "collect",
        "TRANSLATOR_MAX_WAIT_MS": "2.5",
        "TRANSLATOR_LOG_LEVEL": "debug",
        "UNRELATED": "ignored",
    }
    config = parse_config([], environ)
    assert config.engine.model_dirs == (Path("models/a"), Path("models/b"))
    engine = config.engine
    assert (engine.provider, engine.variant, engine.intra_op_threads) == ("cpu", "int8", 2)
    assert (config.scheduler.mode, config.scheduler.max_wait_ms) == ("collect", 2.5)
    assert config.server.log_level == "DEBUG"


def test_a_flag_wins_over_its_environment_variable() -> None:
    environ = {"TRANSLATOR_PORT": "6000", "TRANSLATOR_PROVIDER": "cuda", "TRANSLATOR_HOST": "127.0.0.1"}
    config = parse_config(["--port", "7000", "--provider=cpu"], environ)
    assert config.server.port == 7000
    assert config.engine.provider == "cpu"
    assert config.server.host == "127.0.0.1"  # no flag: the variable


@pytest.mark.parametrize(
    ("argv", "environ", "named", "allowed"),
    [
        (["--provider", "tpu"], {}, "--provider='tpu'", "auto, cpu, cuda"),
        ([], {"TRANSLATOR_PROVIDER": "tpu"}, "TRANSLATOR_PROVIDER='tpu'", "auto, cpu, cuda"),
        (["--variant", "int4"], {}, "--variant='int4'", "auto, fp32, int8, fp16, optimized"),
        ([], {"TRANSLATOR_PORT": "http"}, "TRANSLATOR_PORT='http'", "≤ 65535"),
        (["--port", "70000"], {}, "--port='70000'", "≤ 65535"),
        (["--max-sequences", "0"], {}, "--max-sequences='0'", "≥ 1"),
        (["--max-wait-ms", "nan"], {}, "--max-wait-ms='nan'", "≥ 0.0"),
        (["--scheduler", "eager"], {}, "--scheduler='eager'", "continuous, collect"),
        (["--log-format", "xml"], {}, "--log-format='xml'", "text, json"),
        ([], {"TRANSLATOR_MODEL_DIRS": " , "}, "TRANSLATOR_MODEL_DIRS", "model directories"),
        (["--model-dirs", "=models/a"], {}, "--model-dirs='=models/a'", "expected NAME=PATH"),
        (["--model-dirs", "v1="], {}, "--model-dirs='v1='", "expected NAME=PATH"),
        (["--model-dirs", "a b=models/a"], {}, "'a b=models/a'", "letters, digits"),
        (["--model-dirs", f"{'x' * 65}=models/a"], {}, "--model-dirs=", "at most 64"),
        (["--worker-restarts", "-1"], {}, "--worker-restarts='-1'", "≥ 0"),
    ],
)
def test_bad_values_are_refused_naming_the_setting_and_the_choices(
    argv: list[str], environ: dict[str, str], named: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(argv, environ)
    assert named in str(err.value) and allowed in str(err.value)


def test_model_dirs_name_a_served_model_or_keep_the_manifests_name() -> None:
    config = parse_config(["--model-dirs", "models/a, v1=models/b ,v-2.x=/srv/m=odd"], {})
    assert config.engine.model_dirs == (
        Path("models/a"),
        NamedModelDir("v1", Path("models/b")),
        NamedModelDir("v-2.x", Path("/srv/m=odd")),  # split at the first "="
    )
    assert [str(d) for d in config.engine.model_dirs] == ["models/a", "v1=models/b", "v-2.x=/srv/m=odd"]


def test_unknown_flag_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--colour"):
        parse_config(["--colour", "blue"], {})


def test_config_table_lists_every_setting_with_its_default() -> None:
    rows = {flag: (env, default) for flag, env, default, _meaning in config_table()}
    assert len(rows) == len(SETTINGS)
    assert rows["--model-dirs"] == ("TRANSLATOR_MODEL_DIRS", "models/en-fr-small")
    assert rows["--port"] == ("TRANSLATOR_PORT", "50051")
    assert rows["--default-model"] == ("TRANSLATOR_DEFAULT_MODEL", "(none)")
    assert all(meaning for *_, meaning in config_table())


def test_the_configuration_page_lists_every_setting() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    for flag, env, default, _meaning in config_table():
        assert f"| `{flag}` | `{env}` | `{default}` |" in page, f"configuration.md misstates {flag}"


def test_auto_parallelism_shares_the_cores_out_between_instances() -> None:
    from service.config import MAX_AUTO_INSTANCES, resolve_parallelism

    def resolved(
        device: str, cores: int, instances: int = 0, threads: int = 0, workers: int = 1
    ) -> tuple[int, int]:
        config = Config(
            engine=EngineConfig(intra_op_threads=threads),
            scheduler=SchedulerConfig(instances=instances),
            server=ServerConfig(workers=workers),
        )
        out = resolve_parallelism(config, device, cores)
        return out.scheduler.instances, out.engine.intra_op_threads

    assert resolved("cpu", 2) == (2, 1)  # this machine: two decode loops, one thread each
    assert resolved("cpu", 1) == (1, 1)
    assert resolved("cpu", 16) == (MAX_AUTO_INSTANCES, 16 // MAX_AUTO_INSTANCES)
    assert resolved("cpu", 8, threads=4) == (2, 4)
    assert resolved("cpu", 8, instances=1) == (1, 8)
    assert resolved("cpu", 2, instances=3, threads=2) == (3, 2)  # both given: as given
    assert resolved("cuda", 16) == (1, 0)  # onnxruntime's default threads on CUDA
    # worker processes split the cores first: each resolves its own share
    assert resolved("cpu", 2, workers=2) == (1, 1)
    assert resolved("cpu", 8, workers=2) == (MAX_AUTO_INSTANCES, 1)
    assert resolved("cpu", 2, workers=4) == (1, 1)  # never less than one core's worth


def test_help_shows_each_flag_with_its_default_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parse_config(["--help"], {})
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, env, default, _ in config_table():
        assert f"(default: {default}; env {env})" in text, flag
    assert "VALUE" not in text and "--grace-period-s SECONDS" in text and "--port PORT" in text


def test_tokens_are_set_by_the_environment_only_and_never_echoed() -> None:
    secret = "s3cret-token-0123456789"
    config = parse_config([], {"TRANSLATOR_AUTH_TOKENS": f"{secret}, other-token-0123456789"})
    assert config.security.auth_tokens == (secret, "other-token-0123456789")
    assert secret not in repr(config)
    with pytest.raises(ConfigError, match="--auth-tokens"):  # no such flag: its value would be in `ps`
        parse_config(["--auth-tokens", secret], {})
    with pytest.raises(ConfigError) as err:
        parse_config([], {"TRANSLATOR_AUTH_TOKENS": "tooshort"})
    assert "TRANSLATOR_AUTH_TOKENS" in str(err.value) and "at least 16" in str(err.value)
    assert "tooshort" not in str(err.value)


def test_security_and_connection_settings_parse() -> None:
    argv = ["--tls-cert", "a.crt", "--tls-key", "a.key", "--metrics-host", "127.0.0.1"]
    environ = {
        "TRANSLATOR_AUTH_EXEMPT_SERVICES": "grpc.health.v1.Health",
        "TRANSLATOR_MAX_CONCURRENT_STREAMS": "0",
    }
    config = parse_config(argv, environ)
    assert (config.security.tls_cert, config.security.tls_key) == (Path("a.crt"), Path("a.key"))
    assert config.security.tls_client_ca is None and config.server.metrics_host == "127.0.0.1"
    assert config.security.auth_exempt_services == ("grpc.health.v1.Health",)
    assert config.server.max_concurrent_streams == 0 and parse_config([], {}).server.metrics_host is None

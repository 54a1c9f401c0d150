"""config.ini parsing: defaults, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendsystem.config import (
    BalancerConfig,
    DbHost,
    Relay,
    SendingConfig,
    load_config,
    parse_db_hosts,
)
from sendsystem.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.ini.example"


def test_example_parses_with_every_section() -> None:
    config = load_config(EXAMPLE, env={})
    assert config.sending.relays == (Relay("127.0.0.1", 25),)
    assert config.sending.domain_rates == {"gmail.com": 50.0, "yahoo.com": 20.0}
    assert config.bounce.soft_limit == 3 and not config.dkim.enabled
    assert (config.sorting.render_timeout, config.sorting.render_memory_mb,
            config.sorting.render_failures_pause) == (2.0, 1024, 5)


def test_example_documents_the_tuning_defaults() -> None:
    """bench/pipeline.py runs with the shipped defaults (issue 17); the example shows them."""
    example = load_config(EXAMPLE, env={})
    assert example.balancer == BalancerConfig()
    default = SendingConfig()
    assert (example.sending.connections, example.sending.messages_per_connection,
            example.sending.unconfirmed_window) == (
        default.connections, default.messages_per_connection, default.unconfirmed_window)


def test_environment_overrides_database_and_secret() -> None:
    env = {"SENDSYSTEM_DB_HOST": "db.internal", "SENDSYSTEM_DB_PORT": "3307",
           "SENDSYSTEM_DB_PASSWORD": "s3cret", "SENDSYSTEM_SECRET": "from-env-" + "s" * 32}
    config = load_config(EXAMPLE, env=env)
    assert (config.database.host, config.database.port) == ("db.internal", 3307)
    assert config.database.password == "s3cret"
    assert config.secret() == b"from-env-" + b"s" * 32


def test_database_host_list() -> None:
    assert parse_db_hosts("db1", 3306) == (DbHost("db1", 3306),)
    assert parse_db_hosts(" db1:3307, db2 ,10.0.0.3:3310,[::1]:3311, [fd00::2] ", 3306) == (
        DbHost("db1", 3307), DbHost("db2", 3306), DbHost("10.0.0.3", 3310),
        DbHost("::1", 3311), DbHost("fd00::2", 3306))
    assert str(DbHost("::1", 3311)) == "[::1]:3311" and str(DbHost("db1", 3306)) == "db1:3306"
    env = {"SENDSYSTEM_DB_HOST": "a:3307,b:3308,c", "SENDSYSTEM_DB_PORT": "3309"}
    assert load_config(EXAMPLE, env=env).database.hosts == (
        DbHost("a", 3307), DbHost("b", 3308), DbHost("c", 3309))
    for bad, why in (("", "names no host"), ("::1", "brackets"), ("db:x", "host:port"),
                     ("[::1", r"\[ipv6\]:port"), ("db:70000", "out of range"),
                     (":3306", "host:port")):
        with pytest.raises(ConfigError, match=why):
            load_config(EXAMPLE, env={"SENDSYSTEM_DB_HOST": bad})


def test_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.ini", env={})
    bad = tmp_path / "bad.ini"
    bad.write_text("[balancer]\nbatch_min = many\n")
    with pytest.raises(ConfigError, match="batch_min"):
        load_config(bad, env={})
    bad.write_text("[balancer]\nmerged_backlog_max = -1\n")
    with pytest.raises(ConfigError, match="merged_backlog_max must be 0"):
        load_config(bad, env={})
    bad.write_text("[sending]\nrelays = nohost\n")
    with pytest.raises(ConfigError, match="host:port"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="SENDSYSTEM_DB_PORT"):
        load_config(EXAMPLE, env={"SENDSYSTEM_DB_PORT": "x"})
    with pytest.raises(ConfigError, match="secret"):
        load_config(EXAMPLE, env={}).secret()


def test_short_secret_is_refused_with_a_recipe() -> None:
    for secret in ("", "Qz", "Qz" * 15 + "!"):
        config = load_config(EXAMPLE, env={"SENDSYSTEM_SECRET": secret})
        with pytest.raises(ConfigError) as info:
            config.secret()
        message = str(info.value)
        assert "at least 32 characters" in message
        assert "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'" in message
        assert "Qz" not in message  # never echoes the secret
    assert load_config(EXAMPLE, env={"SENDSYSTEM_SECRET": "s" * 32}).secret() == b"s" * 32


@pytest.mark.parametrize(("text", "message"), [
    ("[sending]\nconections = 8\n",
     "[sending] unknown key 'conections'; did you mean 'connections'?"),
    ("[sendng]\nconnections = 8\n", "unknown section [sendng]; did you mean 'sending'?"),
    ("[balancer]\nzzz = 1\n", "[balancer] unknown key 'zzz'; valid: batch_max"),
    ("[webhooks]\nmailgun_signing_kye = k\n",
     "[webhooks] unknown key 'mailgun_signing_kye'; did you mean 'mailgun_signing_key'?"),
])
def test_unknown_keys_and_sections_are_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert message in str(err.value)


def test_webhooks_section(tmp_path: Path) -> None:
    example = load_config(EXAMPLE, env={}).webhooks
    assert not (example.ses_enabled or example.sendgrid_enabled or example.mailgun_enabled
                or example.postmark_enabled)
    assert example.cert_host_patterns() == ("sns.*.amazonaws.com", "sns.*.amazonaws.com.cn")
    path = tmp_path / "config.ini"
    path.write_text("[webhooks]\nses_enabled = yes\nsns_cert_hosts = 127.0.0.1\n"
                    "sns_topic_arns = arn:a, arn:b\nmailgun_enabled = yes\n"
                    "mailgun_signing_key = k\nmailgun_max_age = 60\n")
    hooks = load_config(path, env={}).webhooks
    assert hooks.ses_enabled and hooks.cert_host_patterns() == ("127.0.0.1",)
    assert hooks.topic_arns() == ("arn:a", "arn:b") and hooks.mailgun_max_age == 60
    for text, message in [("sendgrid_enabled = yes", "needs sendgrid_public_key"),
                          ("mailgun_enabled = yes", "needs mailgun_signing_key"),
                          ("postmark_enabled = yes\npostmark_user = u\npostmark_password = short",
                           "at least 16 characters"),
                          ("ses_enabled = yes\nsns_cert_hosts =", "needs sns_cert_hosts")]:
        path.write_text(f"[webhooks]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path, env={})


def test_implicit_config_may_be_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}).source == "(defaults)"


def test_default_paths_are_not_world_writable_places(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """/tmp (or /var/tmp, /dev/shm) lets another local user pre-create or symlink our
    lock and journal directories; the defaults live in the service's own state directory."""
    monkeypatch.chdir(tmp_path)
    paths = load_config(env={}).paths
    assert paths.lock_dir == Path("/var/lib/sendsystem/locks")
    assert paths.journal_dir == Path("/var/lib/sendsystem/journal")
    for path in (paths.lock_dir, paths.journal_dir):
        assert path.is_absolute()
        assert not path.is_relative_to("/tmp") and not path.is_relative_to("/var/tmp")
        assert not path.is_relative_to("/dev/shm")
    # The example documents the defaults.
    assert load_config(EXAMPLE, env={}).paths == paths

"""The configuration: every example key documented, parsed into types, errors that say how to fix."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mailhub.config import load_config, parse_config, read_secret_file
from mailhub.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


def test_every_example_key_is_commented() -> None:
    lines = EXAMPLE.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z_]+)\s*=", line)
        if not m:
            continue
        inline = "#" in line.split("=", 1)[1]
        above = i > 0 and lines[i - 1].lstrip().startswith("#")
        if not (inline or above):
            undocumented.append(m.group(1))
    assert undocumented == []


def test_every_example_key_is_read(tmp_path: Path) -> None:
    """An example key that the parser ignores would be a lie in the documentation."""
    raw = tomllib.loads(EXAMPLE.read_text())
    cfg = parse_config(raw, tmp_path / "config.toml")
    assert cfg.hub.domain == "medvoyage.example"
    assert cfg.submission.listen.port == 5587 and cfg.inbound.listen.port == 2525
    assert cfg.delivery.starttls == "opportunistic" and cfg.delivery.internal_relay is None
    assert cfg.hub.rules_dir == tmp_path / "rules"
    assert cfg.scheduler.quiet_hours == ("21:00", "08:00")
    raw["hub"]["surprise"] = 1
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[hub\]: surprise"):
        parse_config(raw, tmp_path / "config.toml")


@pytest.mark.parametrize("section,key,value,message", [
    ("hub", "domain", "not a domain", "is not a mail domain"),
    ("delivery", "starttls", "sometimes", "is not one of"),
    ("delivery", "smarthost", "localhost", "is not host:port"),
    ("delivery", "workers", 0, "must be at least 1"),
    ("hub", "database_url", "mysql://x", "is not supported"),
    ("delivery", "workers", "four", r"must be an integer, not 'four'"),
    ("delivery", "workers", True, r"must be an integer, not True"),
    ("delivery", "workers", 2.5, r"must be an integer, not 2.5"),
    ("hub", "domain", 42, r"must be a string \(in quotes\), not 42"),
    ("delivery", "smarthost", "127.0.0.1:99999", "the port must be 1-65535, not 99999"),
    ("delivery", "smarthost", "127.0.0.1:0", "the port must be 1-65535, not 0"),
    ("imap", "port", 99999, "must be at most 65535"),
])
def test_bad_values_name_the_key(tmp_path: Path, section: str, key: str, value: object,
                                 message: str) -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(raw, tmp_path / "config.toml")
    assert f"[{section}].{key}" in str(info.value)


@pytest.mark.parametrize("url,message", [
    ("mysql://mh:S3cret-pw@db.example/hub", "is not supported"),
    ("mh:S3cret-pw@db.example", "is not supported"),
    ("postgresql+psycopg://mh:S3cret-pw@db.example:notaport/hub", "is not a database URL"),
    ("postgresql+psycopg://mh:S3cret:pw@w@db.example:5432x/hub", "is not a database URL"),
])
def test_a_refused_database_url_never_shows_its_password(tmp_path: Path, url: str,
                                                         message: str) -> None:
    """The error lands in terminals and logs: the URL is named, its password is not (a bad
    port used to escape as an internal ValueError)."""
    raw = tomllib.loads(EXAMPLE.read_text())
    raw["hub"]["database_url"] = url
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(raw, tmp_path / "config.toml")
    said = f"{info.value.message}\n{info.value.hint}"
    assert "[hub].database_url" in said and "db.example" in said and ":***@" in said
    assert "S3cret" not in said and "pw@w" not in said


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "mailhub init" in str(info.value)


def test_password_file_strips_one_newline(tmp_path: Path) -> None:
    p = tmp_path / "pw"
    p.write_text("secret\n\n")
    assert read_secret_file(p) == "secret\n"
    p.write_text("secret")
    assert read_secret_file(p) == "secret"


def test_listener_and_flag_messages_name_the_kind(tmp_path: Path) -> None:
    """Type names in messages are words people use ("an integer"), never Python's ("a int")."""
    raw = tomllib.loads(EXAMPLE.read_text())
    raw["smtp"]["inbound"]["listen"] = "127.0.0.1:99999"
    with pytest.raises(ConfigError, match=r"\[smtp.inbound\].listen = '127.0.0.1:99999': the "
                                          r"port must be 1-65535"):
        parse_config(raw, tmp_path / "config.toml")
    raw = tomllib.loads(EXAMPLE.read_text())
    raw["smtp"]["submission"]["require_tls_for_auth"] = "yes"
    with pytest.raises(ConfigError, match=r"must be true or false, not 'yes'") as info:
        parse_config(raw, tmp_path / "config.toml")
    assert not re.search(r"\ba (int|str|bool|float)\b", str(info.value))


def test_config_may_name_the_instance_folder(tmp_path: Path) -> None:
    """The README calls the folder the instance: --config DIR means DIR/config.toml."""
    (tmp_path / "config.toml").write_text(EXAMPLE.read_text())
    assert load_config(tmp_path).path == (tmp_path / "config.toml").resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="is a folder without a config.toml") as info:
        load_config(empty)
    assert f"e.g. {empty / 'config.toml'}" in str(info.value)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "latin1.toml").write_bytes(b'[hub]\ndomain = "caf\xe9.example"\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(tmp_path / "latin1.toml")

"""`init`, `--config`, `users add` and file arguments as an administrator meets them.

Each refusal must be one clear `mailhub: error:` line (exit 1), never "internal error" (exit 70)
or a traceback, and a refused `init` must leave nothing behind that a corrected re-run keeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlmodel import Session, select

from mailhub.app import Hub
from mailhub.config import load_config
from mailhub.ingress.auth import verify_password
from mailhub.store.models import User
from tests.conftest import Instance, agents_of
from tests.pgserver import pg_url  # noqa: F401 - the fixture

COORD = "anna@medvoyage.example"


def mailhub(*args: str) -> tuple[int, str, str]:
    """The installed CLI in a child process, as an administrator runs it."""
    proc = subprocess.run([sys.executable, "-m", "mailhub", *args], capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_clear_error(code: int, err: str, *expected: str) -> None:
    """Exit 1 with a `mailhub: error:` line that says ``expected``; no crash report."""
    assert code == 1, err
    assert err.startswith("mailhub: error: "), err
    assert "internal error" not in err and "Traceback" not in err, err
    first = err.splitlines()[0]
    for text in expected:
        assert text in first, (text, err)


def test_init_checks_domain_before_writing_and_keeps_an_instance_domain(short_tmp: Path
                                                                      ) -> None:
    target = short_tmp / "hub"
    code, out, err = mailhub("init", str(target), "--domain", "not a domain")
    assert_clear_error(code, err, "--domain 'not a domain' is not a mail domain")
    assert not target.exists()  # nothing written: the corrected run starts afresh

    code, out, err = mailhub("init", str(target), "--domain", "good.example")
    assert code == 0, err
    assert f"wrote {target / 'config.toml'}" in out
    assert not agents_of(target / "keys" / "gnupg")  # making the key left no gpg-agent behind
    assert load_config(target / "config.toml").hub.domain == "good.example"
    rows = json.loads(mailhub("--config", str(target / "config.toml"), "keys", "list",
                              "--json")[1])
    assert {r["address"] for r in rows} == {"hub@good.example"}

    # another domain on the existing instance is refused, not silently ignored
    before = (target / "config.toml").read_bytes()
    code, out, err = mailhub("init", str(target), "--domain", "other.example")
    assert_clear_error(code, err, "already exists with domain good.example",
                       "--domain other.example was not applied")
    assert (target / "config.toml").read_bytes() == before
    code, out, err = mailhub("init", str(target))
    assert code == 0, err
    assert f"kept existing {target / 'config.toml'} (domain good.example)" in out
    assert mailhub("init", str(target), "--domain", "Good.Example")[0] == 0  # the same domain

    help_text = mailhub("init", "--help")[1]
    assert "is refused" in help_text and "checked before anything is written" in help_text


def test_init_paths_that_cannot_hold_an_instance(short_tmp: Path) -> None:
    a_file = short_tmp / "notes.txt"
    a_file.write_text("not a folder\n")
    code, out, err = mailhub("init", str(a_file))
    assert_clear_error(code, err, f"{a_file} exists and is not a folder")
    assert a_file.read_text() == "not a folder\n"
    code, out, err = mailhub("init", "/proc/mailhub-nope")
    assert_clear_error(code, err, "cannot set up the instance: /proc/mailhub-nope:")


def test_config_may_name_the_instance_folder(instance: Instance, short_tmp: Path) -> None:
    code, out, err = mailhub("--config", str(instance.root), "queue", "list")
    assert (code, out) == (0, "the queue is empty\n"), err
    empty = short_tmp / "empty"
    empty.mkdir()
    code, out, err = mailhub("--config", str(empty), "queue", "list")
    assert_clear_error(code, err, f"{empty} is a folder without a config.toml")
    assert f"--config must name the configuration file, e.g. {empty / 'config.toml'}" in err


def test_file_arguments_that_cannot_be_read_are_clear_errors(instance: Instance,
                                                             short_tmp: Path) -> None:
    missing = str(short_tmp / "missing.pem")
    latin1 = short_tmp / "latin1.pw"
    latin1.write_bytes(b"geheim\xfc\xdf-passwort\n")
    cases = [
        (("keys", "import", missing), f"cannot read key file {missing}: no such file"),
        (("keys", "import-own", missing), f"cannot read key file {missing}: no such file"),
        (("keys", "import-own", str(short_tmp)), f"cannot read key file {short_tmp}: it is a "
                                                 "folder"),
        (("users", "add", COORD, "--password-file", missing),
         f"cannot read --password-file {missing}: no such file"),
        (("users", "add", COORD, "--password-file", str(latin1)),
         f"--password-file {latin1} is not UTF-8 text"),
        (("keys", "import-own", str(latin1), "--cert", missing),  # FILE is read, then CERT
         f"cannot read certificate file {missing}: no such file"),
    ]
    for args, expected in cases:
        code, out, err = instance.run(*args)
        assert_clear_error(code, err, expected)
        assert out == "", (args, out)

    code, case_id, err = instance.run("cases", "open", "--patient-name", "Ana",
                                      "--patient-email", "ana@patient.example",
                                      "--timezone", "UTC")
    assert code == 0, err
    code, out, err = instance.run("cases", "export", case_id.strip(), "--output",
                                  "/proc/mailhub-case.mbox")
    assert_clear_error(code, err, "cannot write /proc/mailhub-case.mbox:")


def test_users_add_for_an_existing_coordinator_replaces_the_password_and_says_so(
        instance: Instance, short_tmp: Path) -> None:
    first, second = short_tmp / "one.pw", short_tmp / "two.pw"
    first.write_text("first-password\n")
    second.write_text("second-password\n")
    code, out, err = instance.run("users", "add", COORD, "--password-file", str(first))
    assert (code, out) == (0, f"added: {COORD}\n"), err
    code, out, err = instance.run("users", "add", COORD, "--password-file", str(second))
    assert code == 0, err
    assert out.startswith(f"password replaced: {COORD} was already a coordinator")
    hub = Hub(load_config(instance.config))
    try:
        with Session(hub.engine) as session:
            stored = session.exec(select(User).where(User.email == COORD)).one().password_hash
    finally:
        hub.engine.dispose()
    assert verify_password("second-password", stored)
    assert not verify_password("first-password", stored)
    help_text = " ".join(mailhub("users", "add", "--help")[1].split())
    assert "the password is replaced" in help_text


def test_a_config_copied_where_no_instance_was_made_is_refused(short_tmp: Path) -> None:
    """Commands on a config.toml with no instance beside it (no keys, no database) stop with a
    clear error, instead of quietly making an empty database and keyring there."""
    made = short_tmp / "made"
    assert mailhub("init", str(made))[0] == 0
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.toml").write_bytes((made / "config.toml").read_bytes())
    for command in (["keys", "list"], ["queue", "list", "--json"], ["cases", "list"]):
        code, out, err = mailhub("--config", str(elsewhere / "config.toml"), *command)
        assert_clear_error(code, err, "belongs to no initialised instance")
        assert "mailhub init" in err and out == ""
    assert sorted(p.name for p in elsewhere.iterdir()) == ["config.toml"]  # nothing made there


def test_init_piped_into_a_reader_that_leaves_early_still_makes_the_whole_instance(
        short_tmp: Path) -> None:
    """``mailhub init DIR | head -1``: the reader goes after one line; init must still make
    the keys and the database (it used to stop at its next line of output, with status 0)."""
    target = short_tmp / "piped"
    proc = subprocess.Popen([sys.executable, "-m", "mailhub", "init", str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"wrote ")
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "Broken" not in err, err
    assert (target / "keys" / "atrest.key").exists()
    rows = json.loads(mailhub("--config", str(target / "config.toml"), "keys", "list",
                              "--json")[1])
    assert {(r["kind"], r["own"]) for r in rows} == {("openpgp", True), ("smime", True)}


def test_init_does_not_print_the_database_password(short_tmp: Path,
                                                   pg_url: str) -> None:  # noqa: F811
    """The server trusts loopback, so any password works: init must not echo it."""
    target = short_tmp / "hub"
    assert mailhub("init", str(target))[0] == 0
    url = pg_url.replace("://mailhub@", "://mailhub:pg-pass-42@")
    assert url != pg_url
    cfg = target / "config.toml"
    cfg.write_text(cfg.read_text().replace('database_url = ""', f'database_url = "{url}"', 1))
    code, out, err = mailhub("init", str(target))
    assert code == 0, err
    assert "database ready: postgresql+psycopg://mailhub:***@" in out
    assert "pg-pass-42" not in out + err


def test_init_against_an_unreachable_database_is_one_clear_line(short_tmp: Path) -> None:
    """The driver's words on the error line, no SQLAlchemy boilerplate, no password; and the
    gpg-agent that made the hub's key is not left running (it used to be, on every such try)."""
    from tests.conftest import free_port

    target = short_tmp / "hub"
    target.mkdir()
    example = (Path(__file__).resolve().parents[2] / "config.example.toml").read_text()
    url = f"postgresql+psycopg://mailhub:pg-pass-42@127.0.0.1:{free_port()}/hub"
    (target / "config.toml").write_text(
        example.replace('database_url = ""', f'database_url = "{url}"', 1))
    code, out, err = mailhub("init", str(target))
    # the at-rest key check reaches the database first, before any key is made
    assert_clear_error(code, err, "cannot reach the database:", "Connection refused")
    lines = err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("mailhub: hint: "), err
    assert "pg-pass-42" not in out + err and "sqlalche.me" not in err
    assert not agents_of(target / "keys" / "gnupg")


def test_init_will_not_replace_a_lost_at_rest_key_of_a_database_in_use(short_tmp: Path) -> None:
    """With keys/atrest.key gone, a new key would leave everything sealed so far unreadable
    while init reported success: it is refused, and nothing is made."""
    target = short_tmp / "hub"
    assert mailhub("init", str(target))[0] == 0
    key = target / "keys" / "atrest.key"
    key.rename(target / "atrest.key.bak")
    code, out, err = mailhub("init", str(target))
    assert_clear_error(code, err, "atrest.key is missing", "already holds data sealed")
    assert "restore keys/atrest.key" in err
    assert not key.exists()
    (target / "atrest.key.bak").rename(key)
    assert mailhub("init", str(target))[0] == 0  # with it back, init completes as before


def test_init_writes_its_config_private(short_tmp: Path) -> None:
    target = short_tmp / "hub"
    assert mailhub("init", str(target))[0] == 0
    assert (target / "config.toml").stat().st_mode & 0o777 == 0o600


def test_init_with_half_a_tls_pair_says_which_half_is_missing(short_tmp: Path) -> None:
    target = short_tmp / "hub"
    assert mailhub("init", str(target))[0] == 0
    key = target / "keys" / "tls.key"
    key.rename(target / "tls.key.bak")
    code, _, err = mailhub("init", str(target))
    assert_clear_error(code, err, "tls.key is missing but", "tls.crt exists")
    assert not key.exists()
    (target / "keys" / "tls.crt").unlink()  # as the hint says: init then makes a new pair
    assert mailhub("init", str(target))[0] == 0
    assert key.exists() and (target / "keys" / "tls.crt").exists()

"""Rule files: loading, validation errors that name file/table/entry, and live reloading."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from mailhub.errors import RuleError
from mailhub.policy.rules import PolicyCache, load_policy, normalize_address

REPO_RULES = Path(__file__).resolve().parents[2] / "rules"


def write(dir_: Path, name: str, text: str) -> Path:
    path = dir_ / name
    path.write_text(text, encoding="utf-8")
    return path


def rule_error(tmp_path: Path, text: str, name: str = "policy.toml") -> str:
    write(tmp_path, name, text)
    with pytest.raises(RuleError) as info:
        load_policy(tmp_path)
    return str(info.value)


def test_shipped_policy_loads() -> None:
    policy = load_policy(REPO_RULES)
    assert "policy.toml" in policy.files
    partner = policy.partner_for("records@clinic-a.example")
    assert partner is not None and partner.require == "encrypted" and partner.method == "openpgp"
    assert policy.plaintext_for("bookings@airline.example") is not None
    assert policy.plaintext_for("info@airline.example") is None


def test_care_plans_subfolder_is_not_read(tmp_path: Path) -> None:
    write(tmp_path, "policy.toml", '[[plaintext]]\naddress = "a@b.example"\n')
    (tmp_path / "care-plans").mkdir()
    write(tmp_path / "care-plans", "hip.toml", 'name = "hip"\n[[step]]\nid = "x"\n')
    write(tmp_path, "notes.txt", "not toml at all [[[")
    policy = load_policy(tmp_path)
    assert policy.files == ("policy.toml",)
    assert [r.address for r in policy.plaintext] == ["a@b.example"]


def test_every_file_is_read_in_name_order(tmp_path: Path) -> None:
    write(tmp_path, "b.toml", '[[plaintext]]\naddress = "two@x.example"\n')
    write(tmp_path, "a.toml", '[[plaintext]]\naddress = "one@x.example"\n')
    policy = load_policy(tmp_path)
    assert policy.files == ("a.toml", "b.toml")
    assert [r.address for r in policy.plaintext] == ["one@x.example", "two@x.example"]
    assert policy.plaintext[1].source == "b.toml: [[plaintext]] entry 1"


def test_policy_is_hashable_and_picklable() -> None:
    policy = load_policy(REPO_RULES)
    again = load_policy(REPO_RULES)
    assert policy == again and hash(policy) == hash(again)
    assert pickle.loads(pickle.dumps(policy)) == policy


def test_unknown_table_names_file_and_table(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, '[[partners]]\ndomain = "x.example"\n', "clinics.toml")
    assert "clinics.toml" in msg and "[partners]" in msg and "[[partner]]" in msg


def test_unknown_key_names_entry_index(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, """
[[partner]]
domain = "a.example"
require = "encrypted"
method = "openpgp"

[[partner]]
domain = "b.example"
require = "encrypted"
method = "openpgp"
prefered = "smime"
""")
    assert "policy.toml: [[partner]] entry 2" in msg
    assert "prefered" in msg and "method" in msg


def test_bad_enum_says_what_is_allowed(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, '[[partner]]\ndomain = "a.example"\nrequire = "maybe"\nmethod = "openpgp"\n')
    assert "[[partner]] entry 1" in msg and "'maybe'" in msg
    assert "'encrypted'" in msg and "'signed-and-encrypted'" in msg
    msg = rule_error(tmp_path, '[[partner]]\ndomain = "a.example"\nrequire = "encrypted"\nmethod = "pgp"\n')
    assert "method" in msg and "'smime'" in msg


def test_missing_key(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, '[[partner]]\ndomain = "a.example"\n')
    assert "missing key(s) method, require" in msg and "entry 1" in msg


@pytest.mark.parametrize("address", [
    "*@airline.example", "@airline.example", "airline.example", "book*@airline.example",
    "bookings@*.airline.example", "bookings?@airline.example",
])
def test_plaintext_wildcards_are_refused(tmp_path: Path, address: str) -> None:
    msg = rule_error(tmp_path, f'[[plaintext]]\naddress = "ok@x.example"\n\n[[plaintext]]\naddress = "{address}"\n')
    assert "policy.toml: [[plaintext]] entry 2" in msg
    assert "exact address" in msg or "not a mail address" in msg


def test_plaintext_not_a_string(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, '[[plaintext]]\naddress = ["a@x.example", "b@x.example"]\n')
    assert "[[plaintext]] entry 1" in msg and "quoted string" in msg


def test_duplicates_across_files_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", '[[partner]]\ndomain = "clinic.example"\nrequire = "encrypted"\nmethod = "openpgp"\n')
    msg = rule_error(tmp_path, '[[partner]]\ndomain = "Clinic.Example"\nrequire = "encrypted"\nmethod = "smime"\n', "b.toml")
    assert "b.toml: [[partner]] entry 1" in msg and "a.toml" in msg and "already a partner" in msg


def test_duplicate_plaintext_in_other_case(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, '[[plaintext]]\naddress = "a@x.example"\n[[plaintext]]\naddress = "A@X.example"\n')
    assert "[[plaintext]] entry 2" in msg and "duplicate" in msg


def test_plaintext_at_partner_domain_is_refused(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, """
[[partner]]
domain = "clinic.example"
require = "encrypted"
method = "openpgp"

[[plaintext]]
address = "desk@lab.clinic.example"
""")
    assert "[[plaintext]] entry 1" in msg and "requires encryption" in msg


def test_single_bracket_table_is_refused(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, '[partner]\ndomain = "a.example"\nrequire = "encrypted"\nmethod = "openpgp"\n')
    assert "[[partner]]" in msg and "policy.toml" in msg


def test_bad_toml_names_file(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, '[[plaintext]\naddress = \n', "broken.toml")
    assert "broken.toml" in msg and "not valid TOML" in msg


def test_hold_needs_exactly_one_target(tmp_path: Path) -> None:
    msg = rule_error(tmp_path, '[[hold]]\naddress = "a@x.example"\ndomain = "x.example"\nreason = "r"\n')
    assert "[[hold]] entry 1" in msg and "exactly one" in msg
    write(tmp_path, "policy.toml", '[[hold]]\ndomain = "Insurer.Example"\nreason = "review"\n')
    policy = load_policy(tmp_path)
    assert policy.hold_for("claims@eu.insurer.example") is not None
    assert policy.hold_for("claims@insurer.example.org") is None


def test_partner_addresses_and_only_method(tmp_path: Path) -> None:
    write(tmp_path, "p.toml", """
[[partner]]
domain = "clinic.example"
require = "signed-and-encrypted"
method = "smime"
addresses = ["Dr.Demir@Mail.Example"]
only_method = true
""")
    policy = load_policy(tmp_path)
    p = policy.partner_for("dr.demir@mail.example")
    assert p is not None and p.domain == "clinic.example" and p.only_method
    assert policy.partner_for("other@mail.example") is None
    assert policy.partner_for("x@lab.clinic.example") is p
    assert policy.partner_for("x@notclinic.example") is None


def test_missing_rules_dir(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="does not exist"):
        load_policy(tmp_path / "nope")


def test_normalize_address() -> None:
    assert normalize_address(" <Bob@Example.COM> ") == "bob@example.com"
    assert normalize_address('"bob"@example.com') == "bob@example.com"
    assert normalize_address("example.com") is None
    assert normalize_address("bob@") is None
    assert normalize_address("bo b@example.com") is None


def _bump(path: Path, text: str) -> None:
    """Rewrite a file and move its mtime on, so the change is seen even on coarse clocks."""
    st = path.stat()
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_cache_reloads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    shutil.copy(REPO_RULES / "policy.toml", tmp_path / "policy.toml")
    cache = PolicyCache(tmp_path)
    first = cache.current()
    assert cache.current() is first  # unchanged files: no re-read
    assert first.plaintext_for("new@x.example") is None

    extra = tmp_path / "extra.toml"
    extra.write_text('[[plaintext]]\naddress = "new@x.example"\n', encoding="utf-8")
    second = cache.current()
    assert second is not first and second.plaintext_for("new@x.example") is not None

    _bump(extra, '[[plaintext]]\naddress = "*@x.example"\n')
    third = cache.current()
    assert third is second  # the last valid policy stays in force
    assert cache.last_error is not None and "extra.toml" in str(cache.last_error)

    _bump(extra, '[[plaintext]]\naddress = "other@x.example"\n')
    fourth = cache.current()
    assert cache.last_error is None
    assert fourth.plaintext_for("other@x.example") is not None
    assert fourth.plaintext_for("new@x.example") is None

    extra.unlink()
    assert cache.current().plaintext_for("other@x.example") is None


def test_cache_first_load_raises(tmp_path: Path) -> None:
    write(tmp_path, "policy.toml", "[[nonsense]]\n")
    with pytest.raises(RuleError, match="nonsense"):
        PolicyCache(tmp_path).current()


def test_cache_scans_at_most_every_check_every(tmp_path: Path) -> None:
    """A serving hub does not stat the rules folder for every message (check_every)."""
    import time as _time

    from mailhub.policy.rules import PolicyCache

    (tmp_path / "policy.toml").write_text('[[plaintext]]\naddress = "a@b.example"\n')
    cache = PolicyCache(tmp_path, check_every=3600)
    first = cache.current()
    (tmp_path / "more.toml").write_text('[[plaintext]]\naddress = "c@d.example"\n')
    assert cache.current() is first  # within the interval: no rescan
    cache._checked = _time.monotonic() - 7200
    assert len(cache.current().plaintext) == 2  # after it: the new file applies

"""Path confinement and password hashing (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferrylink.passwords import hash_password, verify_password
from ferrylink.paths import PathError, confined


def test_paths_stay_in_their_base(tmp_path: Path) -> None:
    home = tmp_path / "homes" / "acme"
    (home / "in").mkdir(parents=True)
    assert confined(home, "in/a.csv") == (home / "in" / "a.csv").resolve()
    assert confined(home, "/in/a.csv") == (home / "in" / "a.csv").resolve()
    assert confined(home, "") == home.resolve()
    for bad in ["../other/x", "in/../../x", "..", "a\x00b"]:
        with pytest.raises(PathError):
            confined(home, bad)


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "acme"
    home.mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    (home / "link").symlink_to(outside)
    with pytest.raises(PathError, match="leaves"):
        confined(home, "link/passwd")
    (home / "inner").mkdir()
    (home / "ok").symlink_to(home / "inner")
    assert confined(home, "ok/x") == (home / "inner" / "x").resolve()
    # A link as the last part, and a base the caller resolved: the same answers.
    (home / "file-link").symlink_to(outside / "passwd")
    (home / "inner" / "deeper").symlink_to(outside)
    for resolved in (False, True):
        for escape in ("file-link", "link/passwd", "ok/deeper/x", "inner/deeper"):
            with pytest.raises(PathError, match="leaves"):
                confined(home.resolve(), escape, resolved=resolved)
        assert (
            confined(home.resolve(), "ok/x", resolved=resolved) == (home / "inner" / "x").resolve()
        )
        assert confined(home.resolve(), "inner/new/x", resolved=resolved) == (
            home.resolve() / "inner" / "new" / "x"
        )


def test_password_hash_round_trip() -> None:
    stored = hash_password("s3cret pass")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_password("s3cret pass", stored)
    assert not verify_password("s3cret pas", stored)
    assert not verify_password("x", None)
    assert not verify_password("x", "md5$abc")
    assert hash_password("same") != hash_password("same")  # salted

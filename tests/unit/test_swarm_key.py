"""The swarm key file: format, permissions, never overwritten, never printed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from petalnode.errors import ConfigError
from petalnode.swarm_key import HEADER, SwarmKey, load_swarm_key


def test_save_then_load_round_trips_with_mode_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    key = SwarmKey.generate()
    key.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert text.startswith(HEADER + "\n") and len(text.splitlines()[1]) == 64
    assert SwarmKey.load(path) == key and load_swarm_key(str(path)) == key
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        SwarmKey.generate().save(path)
    assert SwarmKey.load(path) == key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".swarm-key-")]  # no temp file left


def test_load_refuses_a_key_others_can_read_missing_and_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    SwarmKey.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        SwarmKey.load(path)
    with pytest.raises(ConfigError, match="petalnode swarm-key"):
        SwarmKey.load(tmp_path / "missing.key")
    for body in ("", "abcd\n", "zz" * 32 + "\n", ("ab" * 32 + "\n") * 2):
        bad = tmp_path / f"bad{len(body)}.key"
        bad.write_text(body)
        os.chmod(bad, 0o600)
        with pytest.raises(ConfigError, match="not a petalnode swarm key"):
            SwarmKey.load(bad)


def test_the_key_never_shows_in_repr_and_subkeys_differ_per_purpose() -> None:
    key = SwarmKey(bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(key) and key.fingerprint in repr(key)
    assert key.derive(b"a") != key.derive(b"b") and len(key.derive(b"a")) == 32
    assert key != SwarmKey(bytes(32)) and key.fingerprint != SwarmKey(bytes(32)).fingerprint
    assert SwarmKey.from_text(key.to_text()) == key
    with pytest.raises(ConfigError):
        SwarmKey(b"short")

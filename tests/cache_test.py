"""The cache folder: where it is, and that a folder others may write to is refused."""

import os

import pytest

from maxrec import cache


def test_the_cache_folder_follows_maxrec_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("MAXREC_CACHE", str(tmp_path / "c"))
  assert cache.default_cache_dir() == str(tmp_path / "c")
  monkeypatch.delenv("MAXREC_CACHE")
  assert cache.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "maxrec")


def test_a_new_cache_is_private_and_a_shared_one_is_refused(tmp_path):
  new = tmp_path / "a" / "b"
  cache.check_private(new)
  assert new.stat().st_mode & 0o777 == 0o700
  cache.check_private(new)  # an existing private folder is fine
  new.chmod(0o757)
  with pytest.raises(PermissionError, match=r"writable by group or others \(mode 0o757\)"):
    cache.check_private(new)

"""MAXRec's cache folder: downloaded data sets and the built native library.

`$MAXREC_CACHE`, else `~/.cache/maxrec`.
"""

from __future__ import annotations

import os
import pathlib


def default_cache_dir() -> str:
  return os.environ.get("MAXREC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "maxrec"))


def check_private(folder: pathlib.Path) -> None:
  """Creates `folder` private (0700) if missing; refuses one that another user owns or
  that group or others may write to, since a library loaded from it runs in-process.

  Raises:
    PermissionError: naming the folder and the fix.
  """
  folder.mkdir(mode=0o700, parents=True, exist_ok=True)
  st = folder.stat()
  fix = f"run `chmod 700 {folder}` or set MAXREC_CACHE to a private folder"
  if hasattr(os, "getuid") and st.st_uid != os.getuid():
    raise PermissionError(f"{folder} belongs to another user (uid {st.st_uid}); {fix}")
  if st.st_mode & 0o022:
    mode = oct(st.st_mode & 0o777)
    raise PermissionError(f"{folder} is writable by group or others (mode {mode}); {fix}")

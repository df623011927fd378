"""Readers of interaction files: MovieLens, LightGCN/NGCF, RecBole atomic, CSV/TSV.

Each reader returns a `RawInteractions` with the raw ids exactly as written (integers for
numeric-id formats, strings otherwise). Bad input raises `DataError` (a `ValueError`)
whose message names the file, the line and the fix; blank lines are the only thing
skipped, and they are counted. A UTF-8 byte order mark at the start of a file is ignored,
and line endings may be LF, CRLF or CR. Ratings and timestamps must be finite numbers
('nan' and 'inf' are rejected), and integer ids must fit in 64 bits.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

FORMATS = ("movielens", "lightgcn", "recbole", "csv")


class DataError(ValueError):
  """Bad input data; the message names the file, the line and the fix."""


@dataclasses.dataclass
class RawInteractions:
  """Interactions with raw ids, one entry per row of the source.

  Attributes:
    user: [n] raw user ids (int64 or str objects).
    item: [n] raw item ids.
    rating: [n] float64 ratings, or None when the source has none.
    timestamp: [n] float64 timestamps, or None.
    fold: [n] int8, 0 = train and 2 = test for pre-split sources (a LightGCN folder with
      both train.txt and test.txt), else None.
    extra_users: raw ids of users listed without any interaction (LightGCN format).
    source: the file(s) read.
    blank_lines: blank lines skipped.
  """

  user: np.ndarray
  item: np.ndarray
  rating: np.ndarray | None = None
  timestamp: np.ndarray | None = None
  fold: np.ndarray | None = None
  extra_users: tuple = ()
  source: str = ""
  blank_lines: int = 0

  def __len__(self) -> int:
    return len(self.user)


def _read_lines(path: str) -> tuple[list[tuple[int, str]], int]:
  """(1-based line number, text) of the non-blank lines, and the number of blank lines."""
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file. Check --data_path.")
  if os.path.isdir(path):
    raise DataError(f"{path}: is a folder, expected a file.")
  try:
    with open(path, encoding="utf-8-sig") as f:  # -sig: drops a leading byte order mark
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
  lines = text.splitlines()
  kept = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
  if not kept:
    raise DataError(f"{path}: the file is empty; expected one interaction per line.")
  return kept, len(lines) - len(kept)


def _to_numbers(values: list[str], lines: list[int], path: str, what: str, dtype) -> np.ndarray:
  """Converts strings to numbers; on failure names the first bad line.

  Floats must be finite: 'nan' and 'inf' parse as numbers but are no rating or timestamp.
  """
  try:
    out = np.asarray(values, dtype=np.str_).astype(dtype)
  except (ValueError, OverflowError):
    for v, n in zip(values, lines):
      if dtype is np.int64:
        try:
          x = int(v)
        except ValueError:
          raise DataError(f"{path}:{n}: {what} {v!r} is not an integer.") from None
        if not -(2**63) <= x < 2**63:
          raise DataError(
            f"{path}:{n}: {what} {v!r} does not fit in a 64-bit integer; renumber the ids "
            "(e.g. 0 to n-1)."
          ) from None
      else:
        try:
          dtype(v)
        except (ValueError, OverflowError):
          raise DataError(f"{path}:{n}: {what} {v!r} is not a number.") from None
    raise DataError(f"{path}: could not convert the {what} column to numbers.") from None
  if out.dtype.kind == "f":
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
      raise DataError(
        f"{path}:{lines[bad[0]]}: {what} {values[bad[0]]!r} is not a finite number; give a "
        f"finite value or remove the row ({bad.size} such row(s))."
      )
  return out


def _check_ids(ids: np.ndarray, lines: list[int], path: str, what: str) -> None:
  bad = np.flatnonzero(ids < 0)
  if bad.size:
    raise DataError(
      f"{path}:{lines[bad[0]]}: negative {what} {ids[bad[0]]}; ids in this format must be "
      f">= 0 ({bad.size} such row(s))."
    )


def _split_fixed(rows, sep: str | None, ncols: int, path: str, layout: str) -> list[list[str]]:
  fields = [line.split(sep) for _, line in rows]
  for (n, _), f in zip(rows, fields):
    if len(f) != ncols:
      raise DataError(
        f"{path}:{n}: expected {ncols} columns ({layout}), found {len(f)}. Is --data_format right?"
      )
  return fields


def _check_unique(header: list[str], names, path: str, line: int, flag: dict) -> None:
  """Each column in `names` must appear at most once in `header`; `flag` names its flag."""
  for name in names:
    at = [str(j + 1) for j, h in enumerate(header) if h == name]
    if len(at) > 1:
      how = f"; or set {flag[name]} to another column" if name in flag else ""
      raise DataError(
        f"{path}:{line}: column {name!r} appears {len(at)} times in the header (columns "
        f"{', '.join(at)}); rename or remove all but one{how}."
      )


def _repeated_header(path: str, line: int, header_line: int) -> DataError:
  return DataError(
    f"{path}:{line}: this row repeats the header of line {header_line}; remove it (files "
    "joined with their headers keep only the first one)."
  )


def read_movielens(path: str) -> RawInteractions:
  """MovieLens `u.data` (tab-separated) or `ratings.dat` (`::`): user item rating time."""
  rows, blank = _read_lines(path)
  sep = "::" if "::" in rows[0][1] else None
  fields = _split_fixed(rows, sep, 4, path, "user, item, rating, timestamp")
  lines = [n for n, _ in rows]
  cols = list(zip(*fields))
  user = _to_numbers(list(cols[0]), lines, path, "user id", np.int64)
  item = _to_numbers(list(cols[1]), lines, path, "item id", np.int64)
  _check_ids(user, lines, path, "user id")
  _check_ids(item, lines, path, "item id")
  rating = _to_numbers(list(cols[2]), lines, path, "rating", np.float64)
  ts = _to_numbers(list(cols[3]), lines, path, "timestamp", np.float64)
  return RawInteractions(user, item, rating, ts, source=path, blank_lines=blank)


def _read_adjacency(path: str, fold: int):
  """One LightGCN file: each line `user item item ...`."""
  rows, blank = _read_lines(path)
  users, items, lines, lonely = [], [], [], []
  for n, line in rows:
    f = line.split()
    users.extend([f[0]] * max(len(f) - 1, 0))
    items.extend(f[1:])
    lines.extend([n] * (len(f) - 1))
    if len(f) == 1:
      lonely.append((n, f[0]))
  if lonely:
    lone = _to_numbers([u for _, u in lonely], [n for n, _ in lonely], path, "user id", np.int64)
    _check_ids(lone, [n for n, _ in lonely], path, "user id")
  else:
    lone = np.zeros(0, np.int64)
  user = _to_numbers(users, lines, path, "user id", np.int64)
  item = _to_numbers(items, lines, path, "item id", np.int64)
  _check_ids(user, lines, path, "user id")
  _check_ids(item, lines, path, "item id")
  return user, item, np.full(len(user), fold, np.int8), lone, blank


def read_lightgcn(path: str) -> RawInteractions:
  """The LightGCN/NGCF format: one user per line, `user item item ...`.

  `path` is a folder with `train.txt` and, optionally, `test.txt`, or one such file. With
  both files the rows carry their fold (0 train, 2 test: a given split); a folder without
  `test.txt`, or a single file, has no fold and is split per user like any other source.
  """
  if os.path.isfile(path):
    files = [(path, 0)]
  elif os.path.isdir(path):
    files = [(os.path.join(path, "train.txt"), 0)]
    if not os.path.exists(files[0][0]):
      raise DataError(
        f"{files[0][0]}: no such file; the LightGCN format needs train.txt (and, for a "
        "given split, test.txt) in the folder."
      )
    if os.path.exists(os.path.join(path, "test.txt")):
      files.append((os.path.join(path, "test.txt"), 2))
  else:
    raise DataError(f"{path}: no such file or folder. Check --data_path.")
  parts = [_read_adjacency(p, fold) for p, fold in files]
  user, item, fold, lone, blank = (list(x) for x in zip(*parts))
  presplit = len(files) == 2
  return RawInteractions(
    np.concatenate(user),
    np.concatenate(item),
    fold=np.concatenate(fold) if presplit else None,
    extra_users=tuple(np.unique(np.concatenate(lone)).tolist()),
    source=f"{path}/{{train,test}}.txt" if presplit else files[0][0],
    blank_lines=sum(blank),
  )


def read_recbole(path: str) -> RawInteractions:
  """A RecBole atomic `.inter` file: tab-separated, typed header `name:type`."""
  rows, blank = _read_lines(path)
  (hn, header), rows = rows[0], rows[1:]
  names = []
  for col in header.split("\t"):
    name, _, typ = col.partition(":")
    if typ not in ("token", "float", "token_seq", "float_seq"):
      raise DataError(
        f"{path}:{hn}: header column {col!r} needs a type: name:token, name:float, "
        "name:token_seq or name:float_seq."
      )
    names.append(name)
  for need in ("user_id", "item_id"):
    if need not in names:
      raise DataError(f"{path}:{hn}: the header has no {need} column (found {', '.join(names)}).")
  _check_unique(names, ("user_id", "item_id", "rating", "timestamp"), path, hn, {})
  if not rows:
    raise DataError(f"{path}: the file has a header but no interactions.")
  for n, line in rows:
    if line == header or line == "\ufeff" + header:
      raise _repeated_header(path, n, hn)
  fields = _split_fixed([(n, ln) for n, ln in rows], "\t", len(names), path, "as in the header")
  lines = [n for n, _ in rows]
  cols = dict(zip(names, map(list, zip(*fields))))
  user = np.asarray(cols["user_id"], dtype=object)
  item = np.asarray(cols["item_id"], dtype=object)
  rating = ts = None
  if "rating" in cols:
    rating = _to_numbers(cols["rating"], lines, path, "rating", np.float64)
  if "timestamp" in cols:
    ts = _to_numbers(cols["timestamp"], lines, path, "timestamp", np.float64)
  return RawInteractions(user, item, rating, ts, source=path, blank_lines=blank)


def read_csv(
  path: str,
  *,
  user_column: str = "user_id",
  item_column: str = "item_id",
  rating_column: str | None = None,
  timestamp_column: str | None = None,
  delimiter: str | None = None,
) -> RawInteractions:
  """A CSV/TSV file with a header row naming the columns; ids are kept as strings."""
  rows, blank = _read_lines(path)
  if delimiter is None:
    delimiter = "," if path.lower().endswith(".csv") else "\t"
  parsed = list(csv.reader([line for _, line in rows], delimiter=delimiter))
  header, body, lines = parsed[0], parsed[1:], [n for n, _ in rows[1:]]
  wanted = {"user": user_column, "item": item_column}
  wanted.update({k: v for k, v in (("rating", rating_column), ("time", timestamp_column)) if v})
  flag = {
    name: f"--{'timestamp' if role == 'time' else role}_column" for role, name in wanted.items()
  }
  for name in wanted.values():
    if name not in header:
      raise DataError(
        f"{path}:{rows[0][0]}: no column {name!r} in the header ({', '.join(header)}); "
        f"set {flag[name]}."
      )
  _check_unique(header, wanted.values(), path, rows[0][0], flag)
  if not body:
    raise DataError(f"{path}: the file has a header but no interactions.")
  first = {header[0], "\ufeff" + header[0]}  # a joined file may repeat its byte order mark
  for n, r in zip(lines, body):
    if len(r) != len(header):
      raise DataError(
        f"{path}:{n}: expected {len(header)} columns as in the header, found {len(r)}."
      )
    if r[0] in first and r[1:] == header[1:]:
      raise _repeated_header(path, n, rows[0][0])
  idx = {role: header.index(name) for role, name in wanted.items()}
  user = np.asarray([r[idx["user"]] for r in body], dtype=object)
  item = np.asarray([r[idx["item"]] for r in body], dtype=object)
  rating = ts = None
  if "rating" in idx:
    rating = _to_numbers([r[idx["rating"]] for r in body], lines, path, "rating", np.float64)
  if "time" in idx:
    ts = _to_numbers([r[idx["time"]] for r in body], lines, path, "timestamp", np.float64)
  return RawInteractions(user, item, rating, ts, source=path, blank_lines=blank)


def detect_format(path: str) -> str:
  """Guesses the format from the path; raises `DataError` when it cannot."""
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file or folder. Check --data_path.")
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "train.txt")):
      return "lightgcn"
    raise DataError(
      f"{path}: a folder without train.txt; point --data_path at the data file itself."
    )
  name = os.path.basename(path).lower()
  if name in ("train.txt", "test.txt"):
    return "lightgcn"
  if name in ("u.data", "ratings.dat"):
    return "movielens"
  if name.endswith(".inter"):
    return "recbole"
  if name.endswith((".csv", ".tsv")):
    return "csv"
  raise DataError(
    f"{path}: cannot tell the format from the name; set --data_format to one of "
    f"{', '.join(FORMATS)}."
  )


def read_interactions(path: str, data_format: str = "auto", **csv_options) -> RawInteractions:
  """Reads `path` in `data_format` ('auto' detects it). CSV options go to `read_csv`."""
  fmt = detect_format(path) if data_format == "auto" else data_format
  if fmt == "movielens":
    return read_movielens(path)
  if fmt == "lightgcn":
    return read_lightgcn(path)
  if fmt == "recbole":
    return read_recbole(path)
  if fmt == "csv":
    return read_csv(path, **csv_options)
  raise DataError(f"Unknown data format {fmt!r}; use one of {', '.join(FORMATS)}.")

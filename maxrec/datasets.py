"""Public data sets: download into a cache folder, verified, written atomically.

  ml-100k, ml-1m                 GroupLens zips; the extracted ratings file is kept
  gowalla, yelp2018, amazon-book the LightGCN splits (train.txt / test.txt)

Verification: the GroupLens zips are checked against the size and SHA-256 that
TensorFlow Datasets publishes for them (tensorflow_datasets/url_checksums/movielens.txt).
No checksum is published for the LightGCN files, so they are checked by content: the
user, item and interaction counts of docs/method.md §5.1 must match, and the SHA-256 of what
was accepted is written beside the file (`<name>.sha256`) and enforced from then on.

Every file is downloaded to a temporary name in the target folder and renamed only after
it is verified, so an interrupted or corrupted download never leaves a file that looks
complete. Network failures raise `DownloadError` with the URL and what to do offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile

from maxrec.cache import default_cache_dir

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
LIGHTGCN = "https://raw.githubusercontent.com/gusye1234/LightGCN-PyTorch/master/data"


class DownloadError(RuntimeError):
  """A download that could not be completed or verified; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Remote:
  """One file to fetch: `url` (relative to the data set's base URL) -> `dest` in the cache.

  Attributes:
    url: path under the base URL.
    dest: file name in the data set's cache folder.
    sha256, size: published checksum and size of what is downloaded, if known.
    member: for a zip, the member to extract as `dest`.
  """

  url: str
  dest: str
  sha256: str | None = None
  size: int | None = None
  member: str | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A data set: its files, base URL, the path to pass as --data_path, expected counts."""

  name: str
  base_url: str
  files: tuple[Remote, ...]
  data_path: str  # relative to the data set's folder; "" = the folder itself
  counts: dict | None = None  # LightGCN format: {"users", "items", "train", "test"}


REGISTRY = {
  "ml-100k": DatasetSpec(
    "ml-100k",
    GROUPLENS,
    (
      Remote(
        "ml-100k.zip",
        "u.data",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        size=4924029,
        member="ml-100k/u.data",
      ),
    ),
    "u.data",
  ),
  "ml-1m": DatasetSpec(
    "ml-1m",
    GROUPLENS,
    (
      Remote(
        "ml-1m.zip",
        "ratings.dat",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        size=5917549,
        member="ml-1m/ratings.dat",
      ),
    ),
    "ratings.dat",
  ),
  "gowalla": DatasetSpec(
    "gowalla",
    LIGHTGCN,
    (Remote("gowalla/train.txt", "train.txt"), Remote("gowalla/test.txt", "test.txt")),
    "",
    {"users": 29858, "items": 40981, "train": 810128, "test": 217242},
  ),
  "yelp2018": DatasetSpec(
    "yelp2018",
    LIGHTGCN,
    (Remote("yelp2018/train.txt", "train.txt"), Remote("yelp2018/test.txt", "test.txt")),
    "",
    {"users": 31668, "items": 38048, "train": 1237259, "test": 324147},
  ),
  "amazon-book": DatasetSpec(
    "amazon-book",
    LIGHTGCN,
    (Remote("amazon-book/train.txt", "train.txt"), Remote("amazon-book/test.txt", "test.txt")),
    "",
    {"users": 52643, "items": 91599, "train": 2380730, "test": 603378},
  ),
}


def _fetch(url: str, timeout: float, member: str | None = None) -> bytes:
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      return r.read()
  except urllib.error.HTTPError as e:
    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}.") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    by_hand = f"extract {member} from it" if member else "save it"
    raise DownloadError(
      f"cannot reach {url} ({reason}). Are you offline? Download it by hand, {by_hand}, and "
      "pass that file's path to --data_path; or retry with network access."
    ) from None


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.part{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _lightgcn_counts(train: bytes, test: bytes) -> dict:
  users, items, counts = set(), set(), {}
  for name, text in (("train", train), ("test", test)):
    n = 0
    for line in io.StringIO(text.decode("utf-8")):
      f = line.split()
      if not f:
        continue
      users.add(f[0])
      items.update(f[1:])
      n += len(f) - 1
    counts[name] = n
  return {"users": len(users), "items": len(items), **counts}


def download(
  name: str, cache_dir: str | None = None, *, base_url: str | None = None, timeout: float = 60.0,
  spec: DatasetSpec | None = None, check_counts: bool = True,
) -> str:  # fmt: skip
  """Downloads data set `name` (unless already there) and returns its --data_path.

  Args:
    name: a key of `REGISTRY` (ignored when `spec` is given).
    cache_dir: where data sets live (default $MAXREC_CACHE or ~/.cache/maxrec).
    base_url: a mirror to use instead of the registry's base URL.
    timeout: seconds per request.
    spec: a custom `DatasetSpec` (for mirrors with other files, and for tests).
    check_counts: verify the LightGCN files' counts (turn off for a modified mirror).
  Raises:
    DownloadError: unknown name, network failure, or a file that fails verification.
  """
  if spec is None:
    if name not in REGISTRY:
      raise DownloadError(f"unknown data set {name!r}; available: {', '.join(REGISTRY)}.")
    spec = REGISTRY[name]
  folder = os.path.join(cache_dir or default_cache_dir(), spec.name)
  os.makedirs(folder, exist_ok=True)
  base = (base_url or spec.base_url).rstrip("/")
  pending = [r for r in spec.files if not os.path.exists(os.path.join(folder, r.dest))]
  fetched = {}
  for remote in pending:
    url = f"{base}/{remote.url}"
    data = _fetch(url, timeout, remote.member)
    if remote.size is not None and len(data) != remote.size:
      raise DownloadError(f"{url}: got {len(data):,} bytes, expected {remote.size:,}; retry.")
    if remote.sha256 is not None and _sha256(data) != remote.sha256:
      raise DownloadError(f"{url}: SHA-256 {_sha256(data)} does not match {remote.sha256}.")
    if remote.member is not None:
      try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
          data = z.read(remote.member)
      except (zipfile.BadZipFile, KeyError) as e:
        raise DownloadError(f"{url}: not a zip holding {remote.member} ({e}).") from None
    fetched[remote.dest] = data
  if fetched and spec.counts is not None and check_counts:
    files = {r.dest: fetched.get(r.dest) for r in spec.files}
    for dest, data in files.items():
      if data is None:
        with open(os.path.join(folder, dest), "rb") as f:
          files[dest] = f.read()
    got = _lightgcn_counts(files["train.txt"], files["test.txt"])
    if got != spec.counts:
      raise DownloadError(
        f"{spec.name}: content counts {got} differ from the expected {spec.counts}; nothing "
        "was written. If the mirror is a known variant, rerun with --skip_count_check."
      )
  for dest, data in fetched.items():  # verified: now make them visible, one atomic rename each
    _write_atomic(os.path.join(folder, dest), data)
    _write_atomic(os.path.join(folder, dest + ".sha256"), (_sha256(data) + "\n").encode())
  for remote in spec.files:  # a file already in the cache must still match what was accepted
    path = os.path.join(folder, remote.dest)
    stamp = path + ".sha256"
    if remote.dest not in fetched and os.path.exists(stamp):
      with open(stamp) as f, open(path, "rb") as g:
        if f.read().strip() != _sha256(g.read()):
          raise DownloadError(f"{path}: changed since it was downloaded; delete it and retry.")
  return os.path.join(folder, spec.data_path) if spec.data_path else folder

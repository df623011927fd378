"""Downloads against a local HTTP server on 127.0.0.1 that the test starts and stops."""

import hashlib
import http.server
import io
import os
import socket
import threading
import zipfile

import pytest
from helpers import run_cli

from maxrec import datasets


@pytest.fixture
def server(tmp_path):
  """Serves tmp_path/www on a free port of 127.0.0.1; yields (base_url, www folder)."""
  www = tmp_path / "www"
  www.mkdir()

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
      super().__init__(*a, directory=str(www), **k)

    def log_message(self, *a):
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", www
  httpd.shutdown()
  httpd.server_close()


def zipped(member, text):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr(member, text)
  return buf.getvalue()


def movielens_spec(blob):
  remote = datasets.Remote(
    "ml-100k.zip",
    "u.data",
    sha256=hashlib.sha256(blob).hexdigest(),
    size=len(blob),
    member="ml-100k/u.data",
  )
  return datasets.DatasetSpec("ml-100k", "unused", (remote,), "u.data")


def test_download_verifies_extracts_and_caches(server, tmp_path):
  base, www = server
  blob = zipped("ml-100k/u.data", "1\t2\t5\t100\n2\t3\t4\t200\n")
  (www / "ml-100k.zip").write_bytes(blob)
  path = datasets.download(
    "ml-100k", str(tmp_path / "cache"), base_url=base, spec=movielens_spec(blob)
  )
  assert path == str(tmp_path / "cache" / "ml-100k" / "u.data")
  assert open(path).read().startswith("1\t2\t5")
  (www / "ml-100k.zip").unlink()  # cached: no second request
  assert (
    datasets.download("ml-100k", str(tmp_path / "cache"), base_url=base, spec=movielens_spec(blob))
    == path
  )


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
  base, www = server
  good = zipped("ml-100k/u.data", "1\t2\t5\t100\n")
  (www / "ml-100k.zip").write_bytes(zipped("ml-100k/u.data", "tampered\n"))
  spec = movielens_spec(good)
  with pytest.raises(datasets.DownloadError, match="got .* bytes, expected|SHA-256"):
    datasets.download("ml-100k", str(tmp_path / "cache"), base_url=base, spec=spec)
  assert os.listdir(tmp_path / "cache" / "ml-100k") == []  # no partial or temporary file


def test_lightgcn_files_checked_by_counts(server, tmp_path):
  base, www = server
  (www / "toy").mkdir()
  (www / "toy" / "train.txt").write_text("0 0 1\n1 1 2\n")
  (www / "toy" / "test.txt").write_text("0 2\n1 0\n")
  files = (
    datasets.Remote("toy/train.txt", "train.txt"),
    datasets.Remote("toy/test.txt", "test.txt"),
  )
  good = datasets.DatasetSpec(
    "toy", base, files, "", {"users": 2, "items": 3, "train": 4, "test": 2}
  )
  folder = datasets.download("toy", str(tmp_path / "c1"), spec=good)
  assert sorted(os.listdir(folder)) == [
    "test.txt",
    "test.txt.sha256",
    "train.txt",
    "train.txt.sha256",
  ]
  bad = datasets.DatasetSpec(
    "toy", base, files, "", {"users": 2, "items": 3, "train": 5, "test": 2}
  )
  with pytest.raises(datasets.DownloadError, match="content counts"):
    datasets.download("toy", str(tmp_path / "c2"), spec=bad)
  assert os.listdir(tmp_path / "c2" / "toy") == []
  # a cached file that changed afterwards is refused
  (tmp_path / "c1" / "toy" / "train.txt").write_text("0 0\n")
  with pytest.raises(datasets.DownloadError, match="changed since it was downloaded"):
    datasets.download("toy", str(tmp_path / "c1"), spec=good)


def test_offline_is_a_clear_error(tmp_path):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(datasets.DownloadError, match="cannot reach .* Are you offline"):
    datasets.download("ml-100k", str(tmp_path), base_url=f"http://127.0.0.1:{port}", timeout=5)
  with pytest.raises(datasets.DownloadError, match="unknown data set 'ml-9m'"):
    datasets.download("ml-9m", str(tmp_path))


def test_cli_prints_the_data_path_or_one_error_line(server, tmp_path):
  base, www = server
  r = run_cli(
    "experiments.download", "--dataset=ml-1m", f"--cache_dir={tmp_path}", f"--base_url={base}",
    timeout=120,
  )  # fmt: skip
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert "HTTP 404" in r.stderr and "ml-1m.zip" in r.stderr

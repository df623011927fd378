"""Readers: each format on small files, and every bad-input case names file and line."""

import numpy as np
import pytest

from maxrec import readers
from maxrec.readers import DataError


def write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


def test_movielens_tab(tmp_path):
  p = write(tmp_path, "u.data", "1\t10\t5\t100\n2\t20\t3\t200\n\n")
  raw = readers.read_interactions(p)
  np.testing.assert_array_equal(raw.user, [1, 2])
  np.testing.assert_array_equal(raw.item, [10, 20])
  np.testing.assert_array_equal(raw.rating, [5, 3])
  np.testing.assert_array_equal(raw.timestamp, [100, 200])
  assert raw.blank_lines == 1


def test_movielens_double_colon(tmp_path):
  p = write(tmp_path, "ratings.dat", "1::10::5::100\n3::7::4::5\n")
  raw = readers.read_interactions(p)
  np.testing.assert_array_equal(raw.user, [1, 3])
  np.testing.assert_array_equal(raw.rating, [5, 4])


def test_lightgcn_folder_with_empty_user(tmp_path):
  d = tmp_path / "gowalla"
  d.mkdir()
  (d / "train.txt").write_text("0 1 2 3\n1 2\n2\n")
  (d / "test.txt").write_text("0 4\n1 3\n")
  raw = readers.read_interactions(str(d))
  assert list(raw.user) == [0, 0, 0, 1, 0, 1]
  assert list(raw.item) == [1, 2, 3, 2, 4, 3]
  assert list(raw.fold) == [0, 0, 0, 0, 2, 2]
  assert raw.extra_users == (2,)


def test_recbole_inter_with_string_ids(tmp_path):
  text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\nalice\tx1\t4\t10\nbob\tx2\t2.5\t11\n"
  raw = readers.read_interactions(write(tmp_path, "d.inter", text))
  assert list(raw.user) == ["alice", "bob"]
  np.testing.assert_allclose(raw.rating, [4, 2.5])


def test_csv_named_columns(tmp_path):
  text = 'who,what,stars,when\nu1,i1,5,1\nu2,"i,2",1,2\n'
  raw = readers.read_csv(
    write(tmp_path, "d.csv", text),
    user_column="who",
    item_column="what",
    rating_column="stars",
    timestamp_column="when",
  )
  assert list(raw.item) == ["i1", "i,2"]
  np.testing.assert_allclose(raw.rating, [5, 1])


def test_tsv_default_delimiter(tmp_path):
  raw = readers.read_interactions(write(tmp_path, "d.tsv", "user_id\titem_id\n1\t2\n"))
  assert list(raw.user) == ["1"] and raw.rating is None


@pytest.mark.parametrize(
  "name,text,fmt,match",
  [
    ("u.data", "", "auto", r"u.data: the file is empty"),
    ("u.data", "1\t2\t3\t4\n1\t2\t3\n", "auto", r"u.data:2: expected 4 columns"),
    ("u.data", "1\t2\t3\t4\n1\tabc\t3\t4\n", "auto", r"u.data:2: item id 'abc' is not an integer"),
    ("u.data", "1\t2\tfive\t4\n", "auto", r"u.data:1: rating 'five' is not a number"),
    ("u.data", "1\t2\t3\t4\n\n-5\t2\t3\t4\n", "auto", r"u.data:3: negative user id -5"),
    (
      "d.inter",
      "user_id\titem_id\n1\t2\n",
      "auto",
      r"d.inter:1: header column 'user_id' needs a type",
    ),
    (
      "d.inter",
      "user_id:token\trating:float\n1\t2\n",
      "auto",
      r"d.inter:1: the header has no item_id",
    ),
    (
      "d.inter",
      "user_id:token\titem_id:token\n1\t2\t3\n",
      "auto",
      r"d.inter:2: expected 2 columns",
    ),
    ("d.csv", "a,b\n1,2\n", "auto", r"d.csv:1: no column 'user_id'"),
    ("d.csv", "user_id,item_id\n1,2\n3\n", "auto", r"d.csv:3: expected 2 columns"),
    ("d.txt", "1 2\n", "auto", r"cannot tell the format"),
  ],
)
def test_bad_input_names_file_and_line(tmp_path, name, text, fmt, match):
  p = write(tmp_path, name, text)
  with pytest.raises(DataError, match=match):
    readers.read_interactions(p, fmt)


def test_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    readers.read_interactions(str(tmp_path / "nope.data"), "movielens")
  with pytest.raises(DataError, match="no such file"):
    readers.read_interactions(str(tmp_path / "nope.csv"))
  p = write(tmp_path, "u.data", "1\t2\t3\t4\n")
  with pytest.raises(DataError, match="Unknown data format 'parquet'"):
    readers.read_interactions(p, "parquet")


def test_lightgcn_bad_lines(tmp_path):
  d = tmp_path / "lg"
  d.mkdir()
  (d / "train.txt").write_text("0 1 2\n1 x\n")
  (d / "test.txt").write_text("0 3\n")
  with pytest.raises(DataError, match=r"train.txt:2: item id 'x' is not an integer"):
    readers.read_lightgcn(str(d))
  (d / "train.txt").write_text("0 1 2\n-1 4\n")
  with pytest.raises(DataError, match=r"train.txt:2: negative user id -1"):
    readers.read_lightgcn(str(d))
  (d / "train.txt").unlink()
  with pytest.raises(DataError, match="train.txt: no such file"):
    readers.read_lightgcn(str(d))


def test_lightgcn_train_only_folder_or_file_has_no_fold(tmp_path):
  d = tmp_path / "gowalla"
  d.mkdir()
  (d / "train.txt").write_text("0 1 2 3\n1 2 4\n")
  for path in (str(d), str(d / "train.txt")):
    raw = readers.read_interactions(path)
    assert raw.fold is None, path  # split per user later, not a given split
    assert list(raw.item) == [1, 2, 3, 2, 4]
    assert raw.source == str(d / "train.txt")
  (d / "test.txt").write_text("0 4\n")
  assert readers.read_interactions(str(d)).fold is not None  # both files: a given split

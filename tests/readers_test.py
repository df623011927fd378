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


def write_bytes(tmp_path, name, data):
  p = tmp_path / name
  p.write_bytes(data)
  return str(p)


# One small file per format (name, text, reader options): 2 interactions, users 1 and 2.
EVERY_FORMAT = [
  ("u.data", "1\t10\t5\t100\n2\t20\t3\t200\n", {}),
  ("ratings.dat", "1::10::5::100\n2::20::3::200\n", {}),
  ("train.txt", "1 10\n2 20\n", {}),
  ("d.inter", "user_id:token\titem_id:token\trating:float\n1\t10\t5\n2\t20\t3\n", {}),
  ("d.csv", "user_id,item_id,rating\n1,10,5\n2,20,3\n", {"rating_column": "rating"}),
  ("d.tsv", "user_id\titem_id\n1\t10\n2\t20\n", {}),
]


@pytest.mark.parametrize("name,text,options", EVERY_FORMAT, ids=[f[0] for f in EVERY_FORMAT])
@pytest.mark.parametrize("bom", [False, True], ids=["no_bom", "bom"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_byte_order_mark_and_line_endings_in_every_format(
  tmp_path, name, text, options, bom, newline
):
  data = (b"\xef\xbb\xbf" if bom else b"") + text.replace("\n", newline).encode()
  raw = readers.read_interactions(write_bytes(tmp_path, name, data), **options)
  assert [str(x) for x in raw.user] == ["1", "2"]  # no BOM glued to the first id
  assert [str(x) for x in raw.item] == ["10", "20"]  # no '\r' left on the last column
  if raw.rating is not None:
    np.testing.assert_array_equal(raw.rating, [5, 3])
  assert raw.blank_lines == 0


def test_byte_order_mark_before_a_csv_header(tmp_path):
  p = write_bytes(tmp_path, "d.csv", b"\xef\xbb\xbfwho,what\r\nu1,i1\r\nu2,i2\r\n")
  raw = readers.read_csv(p, user_column="who", item_column="what")
  assert list(raw.user) == ["u1", "u2"] and list(raw.item) == ["i1", "i2"]


@pytest.mark.parametrize(
  "name,text,options,where,value",
  [
    ("u.data", "1\t2\t5\t100\n1\t3\tnan\t101\n", {}, "u.data:2", "rating 'nan'"),
    ("u.data", "1\t2\t5\t100\n\n1\t3\tinf\t101\n", {}, "u.data:3", "rating 'inf'"),
    ("ratings.dat", "1::2::NaN::100\n", {}, "ratings.dat:1", "rating 'NaN'"),
    ("u.data", "1\t2\t5\t100\n1\t3\t4\t-inf\n", {}, "u.data:2", "timestamp '-inf'"),
    (
      "d.inter",
      "user_id:token\titem_id:token\trating:float\na\tb\tinf\n",
      {},
      "d.inter:2",
      "rating 'inf'",
    ),
    (
      "d.csv",
      "user_id,item_id,stars\nu,i,4\nu,j,1e400\n",
      {"rating_column": "stars"},
      "d.csv:3",
      "rating '1e400'",
    ),
  ],
  ids=["nan", "inf", "dat_nan", "timestamp", "recbole", "csv_overflow"],
)
def test_non_finite_rating_or_timestamp_names_file_line_and_value(
  tmp_path, name, text, options, where, value
):
  with pytest.raises(DataError) as e:
    readers.read_interactions(write(tmp_path, name, text), **options)
  msg = str(e.value)
  assert f"{where}: {value} is not a finite number" in msg, msg
  assert "give a finite value or remove the row (1 such row(s))" in msg, msg


def test_non_finite_count_covers_every_row(tmp_path):
  p = write(tmp_path, "u.data", "1\t2\tnan\t1\n1\t3\t5\t2\n2\t3\tinf\t3\n")
  with pytest.raises(DataError, match=r"u.data:1: rating 'nan' .*\(2 such row\(s\)\)"):
    readers.read_interactions(p)


def test_id_too_large_for_int64_names_file_line_and_value(tmp_path):
  d = tmp_path / "lg"
  d.mkdir()
  (d / "train.txt").write_text("0 1 2\n1 2 9223372036854775808\n")
  with pytest.raises(DataError) as e:
    readers.read_lightgcn(str(d))
  msg = str(e.value)
  assert f"{d / 'train.txt'}:2: item id '9223372036854775808' does not fit in a 64-bit" in msg
  assert "renumber the ids" in msg
  (d / "train.txt").write_text("0 1\n\n99999999999999999999999\n")  # a user without items
  with pytest.raises(
    DataError, match=r"train.txt:3: user id '99999999999999999999999' does not fit"
  ):
    readers.read_lightgcn(str(d))
  (d / "train.txt").write_text("0 1\n")
  (d / "test.txt").write_text("0 -99999999999999999999\n")
  with pytest.raises(DataError, match=r"test.txt:1: item id '-99999999999999999999' does not fit"):
    readers.read_lightgcn(str(d))
  p = write(tmp_path, "u.data", "1\t2\t5\t100\n18446744073709551616\t2\t5\t100\n")
  with pytest.raises(DataError, match=r"u.data:2: user id '18446744073709551616' does not fit"):
    readers.read_interactions(p)
  (d / "test.txt").write_text("9223372036854775807 1\n")  # the largest int64 is an id
  assert readers.read_lightgcn(str(d)).user[-1] == 2**63 - 1


@pytest.mark.parametrize(
  "name,text,line",
  [
    ("d.csv", "user_id,item_id\nu1,i1\nuser_id,item_id\nu2,i2\n", 3),
    ("d.csv", "\ufeffuser_id,item_id\nu1,i1\n\n\ufeffuser_id,item_id\nu2,i2\n", 4),
    ("d.tsv", "user_id\titem_id\nu1\ti1\nu2\ti2\nuser_id\titem_id\n", 4),
    ("d.inter", "user_id:token\titem_id:token\nu1\ti1\nuser_id:token\titem_id:token\n", 3),
  ],
  ids=["csv", "csv_files_joined_with_bom", "tsv_last_row", "recbole"],
)
def test_header_repeated_in_the_body_names_its_line(tmp_path, name, text, line):
  with pytest.raises(DataError) as e:
    readers.read_interactions(write(tmp_path, name, text))
  msg = str(e.value)
  assert f"{name}:{line}: this row repeats the header of line 1; remove it" in msg, msg


@pytest.mark.parametrize(
  "name,text,options,column,flag",
  [
    (
      "d.csv",
      "user_id,item_id,item_id\nu1,i1,i2\n",
      {},
      "'item_id' appears 2 times in the header (columns 2, 3)",
      "--item_column",
    ),
    (
      "d.tsv",
      "user_id\tx\tuser_id\nu1\ti1\tu2\n",
      {"item_column": "x"},
      "'user_id' appears 2 times in the header (columns 1, 3)",
      "--user_column",
    ),
    (
      "d.csv",
      "user_id,item_id,r,r\nu1,i1,1,2\n",
      {"rating_column": "r"},
      "'r' appears 2 times in the header (columns 3, 4)",
      "--rating_column",
    ),
    (
      "d.inter",
      "user_id:token\titem_id:token\titem_id:token\nu1\ti1\ti2\n",
      {},
      "'item_id' appears 2 times in the header (columns 2, 3)",
      None,
    ),
  ],
  ids=["csv_item", "tsv_user", "csv_rating", "recbole_item"],
)
def test_duplicated_column_names_the_column_and_file(tmp_path, name, text, options, column, flag):
  with pytest.raises(DataError) as e:
    readers.read_interactions(write(tmp_path, name, text), **options)
  msg = str(e.value)
  assert f"{name}:1: column {column}" in msg and "rename or remove all but one" in msg, msg
  assert flag is None or f"set {flag} to another column" in msg, msg


def test_duplicated_unused_column_is_accepted(tmp_path):
  raw = readers.read_interactions(write(tmp_path, "d.csv", "user_id,note,item_id,note\nu,a,i,b\n"))
  assert list(raw.user) == ["u"] and list(raw.item) == ["i"]

"""Metric oracles of docs/method.md T11, written by hand, plus masking and blocking."""

import jax.numpy as jnp
import numpy as np
import pytest

from maxrec import metrics

LOG3 = np.log2(3.0)


def rank_scores(n_items, ranking):
  """Item scores that produce `ranking` (best first); other items score lower."""
  s = np.full(n_items, -100.0, np.float32)
  for r, item in enumerate(ranking):
    s[item] = 100.0 - r
  return s


def evaluate_rows(score_rows, heldout, exclude=(), ks=(3,), batch_size=1024):
  """Evaluates users whose item scores are given directly (user u = one-hot row)."""
  n_users = len(score_rows)
  user_emb = jnp.eye(n_users, dtype=jnp.float32)
  item_emb = jnp.asarray(np.stack(score_rows, 1))  # [n_items, n_users]
  es = metrics.build_eval_set(
    np.asarray(heldout, np.int64).reshape(-1, 2),
    np.asarray(exclude, np.int64).reshape(-1, 2),
    n_users,
    batch_size,
  )
  return metrics.evaluate(user_emb, item_emb, es, ks), es


# items: a=0, b=1, c=2, d=3, x=4, y=5, z=6
@pytest.mark.parametrize(
  "ranking,test,k,expected",
  [
    (
      [0, 4, 1],
      [0, 1],
      3,
      dict(recall=1, precision=2 / 3, ndcg=1.5 / (1 + 1 / LOG3), mrr=1, hit=1),
    ),
    ([0, 1], [0, 1, 2, 3], 2, dict(recall=0.5, ndcg=1.0, precision=1.0, hit=1, mrr=1)),
    ([4, 1, 5], [1], 3, dict(recall=1, ndcg=1 / LOG3, mrr=0.5, precision=1 / 3, hit=1)),
    ([4, 5, 6], [2], 3, dict(recall=0, ndcg=0, mrr=0, precision=0, hit=0)),
  ],
)
def test_t11_single_user(ranking, test, k, expected):
  scores = rank_scores(7, ranking)
  got, _ = evaluate_rows([scores], [(0, i) for i in test], ks=(k,))
  for name, value in expected.items():
    assert got[f"{name}@{k}"] == pytest.approx(value, abs=1e-6), name


def test_ndcg_value_from_method():
  got, _ = evaluate_rows([rank_scores(7, [0, 4, 1])], [(0, 0), (0, 1)])
  assert got["ndcg@3"] == pytest.approx(0.9197208, abs=1e-6)


def test_masked_training_item_never_ranked():
  scores = rank_scores(5, [3, 0, 1, 2, 4])  # item 3 is best but is a training item
  got, _ = evaluate_rows([scores], [(0, 0)], exclude=[(0, 3)], ks=(1,))
  assert got["recall@1"] == 1.0 and got["mrr@1"] == 1.0


def test_k_at_least_number_of_items():
  scores = rank_scores(4, [3, 2, 1, 0])
  got, _ = evaluate_rows([scores], [(0, 0), (0, 1)], exclude=[(0, 3)], ks=(10,))
  assert got["recall@10"] == 1.0
  assert got["precision@10"] == pytest.approx(0.2)  # divides by K, as defined
  # ranking after masking: 2, 1, 0 -> hits at ranks 2 and 3.
  assert got["ndcg@10"] == pytest.approx((1 / LOG3 + 0.5) / (1 + 1 / LOG3))
  assert got["mrr@10"] == pytest.approx(0.5)


def test_users_without_heldout_items_are_excluded_and_counted():
  rows = [rank_scores(5, [0, 1]), rank_scores(5, [2, 3]), rank_scores(5, [4])]
  got, es = evaluate_rows(rows, [(0, 0), (2, 1)], ks=(1,))
  assert es.n_users == 2 and es.n_excluded == 1
  assert got["recall@1"] == pytest.approx(0.5)  # user 0 hit, user 2 missed


def test_blocking_does_not_change_results():
  rng = np.random.default_rng(0)
  rows = [rng.normal(size=30).astype(np.float32) for _ in range(11)]
  held = [(u, i) for u in range(11) for i in rng.choice(30, 3, replace=False)]
  train = [(u, i) for u in range(11) for i in range(u, u + 4) if (u, i) not in held]
  a, _ = evaluate_rows(rows, held, train, ks=(5, 10), batch_size=1024)
  b, _ = evaluate_rows(rows, held, train, ks=(5, 10), batch_size=3)
  for k in a:
    assert a[k] == pytest.approx(b[k], abs=1e-6)


@pytest.mark.parametrize("n_items, k", [(40, 10), (3000, 50)])  # 3000: the two-level top-k
def test_against_numpy_reference(n_items, k):
  rng = np.random.default_rng(1)
  n_users = 20
  u_emb = rng.normal(size=(n_users, 4)).astype(np.float32)
  i_emb = rng.normal(size=(n_items, 4)).astype(np.float32)
  train = [(u, i) for u in range(n_users) for i in rng.choice(n_items, 5, replace=False)]
  test = [
    (u, i)
    for u in range(n_users)
    for i in rng.choice(n_items, 3, replace=False)
    if (u, i) not in train
  ]
  es = metrics.build_eval_set(np.array(test), np.array(train), n_users, 7)
  got = metrics.evaluate(jnp.asarray(u_emb), jnp.asarray(i_emb), es, (k,))
  scores = u_emb @ i_emb.T
  for u, i in train:
    scores[u, i] = -np.inf
  recalls, ndcgs = [], []
  for u in range(n_users):
    t = {i for uu, i in test if uu == u}
    if not t:
      continue
    top = np.argsort(-scores[u], kind="stable")[:k]
    hits = np.array([i in t for i in top], float)
    recalls.append(hits.sum() / len(t))
    idcg = sum(1 / np.log2(r + 2) for r in range(min(k, len(t))))
    ndcgs.append((hits / np.log2(np.arange(2, k + 2))).sum() / idcg)
  assert got[f"recall@{k}"] == pytest.approx(np.mean(recalls), abs=1e-6)
  assert got[f"ndcg@{k}"] == pytest.approx(np.mean(ndcgs), abs=1e-6)


def test_popularity_embeddings_score_by_count():
  u, i = metrics.popularity_embeddings(np.array([[0, 2], [1, 2], [1, 0]]), 2, 3)
  np.testing.assert_allclose(np.asarray(u @ i.T), [[1, 0, 2], [1, 0, 2]])


def test_hits_against_numpy():
  """Held-out pairs found among each row's top items, with padding pairs (row == b) and
  rows that hold nothing or everything."""
  rng = np.random.default_rng(3)
  b, k, n = 6, 30, 50
  top = np.stack([rng.choice(n, size=k, replace=False) for _ in range(b)])
  held = [rng.choice(n, size=m, replace=False) for m in (0, 1, 5, 17, 50, 3)]
  rows = np.concatenate([np.full(len(h), r) for r, h in enumerate(held)] + [np.full(4, b)])
  cols = np.concatenate(held + [top[0, :4]])  # padding pairs point at real items
  got = metrics._hits(jnp.asarray(top), jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32))
  want = np.stack([np.isin(t, h) for t, h in zip(top, held)])
  np.testing.assert_array_equal(got, want)


def test_two_level_top_k_equals_lax_top_k_with_ties():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from maxrec.metrics import two_level_top_k

  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.integers(0, 5, size=(64, 301)), jnp.float32)  # ties everywhere
  s = s.at[:, ::3].set(-jnp.inf)
  for chunk in (4, 7, 16):
    want, got = jax.lax.top_k(s, 20), two_level_top_k(s, 20, chunk)
    np.testing.assert_array_equal(want[0], got[0])
    np.testing.assert_array_equal(want[1], got[1])


def test_two_level_top_k_ignores_padding_columns_even_when_they_would_win():
  """Padding columns (ids >= n_valid) hold large values here: none may be returned, and
  the result equals `lax.top_k` over the real columns, ties and masked (-inf) ones
  included, also when fewer than k real columns are finite."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from maxrec.metrics import two_level_top_k

  rng = np.random.default_rng(1)
  n, chunk, k = 301, 8, 20
  real = jnp.asarray(rng.integers(0, 5, size=(32, n)), jnp.float32).at[:, ::3].set(-jnp.inf)
  real = real.at[0, :].set(-jnp.inf).at[0, 5].set(1.0)  # one finite column: -inf ties fill
  padded = jnp.concatenate([real, jnp.full((32, -n % chunk), 9.0)], 1)
  want = jax.lax.top_k(real, k)
  got = two_level_top_k(padded, k, chunk, n_valid=n)
  np.testing.assert_array_equal(want[0], got[0])
  np.testing.assert_array_equal(want[1], got[1])

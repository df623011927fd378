"""Backbones: shapes, initialisation, and LightGCN with L = 0 equal to MF."""

import jax
import numpy as np

from maxrec import graph as graph_lib
from maxrec.models import MF, LightGCN


def test_lightgcn_with_zero_layers_equals_mf():
  pairs = np.array([(0, 0), (1, 1), (1, 2), (2, 0)])
  g = graph_lib.build_graph(pairs, 3, 4)
  w = graph_lib.edge_weights(g)
  mf = MF(3, 4, features=5)
  lg = LightGCN(3, 4, features=5, num_layers=0)
  params = mf.init_params(jax.random.key(0))
  for a, b in zip(mf.apply({"params": params}, g, w), lg.apply({"params": params}, g, w)):
    np.testing.assert_array_equal(a, b)
  assert params["user"].shape == (3, 5) and params["item"].shape == (4, 5)


def test_initialisation_scale():
  params = MF(2000, 3000, features=64, init_std=0.1).init_params(jax.random.key(1))
  assert abs(float(np.std(params["item"])) - 0.1) < 0.002

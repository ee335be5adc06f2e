"""The EMA of the parameters, against a hand computation over real training steps:
ema_k = d_k ema_{k-1} + (1 - d_k) params_k with d_k = min(decay, (1 + k) / (10 + k)) at
update k (0-based), ema_{-1} = the initial params."""

from __future__ import annotations

import jax
import numpy as np

from experiments.configs.base import get_base_config
from memvol import data, models, parallel, train
from memvol import sde as sde_lib


def test_ema_matches_a_hand_computation():
  c = get_base_config()
  c.model.update(dict(name="mlp", hidden=16, num_layers=1))
  c.train.update(dict(batch_size=8, lr=1e-2, warmup_steps=1, ema_decay=0.6))
  shape = (8, 8, 1)
  model = models.get_model(c.model, shape)
  tx = train.make_optimizer(c.train)
  mesh = parallel.data_mesh()
  rep = parallel.replicated(mesh)
  state = train.init_state(model, tx, jax.random.PRNGKey(0), shape, rep)
  step = train.make_train_step(model, sde_lib.VPSDE(), tx, c.train, mesh)
  c.data.update(dict(name="digits", resolution=8, num_train=8, num_heldout=8, num_duplicated=0))
  x = np.asarray(data.make_split(c.data).train.images, np.float32)
  host = lambda tree: [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]  # noqa: E731
  ema = host(state.params)
  key = jax.random.PRNGKey(1)
  # decays (1 + k) / (10 + k) = 0.1, 2/11, ... up to k = 12, then the cap 0.6 (13/22 < 0.6 < 14/23)
  for k in range(16):
    state, _ = step(state, jax.device_put(x, parallel.batch_sharded(mesh)), key)
    d = min(0.6, (1 + k) / (10 + k))
    ema = [d * e + (1 - d) * p for e, p in zip(ema, host(state.params))]
    got = host(state.ema_params)
    for g, want in zip(got, ema):
      np.testing.assert_allclose(g, want, rtol=2e-5, atol=1e-6)
    assert not all(np.array_equal(g, p) for g, p in zip(got, host(state.params)))

"""Precision as a setting: the lowered programs of scoring, sampling and training carry the
requested precision on every dot_general and convolution (whatever the process-wide flag
says), the CPU gives the same numbers at every setting, and the records name it. Also the
persistent compilation cache that keeps those programs (config.compilation_cache_dir)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from memvol import models, numerics, parallel, pipeline, sampling, scoring, train, volume
from memvol import sde as sde_lib
from test_volume import _images, _tiny_net

SDE = sde_lib.VPSDE()
_OPS = re.compile(r"stablehlo\.(dot_general|convolution)\b.*")
_PREC = re.compile(r"precision(?:_config)? = \[([^\]]*)\]")


def op_precisions(text: str) -> dict[str, set[str]]:
  """{op: set of precision names} over every dot_general / convolution of a lowered text."""
  found: dict[str, set[str]] = {}
  for m in _OPS.finditer(text):
    p = _PREC.search(m.group(0))
    names = re.findall(r"(DEFAULT|HIGHEST|HIGH)", p.group(1)) if p else ["(unset)"]
    found.setdefault(m.group(1), set()).update(names)
  return found


# A flag other than the setting, and not HIGHEST (which diffrax sets explicitly on its own
# Runge-Kutta stage sums): an op the setting did not reach would show the flag's value.
OTHER = {"highest": "default", "high": "default", "default": "high"}


def _expect(text: str, precision: str, ops=("dot_general", "convolution")) -> None:
  """Every network op (all convolutions, and dot_generals) is at `precision`; no op is at
  anything but `precision` or an explicit HIGHEST."""
  found = op_precisions(text)
  for op in ops:
    assert precision.upper() in found.get(op, set()), (op, precision, found)
  assert found.get("convolution", {precision.upper()}) == {precision.upper()}, found
  assert all(v <= {precision.upper(), "HIGHEST"} for v in found.values()), (precision, found)


def _lower(fn, *args) -> str:
  return jax.jit(fn).lower(*args).as_text()


def _volume_text(opts: volume.VolumeOptions, eps_fn, x0) -> str:
  ids = jnp.arange(x0.shape[0], dtype=jnp.int32)
  fn = jax.jit(lambda e, x, i, k: volume.batch_log_volume(e, x, i, k, opts))
  return fn.lower(eps_fn, x0, ids, jax.random.PRNGKey(0)).as_text()


@pytest.mark.parametrize("precision", numerics.PRECISIONS)
@pytest.mark.parametrize("estimator", ["hutchinson", "paper"])
def test_lowered_volume_program_carries_the_precision(estimator, precision):
  """Under a process-wide flag of another value, the solve states its own precision."""
  eps_fn, x0 = _tiny_net(), _images(2)
  opts = volume.VolumeOptions(estimator=estimator, K=4, paper_steps=3, num_probes=2, precision=precision)
  with jax.default_matmul_precision(OTHER[precision]):
    _expect(_volume_text(opts, eps_fn, x0), precision)


def test_lowered_subspace_program_carries_the_precision():
  opts = volume.VolumeOptions(estimator="subspace", K=4, precision="high")
  with jax.default_matmul_precision(OTHER["high"]):
    _expect(_volume_text(opts, _tiny_net(), _images(2)), "high")


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_lowered_sampler_carries_the_precision(method):
  eps_fn = _tiny_net()
  key, shape = jax.random.PRNGKey(0), (4, 4, 1)
  for precision in ("high", "default"):
    if method == "sde":
      fn = lambda i: sampling._reverse_sde_batch((eps_fn, SDE, key, shape, 3, True, precision), i)  # noqa: E731
    else:
      fn = lambda i: sampling._pf_ode_batch(  # noqa: E731
          (eps_fn, SDE, key, shape, "tsit5", 1e-3, 1e-3, None, 16, precision), i)
    with jax.default_matmul_precision(OTHER[precision]):
      _expect(_lower(fn, jnp.arange(2, dtype=jnp.int32)), precision)


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_lowered_train_step_carries_the_precision(precision):
  c = get_base_config()
  c.model.name, c.model.hidden, c.model.num_layers = "mlp", 16, 1
  c.train.batch_size, c.train.precision = 4, precision
  shape = (4, 4, 1)
  model = models.get_model(c.model, shape)
  tx = train.make_optimizer(c.train)
  mesh = parallel.data_mesh(jax.devices()[:1])
  state = jax.eval_shape(lambda k: train.init_state(model, tx, k, shape, parallel.replicated(mesh)),
                         jax.random.PRNGKey(0))
  step = train.make_train_step(model, SDE, tx, c.train, mesh)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  with jax.default_matmul_precision(OTHER[precision]):
    text = step.lower(state, jax.ShapeDtypeStruct((4,) + shape, jnp.float32), key).as_text()
  _expect(text, precision, ops=("dot_general",))


def test_cpu_gives_the_same_volume_at_every_precision():
  """XLA's CPU backend computes float32 matmuls in float32 whatever the setting."""
  eps_fn, x0 = _tiny_net(), _images(3)
  for kw in (dict(estimator="hutchinson", num_probes=2, solver="heun", adaptive=False, num_steps=8),
             dict(estimator="paper", K=4, paper_steps=20)):
    ref = volume.run(eps_fn, x0, volume.VolumeOptions(precision="highest", **kw)).log_volume
    for precision in ("high", "default"):
      got = volume.run(eps_fn, x0, volume.VolumeOptions(precision=precision, **kw)).log_volume
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)


def test_precision_is_recorded_and_checked():
  c = get_base_config()
  c.score.precision = "high"
  opts = scoring.options(c, "hutchinson")
  assert opts.precision == "high"
  table = scoring.ImageTable(np.zeros((2, 4, 4, 1), np.float32), np.arange(2), np.array(["train"] * 2),
                             np.zeros(2, np.int64), np.ones(2, np.int64))
  eps_fn = _tiny_net()
  rec = scoring.settings(c, opts, eps_fn, table)
  assert rec["options"]["precision"] == "high"
  c.score.precision = "highest"
  assert scoring.settings(c, scoring.options(c, "hutchinson"), eps_fn, table) != rec
  c.sample.precision = "default"
  assert sampling._settings(c, "sde", eps_fn, (4, 4, 1))["precision"] == "default"
  with pytest.raises(ValueError, match="precision must be one of"):
    volume.VolumeOptions(precision="tf32")
  c.sample.precision = "bf16"
  with pytest.raises(ValueError, match="config.sample.precision"):
    sampling._check_config(c)
  c.train.precision = "fast"
  with pytest.raises(ValueError, match="train.precision"):
    train._check_train_config(c.train, 1)


def test_compilation_cache_takes_effect_after_earlier_compiles(tmp_path):
  jax.jit(lambda x: x + 1)(1.0)  # this process has compiled before the cache is switched on
  from jax.experimental.compilation_cache import compilation_cache
  old = jax.config.jax_persistent_cache_min_compile_time_secs
  try:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    pipeline.enable_compilation_cache(str(tmp_path / "cache"))
    jax.jit(lambda x: jnp.sin(x) * 3.25)(jnp.arange(5.0)).block_until_ready()
    assert any("jit__lambda" in f for f in os.listdir(tmp_path / "cache"))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()

"""Training: the loss, the optimiser schedule, data order, resume (bitwise on CPU), config
refusal, finite-ness errors, 1 vs 4 devices, and loading a trained eps_fn."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from memvol import checkpoint as ckpt_lib
from memvol import loading, models, parallel, train
from memvol import sde as sde_lib
from memvol import workdir as wdir


def tiny_config(num_steps: int = 12):
  """sklearn 8x8 digits, a tiny MLP, batch 8 (divisible by the 4 test devices)."""
  c = get_base_config()
  c.data.name = "digits"
  c.data.resolution = 8
  c.data.num_train = 24
  c.data.num_heldout = 8
  c.data.num_duplicated = 2
  c.data.duplicate_factor = 2
  c.model.name = "mlp"
  c.model.hidden = 64
  c.model.num_layers = 1
  c.model.dropout = 0.0
  t = c.train
  t.num_steps = num_steps
  t.batch_size = 8
  t.lr = 3e-3
  t.warmup_steps = 2
  t.log_every = 3
  t.ckpt_every = 3
  t.keep_checkpoints = 2
  t.sample_every = 0
  t.steps_per_call = 4
  return c


def tree_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step run: (config, workdir, final state)."""
  c = tiny_config(12)
  wd = str(tmp_path_factory.mktemp("ref"))
  return c, wd, train.run(c, wd)


# --- maths ---------------------------------------------------------------------------


def test_lr_schedule_and_ema_decay():
  c = tiny_config()
  c.train.lr, c.train.warmup_steps = 2e-3, 4
  sched = train.lr_schedule(c.train)
  np.testing.assert_allclose([float(sched(k)) for k in range(6)],
                             [5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3], rtol=1e-6)
  c.train.warmup_steps = 0
  assert float(train.lr_schedule(c.train)(0)) == pytest.approx(2e-3)
  np.testing.assert_allclose([float(train.ema_decay_at(0.999, k)) for k in (0, 10, 10_000)],
                             [0.1, 11 / 20, 0.999], rtol=1e-6)


def test_denoising_loss_vanishes_for_the_oracle():
  """With x0 = 0, x_t = sigma(t) z, so eps = x_t / sigma(t_net / 999) is exact: loss 0.
  This pins x_t = a x0 + sigma z, the 999 t time input and t in [eps, T]."""
  sde = sde_lib.VPSDE()
  x0 = jnp.zeros((64, 4, 4, 1))
  seen = []

  def oracle(params, x, t_net, key):
    seen.append(t_net)
    return x / sde.std(t_net / 999.0)[:, None, None, None]

  loss = train.denoising_loss(oracle, None, sde, x0, jax.random.PRNGKey(0))
  assert float(loss) < 1e-8
  t = np.asarray(seen[0]) / 999.0
  assert t.min() >= sde.eps and t.max() <= sde.T and t.std() > 0.2
  zero = train.denoising_loss(lambda p, x, t, k: jnp.zeros_like(x), None, sde, x0, jax.random.PRNGKey(0))
  assert 0.8 < float(zero) < 1.2  # E z^2 = 1


def test_stream_indices_are_epochwise_permutations_and_split_invariant():
  key = jax.random.PRNGKey(3)
  perms = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), 10)) for e in range(5)]
  whole = np.concatenate(perms)  # example k of the run is perms[k // 10][k % 10]
  for e in range(3):
    assert sorted(whole[10 * e:10 * e + 10]) == list(range(10))
  assert not np.array_equal(whole[:10], whole[10:20])
  # windows inside one epoch, across an epoch boundary and longer than an epoch; traced start
  jitted = jax.jit(train.stream_indices, static_argnums=(2, 3))
  for starts, count in (((0, 21, 13), 7), ((3, 16), 27)):
    for start in starts:
      np.testing.assert_array_equal(jitted(key, jnp.int32(start), count, 10), whole[start:start + count])


def test_call_length_stops_at_named_steps():
  c = tiny_config(20)
  c.train.steps_per_call, c.train.log_every, c.train.ckpt_every, c.train.sample_every = 4, 7, 5, 0
  done, calls = 0, []
  while done < 20:
    calls.append(train.call_length(c.train, done))
    done += calls[-1]
  assert calls == [4, 1, 2, 3, 4, 1, 4, 1]  # ends at 4 5 7 10 14 15 19 20 (log 7, 14; ckpt 5, 10, 15)


def test_check_finite_names_the_first_bad_step():
  losses = np.array([1.0, 0.9, 0.8, np.nan, np.inf])
  train.check_finite(losses[:3], np.ones(3), 11)
  with pytest.raises(FloatingPointError, match=r"step 14\b"):
    train.check_finite(losses, np.ones(5), 11)
  with pytest.raises(FloatingPointError, match=r"step 12\b"):
    train.check_finite(np.ones(3), np.array([1.0, np.inf, 1.0]), 11)


# --- devices -------------------------------------------------------------------------


def _tiny_setup(devices):
  c = tiny_config()
  shape = (8, 8, 1)
  model = models.get_model(c.model, shape)
  tx = train.make_optimizer(c.train)
  mesh = parallel.data_mesh(devices)
  state = train.init_state(model, tx, jax.random.PRNGKey(0), shape, parallel.replicated(mesh))
  step = train.make_train_step(model, sde_lib.VPSDE(), tx, c.train, mesh)
  return c, mesh, state, step


def test_augment_step_leaves_unmasked_images_alone():
  """The augmenting update with an all-False mask is the plain update (to float32
  rounding); one masked example changes it (so a mitigation arm's augmentation touches only its images)."""
  c, mesh, state0, plain = _tiny_setup(jax.devices()[:1])
  model = models.get_model(c.model, (8, 8, 1))
  aug = train.make_train_step(model, sde_lib.VPSDE(), train.make_optimizer(c.train), c.train, mesh,
                              augment=(2, 0.05))
  batch = jax.random.uniform(jax.random.PRNGKey(1), (8, 8, 8, 1), minval=-1, maxval=1)
  key = jax.random.PRNGKey(7)
  copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731  (the steps donate their state)
  ref, _ = plain(copy(state0), batch, key)
  same, _ = aug(copy(state0), batch, key, jnp.zeros(8, bool))
  moved, _ = aug(copy(state0), batch, key, jnp.arange(8) == 3)
  gap = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa: E731
  # another compiled program (the mask's select fused in), so equal to rounding, not bitwise
  assert gap(ref.params, same.params) < 1e-7 and gap(ref.params, moved.params) > 1e-5


def test_one_vs_four_devices_same_step():
  assert jax.device_count() >= 4, "conftest forces 4 host devices"
  batch = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (8, 8, 8, 1), minval=-1, maxval=1))
  key = jax.random.PRNGKey(7)
  out = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    _, mesh, state, step = _tiny_setup(devices)
    for _ in range(3):
      state, metrics = step(state, jax.device_put(batch, parallel.batch_sharded(mesh)), key)
    out.append((jax.device_get(state), jax.device_get(metrics)))
  (s1, m1), (s4, m4) = out
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  assert int(s1.step) == int(s4.step) == 3
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  # Adam divides by sqrt(v): where a gradient entry is ~0 the summation-order noise of the
  # all-reduce shows up at a small fraction of lr (3e-3) in that entry.
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not tree_equal(s1.params, s1.ema_params)


def test_batch_must_divide_by_device_count(tmp_path):
  c = tiny_config()
  c.train.batch_size = 6
  with pytest.raises(ValueError, match="divisible by the 4 devices"):
    train.run(c, str(tmp_path), mesh=parallel.data_mesh(jax.devices()[:4]))


# --- the stage: training, resume, refusal --------------------------------------------


def test_loss_falls_on_a_tiny_set(tmp_path):
  c = tiny_config(150)  # same network and optimiser as the other runs: one compile
  c.data.num_train, c.data.num_duplicated = 8, 0
  c.train.log_every, c.train.ckpt_every = 25, 150
  wd = str(tmp_path)
  shape = (8, 8, 1)
  model = models.get_model(c.model, shape)
  init = train.init_state(model, train.make_optimizer(c.train), jax.random.fold_in(
      jax.random.PRNGKey(c.seed), 0), shape, parallel.replicated(parallel.data_mesh()))
  final = train.run(c, wd)
  from memvol import data as data_lib
  x0 = jnp.asarray(np.tile(data_lib.prepare(c, wd).train.images, (32, 1, 1, 1)))
  apply = lambda p, x, t, k: model.apply({"params": p}, x, t, train=False, rngs={"dropout": k})
  sde = sde_lib.from_config(c.sde)
  before = float(train.denoising_loss(apply, init.params, sde, x0, jax.random.PRNGKey(5)))
  after = float(train.denoising_loss(apply, final.params, sde, x0, jax.random.PRNGKey(5)))
  assert after < 0.6 * before, (before, after)
  rows = train.read_log(wd)
  assert [r["step"] for r in rows] == [25, 50, 75, 100, 125, 150]
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert os.path.exists(os.path.join(wd, "train", "loss.png"))


def test_resume_is_bitwise_identical(reference, tmp_path):
  c, ref_wd, ref = reference
  wd = str(tmp_path)
  half = tiny_config(6)
  train.run(half, wd)
  assert ckpt_lib.latest_step(wd) == 6 and not train.is_complete(c, wd)
  resumed = train.run(c, wd)  # restores params, optimiser state and data position from disk
  assert int(resumed.step) == 12
  assert tree_equal(resumed, ref)
  assert [r["step"] for r in train.read_log(wd)] == [3, 6, 9, 12]
  assert sorted(os.listdir(wdir.checkpoints(wd))) == ["12", "9"]  # keep_checkpoints = 2


def test_killed_run_resumes_bitwise(reference, tmp_path, monkeypatch):
  """Kill the run after step 8 (checkpoint at 6 saved, steps 7-8 lost), restart: same end."""
  _, _, ref = reference
  c = tiny_config(12)
  wd = str(tmp_path)
  real = train.check_finite

  def killer(losses, grad_norms, first_step):
    real(losses, grad_norms, first_step)
    if first_step + len(losses) - 1 >= 8:
      raise KeyboardInterrupt("simulated kill")

  monkeypatch.setattr(train, "check_finite", killer)
  c.train.log_every = 4  # logs at 3, 4, 6, 8: the kill lands between checkpoints
  with pytest.raises(KeyboardInterrupt):
    train.run(c, wd)
  assert ckpt_lib.latest_step(wd) == 6
  monkeypatch.setattr(train, "check_finite", real)
  c.train.log_every = 3
  resumed = train.run(c, wd)
  assert tree_equal(resumed, ref)
  steps = [r["step"] for r in train.read_log(wd)]
  assert steps == sorted(set(steps)) and steps[-1] == 12 and 8 not in steps


@pytest.mark.parametrize("fused", ["true", "false"])
def test_resume_is_bitwise_when_calls_split_the_steps_differently(tmp_path, fused):
  """steps_per_call 4, logs every 7, checkpoints every 5: the uninterrupted run's calls end at
  4 5 7 10 14 15 17; stopped at 9 and resumed they end at 4 5 7 9 | 10 14 15 17. Fused: each
  call one compiled loop (the accelerator default); unfused: updates dispatched one by one."""
  def config(num_steps):
    c = tiny_config(num_steps)
    c.train.log_every, c.train.ckpt_every, c.train.fused_steps = 7, 5, fused
    return c
  ref = train.run(config(17), str(tmp_path / "ref"))
  wd = str(tmp_path / "split")
  train.run(config(9), wd)
  assert ckpt_lib.latest_step(wd) == 9
  resumed = train.run(config(17), wd)
  assert int(resumed.step) == 17 and tree_equal(resumed, ref)
  assert [r["step"] for r in train.read_log(wd)] == [5, 7, 9, 10, 14, 15, 17]


_SIGTERMED = r"""
import sys
sys.path.insert(0, "tests")
from test_train import tiny_config
from memvol import train
c = tiny_config(10**6)
c.train.log_every, c.train.ckpt_every = 5, 10**6
train.run(c, sys.argv[1])
"""


@pytest.mark.slow  # a fresh Python process importing JAX and compiling: ~10 s of CPU
def test_sigterm_saves_and_resumes_bitwise(tmp_path):
  """A training process that gets SIGTERM mid-run saves a checkpoint at the step it reached
  and exits with preempt.Preempted; resuming from it ends bitwise where an uninterrupted run
  ends."""
  import signal
  import subprocess
  import sys
  import time
  wd = str(tmp_path / "run")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", _SIGTERMED, wd], cwd=root, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  log = os.path.join(wd, "train", "log.csv")
  deadline = time.monotonic() + 240
  while not (os.path.exists(log) and len(open(log).readlines()) > 1):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=240)[0]
  assert proc.returncode != 0 and "Preempted: train preempted at step" in out, out[-3000:]
  stopped = ckpt_lib.latest_step(wd)
  assert stopped is not None and 5 <= stopped < 10**6, stopped
  assert f"preempted at step {stopped};" in out
  assert train.read_log(wd)[-1]["step"] == stopped
  c = tiny_config(stopped + 6)
  c.train.log_every, c.train.ckpt_every = 5, 10**6
  resumed = train.run(c, wd)
  ref = train.run(c, str(tmp_path / "ref"))
  assert int(resumed.step) == stopped + 6 and tree_equal(resumed, ref)


def test_keep_every_keeps_those_steps_too(tmp_path):
  c = tiny_config(12)
  c.train.keep_checkpoints, c.train.keep_every = 1, 6
  train.run(c, str(tmp_path))
  assert sorted(os.listdir(wdir.checkpoints(str(tmp_path))), key=int) == ["6", "12"]


def test_complete_run_returns_at_once(reference):
  c, wd, ref = reference
  assert train.is_complete(c, wd)
  log_before = open(os.path.join(wd, "train", "log.csv")).read()
  state = train.run(c, wd)
  assert tree_equal(state, ref)
  assert open(os.path.join(wd, "train", "log.csv")).read() == log_before


@pytest.mark.parametrize("section,field,value", [("model", "hidden", 16), ("sde", "beta_max", 10.0),
                                                 ("data", "num_train", 20)])
def test_config_mismatch_is_refused_naming_the_field(reference, section, field, value):
  c, wd, _ = reference
  other = tiny_config(24)
  other[section][field] = value
  pattern = re.escape(f"{section}.{field}")
  with pytest.raises(ValueError, match=pattern):
    train.run(other, wd)
  with pytest.raises(ValueError, match=pattern):
    loading.load_params(other, wd)


def test_non_finite_loss_stops_with_the_step(tmp_path):
  c = tiny_config(12)
  c.train.lr, c.train.warmup_steps, c.train.grad_clip = 1e30, 0, 0.0
  c.train.ckpt_every = 100
  with pytest.raises(FloatingPointError, match=r"non-finite training metrics at step \d+"):
    train.run(c, str(tmp_path))
  assert ckpt_lib.latest_step(str(tmp_path)) is None  # nothing non-finite was saved


# --- loading -------------------------------------------------------------------------


def test_load_eps_fn_gives_a_single_image_eps_fn(reference):
  c, wd, ref = reference
  eps_fn = loading.load_eps_fn(c, wd)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 1))
  y = eps_fn(x, jnp.float32(0.3))
  assert y.shape == (8, 8, 1) and bool(jnp.all(jnp.isfinite(y)))
  model = models.get_model(c.model, (8, 8, 1))
  sde = sde_lib.from_config(c.sde)
  want = model.apply({"params": ref.ema_params}, x[None], sde.time_input(jnp.full((1,), 0.3)),
                     train=False)[0]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  assert tree_equal(loading.load_params(c, wd, use_ema=False), ref.params)
  assert not tree_equal(loading.load_params(c, wd, use_ema=True), ref.params)
  batched = jax.vmap(eps_fn)(jnp.stack([x, -x]), jnp.array([0.3, 0.7]))
  np.testing.assert_allclose(batched[0], y, rtol=1e-5, atol=1e-6)


def test_loading_without_a_checkpoint_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    loading.load_eps_fn(tiny_config(), str(tmp_path))
  assert not train.is_complete(tiny_config(), str(tmp_path))


# --- experiment configs --------------------------------------------------------------

CONFIGS = {"digits": ("digits_mlp", ("", "quick")),
           "cifar10_2to7": ("paper_cifar10", ("", "short", "quick")),
           "celeba64": ("paper_cifar10", ("", "quick"))}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_experiment_configs(name):
  import importlib
  mod = importlib.import_module(f"experiments.configs.{name}")
  doc = mod.__doc__
  for needed in ("python -m experiments.main", f"--config=experiments/configs/{name}.py",
                 "Expected runtime", "Expected result"):
    assert needed in doc, (name, needed)
  named, args = CONFIGS[name]
  full = mod.get_config()
  assert full.model.to_dict() == models.named_config(named).to_dict()
  for arg in args:
    c = mod.get_config(arg or None)
    train._check_train_config(c.train, 4)
    assert c.train.batch_size % 8 == 0  # fits 1, 2, 4 or 8 devices
    models.get_model(c.model, (c.data.resolution, c.data.resolution, 3))
  with pytest.raises(ValueError, match="unknown config argument"):
    mod.get_config("nonsense")


def _fake_cifar(folder: str) -> str:
  import pickle
  path = os.path.join(folder, "cifar-10-batches-py")
  os.makedirs(path)
  rng = np.random.default_rng(0)
  with open(os.path.join(path, "data_batch_1"), "wb") as f:
    pickle.dump({b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 40))}, f)
  return path


def _fake_faces(folder: str) -> str:
  from PIL import Image
  path = os.path.join(folder, "faces")
  os.makedirs(path)
  rng = np.random.default_rng(0)
  for i in range(36):
    Image.fromarray(rng.integers(0, 256, (90, 72, 3), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
  return path


@pytest.mark.slow
@pytest.mark.parametrize("name,make", [("cifar10_2to7", _fake_cifar), ("celeba64", _fake_faces)])
def test_quick_gpu_configs_train_on_fake_data(name, make, tmp_path):
  import importlib
  c = importlib.import_module(f"experiments.configs.{name}").get_config("quick")
  c.data.path = make(str(tmp_path))
  c.train.num_steps, c.train.log_every, c.train.ckpt_every = 4, 2, 2
  wd = str(tmp_path / "run")
  state = train.run(c, wd)
  assert int(state.step) == 4 and train.is_complete(c, wd)
  eps = loading.load_eps_fn(c, wd)(jnp.zeros((c.data.resolution,) * 2 + (3,)), jnp.float32(0.5))
  assert eps.shape == (c.data.resolution, c.data.resolution, 3) and bool(jnp.all(jnp.isfinite(eps)))


_PROCESS = r"""
import os, sys
pid, port, wd = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", 2, pid)
sys.path.insert(0, "tests")
import numpy as np
from test_train import tiny_config
from memvol import train
assert jax.process_count() == 2 and jax.device_count() == 4
state = train.run(tiny_config(12), wd)
np.savez(f"{wd}/final_{pid}.npz", *[np.asarray(p.addressable_data(0)) for p in jax.tree.leaves(state.params)])
"""


@pytest.mark.slow
def test_two_processes_train_like_one(reference, tmp_path):
  """jax.distributed on localhost: 2 processes x 2 CPU devices, each feeding its half of the
  global batch, end where 1 process x 4 devices ends (up to all-reduce order)."""
  import socket
  import subprocess
  import sys
  _, _, ref = reference
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(p), port, str(tmp_path)], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in (0, 1)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
  want = [np.asarray(x) for x in jax.tree.leaves(ref.params)]
  for p in (0, 1):
    with np.load(tmp_path / f"final_{p}.npz") as z:
      got = [z[f"arr_{i}"] for i in range(len(want))]
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert ckpt_lib.latest_step(str(tmp_path)) == 12
  assert [r["step"] for r in train.read_log(str(tmp_path))] == [3, 6, 9, 12]


def test_random_flip_mirrors_about_half():
  x = jax.numpy.asarray(np.random.default_rng(0).normal(size=(200, 3, 4, 1)), np.float32)
  y = np.asarray(train.flip_batch(jax.random.PRNGKey(0), x))
  x = np.asarray(x)
  same = np.all(y == x, axis=(1, 2, 3))
  mirrored = np.all(y == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored) and 70 < mirrored.sum() < 130
  np.testing.assert_array_equal(np.asarray(train.flip_batch(jax.random.PRNGKey(0), x)), y)

"""Score networks: shapes, odd sides, parameter counts, zero-init output, one training
step per named model, and the single-image eps_fn under jit / vmap / jvp / linearize / x64."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memvol import models
from memvol import sde as sde_lib
from memvol.models.unet import timestep_embedding


@jax.jit
def jiggle(params, seed: int = 0):
  """Params with every leaf perturbed by N(0, 0.05^2), so zero-initialised output layers are
  not zero (one draw for all leaves, with an "rbg" key: fast to compile)."""
  leaves, tree = jax.tree.flatten(params)
  z = jax.random.normal(jax.random.key(seed, impl="rbg"), (sum(p.size for p in leaves),))
  offsets = np.cumsum([0] + [p.size for p in leaves])
  return jax.tree.unflatten(tree, [p + 0.05 * z[o:o + p.size].reshape(p.shape) for p, o in zip(leaves, offsets)])


def unet_cfg(**kw):
  c = models.named_config("small_unet")
  c.update(dict(ch=8, num_groups=4))
  c.update(kw)
  return c


def build(cfg, shape, seed=0):
  model = models.get_model(cfg, shape)
  return model, jax.jit(lambda k: models.init_params(model, k, shape))(jax.random.PRNGKey(seed))


def loss_fn(model, params, x, t_net, key):
  eps = model.apply({"params": params}, x, t_net, train=True, rngs={"dropout": key})
  return jnp.mean((eps - jnp.flip(x, axis=1)) ** 2)


def one_step(model, params, shape, batch):
  """(loss before, loss after) one Adam step on a fixed batch."""
  x = jax.random.uniform(jax.random.PRNGKey(1), (batch,) + tuple(shape), minval=-1, maxval=1)
  t_net = jnp.linspace(0.0, 999.0, batch)
  k = jax.random.PRNGKey(2)
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params):
    loss = lambda p: loss_fn(model, p, x, t_net, k)
    l0, g = jax.value_and_grad(loss)(params)
    upd, _ = tx.update(g, tx.init(params), params)
    return l0, optax.tree.norm(g), loss(optax.apply_updates(params, upd))

  l0, gnorm, l1 = step(params)
  assert np.isfinite(float(l0)) and float(gnorm) > 0
  return float(l0), float(l1)


# --- architecture ----------------------------------------------------------------------


def test_timestep_embedding_is_ddpm_sinusoid():
  e = np.asarray(timestep_embedding(jnp.array([0.0, 3.0]), 8))
  np.testing.assert_allclose(e[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  w = 10000.0 ** (-np.arange(4) / 3)
  np.testing.assert_allclose(e[1], np.concatenate([np.sin(3 * w), np.cos(3 * w)]), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="even"):
    timestep_embedding(jnp.zeros(1), 5)


@pytest.mark.parametrize("shape, ch_mult", [((14, 14, 1), (1, 2, 2)), ((9, 12, 3), (1, 2))])
def test_unet_keeps_shape_at_odd_sides_and_starts_at_zero(shape, ch_mult):
  """14 -> 7 -> 4 -> back to 7 and 14, 9x12 -> 5x6: output shape = input shape; the
  zero-initialised last conv makes the fresh network output exactly 0."""
  model, params = build(unet_cfg(ch_mult=ch_mult, attn_resolutions=(7,)), shape)
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + shape)
  apply = jax.jit(lambda p: model.apply({"params": p}, x, jnp.array([10.0, 500.0])))
  y = apply(params)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert float(jnp.abs(y).max()) == 0.0
  assert float(jnp.abs(apply(jiggle(params))).max()) > 1e-3


def test_unet_attention_blocks_follow_resolutions_and_block_counts():
  model = models.get_model(unet_cfg(ch_mult=(1, 2), attn_resolutions=(7,), num_res_blocks_down=2,
                                   num_res_blocks_up=4), (14, 14, 1))
  params = jax.eval_shape(lambda k: models.init_params(model, k, (14, 14, 1)), jax.random.PRNGKey(0))
  names = set(params)
  assert {"down1_attn0", "down1_attn1", "mid_attn", "up1_attn0", "up1_attn3"} <= names
  assert not any(n.startswith(("down0_attn", "up0_attn")) for n in names)
  assert {f"up0_res{j}" for j in range(4)} <= names and "up0_res4" not in names
  assert {"down0_res1", "down1_res1"} <= names and "down0_res2" not in names
  assert "down1_downsample" not in names and "down0_downsample" in names and "up1_upsample" in names
  # an up block past the num_res_blocks_down + 1 skips of its level takes no skip: 16 -> 16 channels
  assert params["up1_res3"]["conv1"]["kernel"].shape == (3, 3, 16, 16)
  assert params["up1_res0"]["conv1"]["kernel"].shape == (3, 3, 32, 16)


def test_paper_cifar10_matches_ddpm_parameter_count():
  """DDPM's CIFAR-10 network has 35.7M parameters (shapes only: no compile)."""
  cfg = models.named_config("paper_cifar10")
  assert (cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks_down, cfg.num_res_blocks_up,
          tuple(cfg.attn_resolutions), cfg.num_groups, cfg.dropout) == (128, (1, 2, 2, 2), 2, 3, (16,), 32, 0.1)
  model = models.get_model(cfg, (32, 32, 3))
  params = jax.eval_shape(lambda k: models.init_params(model, k, (32, 32, 3)), jax.random.PRNGKey(0))
  assert models.count_params(params) == 35_746_307
  assert params["down1_attn0"]["q"]["kernel"].shape == (256, 256)  # attention at 16x16
  assert "down0_attn0" not in params and "down2_attn0" not in params
  assert params["up3_res2"]["conv1"]["kernel"].shape == (3, 3, 512, 256)  # 3 up blocks, skips concatenated
  y = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.ones((1, 32, 32, 3)), jnp.array([500.0])), params)
  assert y.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_paper_cifar10_init_forward_and_gradient_step():
  """Compiles the 35.7M-parameter network: ~1 min on 2 CPU cores."""
  model, params = build(models.named_config("paper_cifar10"), (32, 32, 3))
  apply = jax.jit(lambda p, k: model.apply({"params": p}, jnp.ones((1, 32, 32, 3)), jnp.array([500.0]),
                                           train=True, rngs={"dropout": k}))
  y0, y1 = apply(jiggle(params), jax.random.PRNGKey(0)), apply(jiggle(params), jax.random.PRNGKey(1))
  assert y0.shape == (1, 32, 32, 3) and np.all(np.isfinite(np.asarray(y0)))
  assert float(jnp.abs(y0 - y1).max()) > 1e-4  # dropout 0.1 active in training
  l0, l1 = one_step(model, params, (32, 32, 3), 2)
  assert l1 < l0


@pytest.mark.parametrize("name, shape, n_params", [("small_unet", (14, 14, 1), 367_129),
                                                   ("digits_mlp", (8, 8, 1), 593_984)])
def test_named_models_train_one_step(name, shape, n_params):
  model, params = build(models.named_config(name), shape)
  assert models.count_params(params) == n_params
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  l0, l1 = one_step(model, params, shape, 4)
  assert l1 < l0


def test_init_params_is_deterministic_in_the_key():
  model = models.get_model(models.named_config("digits_mlp").copy_and_resolve_references(), (8, 8, 1))
  init = jax.jit(lambda k: models.init_params(model, k, (8, 8, 1)))
  a, b = init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(0))
  c, d = init(jax.random.PRNGKey(1)), init(jax.random.key(0))
  w = lambda p: np.asarray(p["in"]["kernel"])
  np.testing.assert_array_equal(w(a), w(b))
  np.testing.assert_array_equal(w(a), w(d))  # typed and raw keys agree
  assert not np.allclose(w(a), w(c))
  assert 0.05 < w(a).std() < 0.2  # lecun normal, fan-in 64: std 1/8
  with pytest.raises(ValueError, match="one PRNG key"):
    models.init_params(model, jax.random.split(jax.random.PRNGKey(0), 3), (8, 8, 1))


def test_base_config_model_is_small_unet():
  from experiments.configs.base import get_base_config
  assert get_base_config().model.to_dict() == models.named_config("small_unet").to_dict()


def test_dropout_only_in_training():
  cfg = models.named_config("digits_mlp")
  cfg.update(dict(hidden=16, num_layers=1, dropout=0.5))
  model, params = build(cfg, (4, 4, 1))
  params = jiggle(params)
  x, t = jnp.ones((1, 4, 4, 1)), jnp.array([100.0])

  @jax.jit
  def run(p):
    a = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    b = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    c = model.apply({"params": p}, x, t, train=False)
    d = model.apply({"params": p}, x, t, train=False, rngs={"dropout": jax.random.PRNGKey(1)})
    return a, b, c, d

  a, b, c, d = run(params)
  assert float(jnp.abs(a - b).max()) > 1e-4
  np.testing.assert_array_equal(c, d)


def test_bad_model_configs_are_refused():
  with pytest.raises(ValueError, match="unknown model.name 'resnet'"):
    models.get_model(unet_cfg(name="resnet"), (8, 8, 1))
  with pytest.raises(ValueError, match="num_groups=3 does not divide"):
    models.get_model(unet_cfg(num_groups=3), (8, 8, 1))
  with pytest.raises(ValueError, match="num_res_blocks_up"):
    models.get_model(unet_cfg(num_res_blocks_down=2, num_res_blocks_up=2), (8, 8, 1))
  with pytest.raises(ValueError, match="dropout"):
    models.get_model(unet_cfg(dropout=1.0), (8, 8, 1))
  with pytest.raises(ValueError, match=r"image_shape must be \(H, W, C\)"):
    models.get_model(unet_cfg(), (8, 8))
  with pytest.raises(ValueError, match="unknown named model config"):
    models.named_config("huge")


# --- eps_fn ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["unet", "mlp"])
def net(request):
  cfg = unet_cfg(ch_mult=(1, 2), attn_resolutions=(4,)) if request.param == "unet" else \
      models.named_config("digits_mlp").copy_and_resolve_references()
  if request.param == "mlp":
    cfg.hidden, cfg.num_layers = 32, 2
  model, params = build(cfg, (8, 8, 1))
  return model, jiggle(params)


def test_eps_fn_is_apply_on_one_image_at_999t(net):
  model, params = net
  sde = sde_lib.VPSDE()
  eps_fn = models.make_eps_fn(model, params, sde)
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 8, 8, 1))
  t = jnp.array([0.001, 0.4, 1.0])
  ref = jax.jit(lambda p: model.apply({"params": p}, x, 999.0 * t))(params)
  call = jax.jit(jax.vmap(lambda f, x, t: f(x, t), in_axes=(None, 0, 0)))
  np.testing.assert_allclose(call(eps_fn, x, t), ref, atol=2e-6)
  same_x = call(eps_fn, jnp.stack([x[0]] * 3), jnp.array([0.2, 0.6, 0.6]))
  assert float(jnp.abs(same_x[0] - same_x[1]).max()) > 1e-4  # depends on t
  np.testing.assert_array_equal(same_x[1], same_x[2])
  with pytest.raises(ValueError, match="scalar t"):
    eps_fn(x[0], t)


def test_eps_fn_jvp_and_linearize_match_the_jacobian(net):
  model, params = net
  eps_fn = models.make_eps_fn(model, params, sde_lib.VPSDE())
  x = jax.random.normal(jax.random.PRNGKey(4), (8, 8, 1))
  v = jax.random.normal(jax.random.PRNGKey(5), (8, 8, 1))
  f = lambda z: eps_fn(z, 0.3)

  @jax.jit
  def all_three(x, v):
    y2, lin = jax.linearize(f, x)
    return jax.jacfwd(f)(x), jax.jvp(f, (x,), (v,)), (y2, lin(v))

  jac, (y, tan), (y2, lin_v) = all_three(x, v)
  jac = jac.reshape(64, 64)
  np.testing.assert_allclose(tan.reshape(-1), jac @ v.reshape(-1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(lin_v, tan, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y2, y, atol=1e-7)
  assert float(jnp.abs(jnp.trace(jac))) > 0  # non-trivial Jacobian


def test_eps_fn_params_are_traced_not_baked_in():
  cfg = models.named_config("digits_mlp")
  cfg.update(dict(hidden=16, num_layers=1))
  model, params = build(cfg, (8, 8, 1))
  traces = []

  @eqx.filter_jit
  def call(f, x, t):
    traces.append(1)
    return f(x, t)

  sde = sde_lib.VPSDE()
  x = jnp.ones((8, 8, 1))
  a = call(models.make_eps_fn(model, jiggle(params), sde), x, 0.5)
  b = call(models.make_eps_fn(model, jiggle(params, 7), sde), x, 0.5)
  assert len(traces) == 1 and float(jnp.abs(a - b).max()) > 1e-4
  leaves = jax.tree.leaves(models.make_eps_fn(model, params, sde))
  assert len(leaves) == len(jax.tree.leaves(params))


def test_eps_fn_float64(net, x64):
  model, params = net
  eps_fn = models.make_eps_fn(model, params, sde_lib.VPSDE())
  x = jax.random.normal(jax.random.PRNGKey(6), (8, 8, 1), jnp.float64)
  jvp = eqx.filter_jit(lambda f, x, t: jax.jvp(lambda z: f(z, t), (x,), (jnp.ones_like(x),)))
  y64, tan64 = jvp(eps_fn, x, jnp.float64(0.25))
  y32, tan32 = jvp(eps_fn, x.astype(jnp.float32), jnp.float32(0.25))
  assert y64.dtype == tan64.dtype == jnp.float64 and y32.dtype == jnp.float32
  np.testing.assert_allclose(y64, y32, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tan64, tan32, rtol=1e-3, atol=1e-4)

"""Why PIAN separates IN from OUT digits backwards on the digits MLP (T1 AUROC ~0.1).

PIA (Kong et al. 2024) injects the network's own prediction at t ~ 0, eps_0 = eps(x0, eps),
as the noise of x_t = a(t) x0 + sigma(t) eps_0 and scores -sum |eps(x_t, t) - eps_0|^4 (higher
= member). PIAN first rescales eps_0 to a standard normal's mean absolute value sqrt(2 / pi).
memvol's sign is PIA's and PIAN's alike (the original ranks both by the same distance), so a
backwards PIAN is not a sign flip. This check prints, for the IN (training) and OUT (held-out)
digits of one model: the mean |eps_0|, PIA, PIAN, and the cosine between what the network
predicts at t and the noise injected, each with its AUROC (IN above OUT).

  python -m experiments.main --config=experiments/configs/digits.py --workdir=runs/pian_digits \\
    --mode=train --config.data.num_duplicated=0 --config.train.num_steps=10000 --config.train.sample_every=0
  python scripts/check_pian.py runs/pian_digits

Measured (2 CPU cores, 64 IN / 64 OUT digits, the digits MLP at 10000 steps, the committed
plan's model and length): mean |eps_0| 0.063 IN vs 1.03 OUT (AUROC 0.000: 16x smaller on the
digits the model fits); PIA AUROC 1.000; PIAN AUROC 0.106 (the plan's 0.107); cosine of the
prediction with the injected noise 0.87 IN vs 0.99 OUT under PIAN. On OUT digits eps_0 already
has unit scale and PIAN is PIA; on IN digits the rescaling multiplies the network's tiny
residual at t ~ 0 by ~13 and injects it as noise, a direction the network does not predict, so
the IN error (a 4th-power sum) grows past the OUT one. The membership signal of
PIA here is the small |eps_0| itself, and PIAN's normalisation removes it by construction:
the score's behaviour on a model that fits its members almost exactly, not a sign error.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import digits
from memvol import data, loading, models, peers, stats
from memvol import sde as sde_lib


def config_of_the_check():
  c = digits.get_config()
  c.unlock()
  c.data.num_duplicated, c.train.num_steps, c.train.sample_every = 0, 10000, 0
  return c


def parts(eps_fn, sde: sde_lib.SDE, t: float, x: jax.Array) -> dict[str, jax.Array]:
  """For one image: mean |eps_0| and, with eps_0 as is (pia) and rescaled (pian), the cosine of
  the prediction at t with the injected noise."""
  e0 = eps_fn(x, jnp.asarray(sde.eps, x.dtype))
  m = jnp.mean(jnp.abs(e0))
  out = {"mean_abs_eps0": m}
  tt = jnp.asarray(t, x.dtype)
  for name, e in (("pia", e0), ("pian", e0 / m * math.sqrt(2.0 / math.pi))):
    back = eps_fn(sde.mean_coeff(tt) * x + sde.std(tt) * e, tt)
    out[f"{name}_cosine"] = jnp.sum(back * e) / (jnp.linalg.norm(back) * jnp.linalg.norm(e))
  return out


def main(workdir: str) -> int:
  c = config_of_the_check()
  split = data.load_split(c, workdir)
  model, params, _ = loading.load_model(c, workdir, use_ema=bool(c.sample.use_ema))
  sde = sde_lib.from_config(c.sde)
  eps_fn = models.make_eps_fn(model, params, sde)
  t = float(peers.PeerOptions.from_config(c, "pia").t)
  rows = {}
  for group, images in (("IN", split.train.images), ("OUT", split.heldout.images)):
    v = {k: np.asarray(a) for k, a in jax.jit(jax.vmap(lambda x: parts(eps_fn, sde, t, x)))(jnp.asarray(images)).items()}
    for name in ("pia", "pian"):
      v[name] = peers.run(eps_fn, images, peers.PeerOptions.from_config(c, name, sde=sde))[0]
    rows[group] = v
  for k in rows["IN"]:
    a, b = rows["IN"][k], rows["OUT"][k]
    print(f"{k:15s} IN median {np.median(a):.4g}  OUT median {np.median(b):.4g}  AUROC (IN above OUT) "
          f"{stats.auroc(a, b):.3f}")
  return 0


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  sys.exit(main(sys.argv[1]))

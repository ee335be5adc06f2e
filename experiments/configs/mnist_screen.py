"""Screen the default job's MNIST digits before training: which will a model copy? (memvol/screen/)

Purpose: a memorisation risk for every digit of the main job (experiments/configs/mnist.py: its
96 training and 96 held-out digits at 14x14), before any model is trained on them, and the
reference models that calibrate the job's scores afterwards. K = 8 reference models of the
job's UNet, each trained (3000 steps, the job's length) on a class-balanced random half of the
192 digits in complementary pairs, score every digit with the job's estimators and peers;
per digit the mean and sd over the 4 models that never saw it. Risk = minus the OUT mean of
peer_loss (screen.* in the base config: the digits benchmark's T5 under the ratio copy label).
Beside it the data-only predictors (pixel and classifier-feature nearest-neighbour distance,
PNG size) with their Spearman against the risk.

Commands (from the repo root): the screen as one single-threaded process per core on one
workdir (each reference model claimed by its lock; its record goes to docs/results/mnist_screen/,
where the committed records make a rerun train nothing), then the main job calibrated against it

  for k in 0 1; do XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c $k \
    python -m experiments.main --config=experiments/configs/mnist_screen.py --workdir=runs/mnist_screen \
    --mode=screen --config.screen.shard=$k/2 --config.screen.records_dir=docs/results/mnist_screen & done; wait
  python -m experiments.main --config=experiments/configs/mnist.py --workdir=runs/mnist \
      --config.score.reference=runs/mnist_screen

Outputs: runs/mnist_screen/screen/{risk.csv, contact.png, histogram.png, report.md}; the job's
scores.csv gains lira_off_ / lira_on_ columns and its report their rows.

Runtime on 2 CPU cores (Intel Xeon), one single-threaded process per core: 72.6 min for the 8
reference models (part of it beside a test run): per model train 944 ± 150 s, score 140 ± 27 s
(790-830 s and 113-160 s on a quiet core); the outputs 8 s with the quality classifier cached.
Result (docs/results/mnist_screen/ holds the 8 records): the riskiest digits are wide, heavy
0s, 2s, 3s and 6s, the safest plain 1s and 7s; the risk agrees with the pixel distance to the
nearest other digit at Spearman +0.80 and with PNG size at +0.65 (README, "Screen a dataset").

`:quick` (--config=experiments/configs/mnist_screen.py:quick, the screen of mnist.py:quick's 64
digits; pair it with --config=experiments/configs/mnist.py:quick): 4 reference models of 300
steps, no classifier features; a few minutes on 2 CPU cores; numbers need only exist and be finite.
"""

from experiments.configs import mnist


def get_config(arg: str | None = None):
  c = mnist.get_config(arg)
  if arg == "quick":
    c.screen.num_models = 4
    c.screen.features = False
  return c

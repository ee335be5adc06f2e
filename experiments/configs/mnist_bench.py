"""The benchmark on images: which MNIST digits will the default job's UNet copy? (memvol/bench/)

Purpose: the digits benchmark (an MLP on 64 pixels, membership saturated, 75 % of IN digits
copied) asks which training images an unconditional diffusion model copies in one odd regime.
This plan asks it where the paper and the default job live: MNIST at 14x14 and the default
job's ~0.37M-parameter UNet (experiments/configs/mnist.py), M models each trained on a
class-balanced random half of a pool of distinct digits (complementary pairs), so every digit is
IN for half of the models and OUT for the rest.

Three co-primary tests, fixed before any run (memvol/bench/analysis.py PRIMARIES), on the ratio
copy label, Holm over the three at family alpha 0.01, each with a 95 % interval:
  P1 (replication) T2 AUROC of hutchinson@rank32 minus peer_loss, per model, the mean over
     models; paired t over models, crossed models x images bootstrap interval;
  P2 (the paper's claim, counterfactually) T3 Spearman of raw hutchinson@rank32 (mean over an
     image's IN models) with p_i against 0; image-bootstrap interval, permutation p;
  P3 (does calibration find the copies) T2 AUROC of lira_off_hutchinson@rank32 minus raw
     hutchinson@rank32; paired t over models, crossed interval.
A verdict per test (positive, negative, inconclusive) and the sign of each under the absolute
and closest-sample labels. Everything else is secondary, one Benjamini-Hochberg family.

Command (from the repo root; two single-threaded shards on a 2-core machine, over as many
sittings as it takes: rerunning resumes, and records already under records_dir count as done):

  for k in 0 1; do XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
    taskset -c $k python -m experiments.main --config=experiments/configs/mnist_bench.py \\
      --workdir=runs/mnist_bench --mode=bench --config.bench.shard=$k/2 \\
      --config.bench.records_dir=docs/results/mnist_bench & done; wait

then gather and render (any time; the block says how many models are done):

  python -m experiments.main --config=experiments/configs/mnist_bench.py --workdir=runs/mnist_bench \\
    --mode=bench --config.bench.run_models=False --config.bench.records_dir=docs/results/mnist_bench
  python scripts/render_results.py --bench=runs/mnist_bench --name=mnist_bench --write \\
    --region="<!-- mnist_bench -->" "<!-- /mnist_bench -->"     (the first time; later without --region)

Plan: pilots at pool sizes 128 and 256 (one model each, trained to 8000 steps, bench.max_samples
= 2048 samples searched at 2000 ... 8000 steps) choose N and the training length: the largest N
with a share of IN digits copied in [0.2, 0.6] at the sample count the sizing gives that cell
(an image copied at the median rate among copied ones expected 5 times among at least 1024, at
most 2048 samples), at its smallest such length. Then M = 32 models (64 would take ~12 h of
the two cores, below), each scoring all N pool digits with
hutchinson@rank8, @rank32, @vol108 (log volume and L_capped) and the seven peers (logp from
rank8's solve), raw and LiRA-calibrated; the adaptive hutchinson reference is left out (~7 s per
digit on these cores, half an hour per model at N = 256). Records keep each sample's two nearest
pool digits and distances, so the absolute and closest-sample labels come from them.
Sampler: the default job's, SDE-DPM-Solver++ 2M at 50 network calls per sample (mnist.py;
validated against the 1000-step reverse SDE on copies in BUILD.md, "Sampling").

Runtime, measured on 2 CPU cores (Intel Xeon) as the two single-threaded shards above: the two
pilots in parallel 43 min (8000 steps in 1911 s, then 1024 samples searched at each of the four
grid steps in ~100 s each); then one model every ~21 min per core (model 0: train 985 s, 2048
SDE-DPM-Solver++ samples at 50 NFE 107 s, scoring all 256 digits 216 s, compile 67 s once per
process): ~11 process-hours for M = 32, ~6 h of the two cores, about three sittings with the
pilots.
The pilot chose N = 256 at 4000 steps (54 % of the pilot model's IN digits copied at the 2048
samples the sizing gives it); N = 128 copies 98 % by 4000 steps, out of the band.
Result: partial; README "The MNIST plan" gives the records in so far and reads P1-P3 only at
the planned M = 32 (an interim block says so).

`:quick` (a CI check, scripts/check_bench.py; numbers need only exist and be finite): pilots at
pool sizes 16 and 32 (400 / 600 steps of the 16-channel quick UNet, 128 samples), 8 models,
hutchinson@rank32 and the peers loss and pia. Measured: 17 min on 2 CPU cores shared with
other jobs (pilots 6 min, then 71 +- 26 s per model); scripts/check_bench.py passes.
"""

from experiments.configs import mnist
from experiments.configs.base import shrink_bench


def get_config(arg: str | None = None):
  c = mnist.get_config("quick" if arg == "quick" else None)
  c.data.num_duplicated = 0
  c.train.sample_every = 0
  c.train.ckpt_every = 2000

  c.sample.num_samples = 1024
  c.sample.batch_size = 256
  c.score.estimators = ("hutchinson@rank8", "hutchinson@rank32", "hutchinson@vol108")
  c.score.batch_size = 64
  c.score.agreement_subset = 0

  b = c.bench
  b.num_models = 32
  b.pilot_pool_sizes = (128, 256)
  b.pilot_steps = (2000, 4000, 6000, 8000)
  b.max_samples = 2048

  if arg == "quick":
    shrink_bench(c, pool_sizes=(16, 32), steps=(400, 600), num_models=8, num_samples=128)
    c.score.batch_size = 32
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c

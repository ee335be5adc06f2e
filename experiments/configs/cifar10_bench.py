"""The benchmark in DiffMemorize's regime: which CIFAR-10 images will a DDPM++-sized UNet copy?

Purpose: the same design as experiments/configs/mnist_bench.py (M models on complementary
class-balanced halves of a pool, the three co-primary tests P1-P3 fixed in
memvol/bench/analysis.py, three copy labels, data-only predictors) where Gu et al. /
sail-sg/DiffMemorize find memorisation in CIFAR-10: a DDPM++-sized network trained with VP noise
on small subsets (a few thousand images) for long enough that it copies them. memvol trains its
own UNet (models.MODELS: unet, mlp), so the network is memvol's UNet at DDPM++'s widths
(128 channels x [2, 2, 2], 4 blocks per level, attention at 16x16, dropout 0.13: 53.6M
parameters against SongUNet DDPM++'s 55.7M; NVlabs' SongUNet itself is a scoring-only import,
experiments/configs/edm_cifar10.py), VP-SDE with t from 1e-5 as EDM's VP networks, EDM's Heun
sampler (18 steps, 35 network calls) as DiffMemorize counts copies.

Command (a GPU per shard; cifar-10-batches-py is the folder of CIFAR-10's python pickles):

  python -m experiments.main --config=experiments/configs/cifar10_bench.py --workdir=runs/cifar10_bench \\
    --mode=bench --config.data.path=/path/to/cifar-10-batches-py --config.bench.shard=$k/$n \\
    --config.bench.records_dir=docs/results/cifar10_bench

Plan: pilots at pool sizes 1000 and 2000 (models on 500 / 1000 images), trained to 40k steps at
batch 128 with checkpoints at 10k, 20k, 40k; 1024 to 4096 Heun samples per model; M = 32;
hutchinson@rank8 / @rank32 / @vol108 and the seven peers on every pool image.

GPU cost, estimated from FLOPs (not measured: no GPU on this project's machine): DDPM++ at 32x32
is ~40 GFLOPs per forward (XLA's cost analysis, edm_cifar10.py), a training step ~3 forwards per
image, so ~15 TFLOPs per step at batch 128; an H100 sustaining 25-100 TFLOP/s (float32 "highest"
down to TF32 / bf16 matmuls) takes ~0.15-0.6 s per step: 40k steps is 2-7 h per model. 4096 Heun
samples (35 passes) are ~6 PFLOPs (1-4 min); scoring 2000 images with the presets and peers
(~330 forward-equivalent passes each, JVPs counted twice) ~26 PFLOPs (5-20 min). So ~2.5-7.5
H100-hours per model, ~80-240 H100-hours for M = 32 plus ~10-25 for the pilots: a cluster job
(one shard per GPU: --config.bench.shard=k/n), not a CPU one.
Result: not run.

`:quick` (CPU, minutes; numbers need only exist and be finite): 16x16 images through the CIFAR-10
loader (data.path still required; tests make a small stand-in folder), a 16-channel UNet, pilots
at pool sizes 8 and 16 (100 / 200 steps), 4 models, 64 Heun samples at 4 steps, rank32 and the
peers loss and pia. Measured: 7 min on 2 CPU cores shared with other jobs, on a stand-in of 60
random images (tests/test_edm_cifar10.py's standin); its models copy nothing, so the co-primary
tests say "no test", and scripts/check_bench.py passes.
"""

from experiments.configs.base import get_base_config, shrink_bench, shrink_training


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.name = "cifar10"
  c.data.path = ""  # required: --config.data.path=/path/to/cifar-10-batches-py
  c.data.resolution = 32
  c.data.num_duplicated = 0
  c.sde.eps = 1e-5  # EDM's VP networks train and sample from t = 1e-5 (edm_cifar10.py)

  m = c.model
  m.name = "unet"
  m.ch = 128
  m.ch_mult = (2, 2, 2)
  m.num_res_blocks_down = 4
  m.num_res_blocks_up = 5
  m.attn_resolutions = (16,)
  m.dropout = 0.13
  m.num_groups = 32

  t = c.train
  t.batch_size = 128
  t.lr = 2e-4
  t.warmup_steps = 1000
  t.ema_decay = 0.9999
  t.ckpt_every = 10000
  t.sample_every = 0

  c.sample.methods = ("heun",)
  c.detect.sample_method = "heun"
  c.sample.num_samples = 1024
  c.sample.batch_size = 256
  c.score.estimators = ("hutchinson@rank8", "hutchinson@rank32", "hutchinson@vol108")
  c.score.batch_size = 64
  c.score.agreement_subset = 0

  b = c.bench
  b.num_models = 32
  b.pilot_pool_sizes = (1000, 2000)
  b.pilot_steps = (10000, 20000, 40000)
  b.max_samples = 4096

  if arg == "quick":
    c.data.resolution = 16
    shrink_training(c)
    m.ch_mult = (1, 2)
    m.num_res_blocks_down = 1
    m.num_res_blocks_up = 2
    m.attn_resolutions = ()
    m.dropout = 0.0
    shrink_bench(c, pool_sizes=(8, 16), steps=(100, 200), num_models=4, num_samples=64)
    c.sample.heun_steps = 4
    c.score.batch_size = 16
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c

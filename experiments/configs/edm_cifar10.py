"""Score an NVlabs/edm network on its CIFAR-10 training images: EDM's own checkpoints and
the networks sail-sg/DiffMemorize trains to find where memorisation starts.

The networks: SongUNet as DDPM++ (--arch=ddpmpp: 55.7M parameters at CIFAR-10's 32x32, 128
channels x [2, 2, 2], 4 blocks per level, attention at 16x16) or NCSN++ (--arch=ncsnpp,
56.4M), under VPPrecond, VEPrecond or EDMPrecond (memvol/models/song_unet.py). DiffMemorize
trains mostly DDPM++ with VP preconditioning on CIFAR-10 subsets; EDM's published
unconditional CIFAR-10 pickles are DDPM++ / NCSN++ with EDMPrecond. Convert the pickle first
(torch and an NVlabs/edm checkout in a separate venv; the pickle runs code when opened, so
convert only files you trust; memvol itself never opens a pickle):

  python scripts/convert_torch_checkpoint.py network-snapshot-200000.pkl /path/to/edm_folder \\
      --format=edm --edm_repo=/path/to/NVlabs/edm [--weights=ema]

(a DiffMemorize / EDM training-state-*.pt: --weights=net). Command (from the repo root;
cifar-10-batches-py is the folder of CIFAR-10's python pickles):

  python -m experiments.main --config=experiments/configs/edm_cifar10.py \\
      --workdir=runs/edm_cifar10 --config.model.pretrained=/path/to/edm_folder \\
      --config.data.path=/path/to/cifar-10-batches-py

for a VP-preconditioned network (DiffMemorize's --precond=vp: memvol's VP-SDE beta 0.1 .. 20
is EDM's VP schedule exactly, and the network sees 999 t; t from 1e-5, EDM's epsilon_t). A VEPrecond or EDMPrecond network
takes x = x0 + sigma z: use `:ve` (VE-SDE over sigma 0.002 .. 80, log sigma uniform in t);
the loader refuses the wrong SDE, naming the flags. This config draws 1000 training images
class-balanced from all 50000 and 1000 held-out images from test_batch; a network trained on
a subset (DiffMemorize's growing training sets) should be scored on that subset, given as
data (data.name = npz or folder) with held-out images it never saw.

Chain: 1000 samples with EDM's deterministic Heun sampler (18 steps, rho 7, 35 network calls;
`heun`, as DiffMemorize counts copies), copy detection (nearest-neighbour ratio < 1/3 among the
1000 training images drawn), Hutchinson log volume growth (1 Rademacher probe, tsit5 at rtol =
atol 1e-3) with every peer, report.

Expected runtime. Not measured on a GPU (no GPU on this project's machine) nor on a trained
checkpoint. CPU, measured on 2 cores shared with another job (load ~6) with the random-init
CIFAR-10 DDPM++ (55,732,739 params, 40.3 GFLOPs per forward by XLA's cost analysis): 0.84 s
per forward and 1.64 s per forward + JVP, per image. So 1000 Heun samples (35 forwards each)
take ~8 h and the 2000 scores at ~100 forward + JVP passes each (the adaptive count on a
trained network is not measured) ~90 h: not a CPU job. GPU, estimated from the FLOPs only: an
H100 at 20-30 TFLOP/s sustained in float32 (precision "highest") does a forward in ~1.5-2 ms,
so ~1 min for the samples and ~10-15 min for the 2000 scores, plus the peers' ~37 passes per
image.
Expected result: EDM's CIFAR-10 networks trained on all 50000 images generalise (few or no
copies, trained and held-out scores close, AUROC near 0.5); DiffMemorize's networks trained
on small subsets memorise a large share of them (Gu et al.): many copies among the Heun
samples, where the measure should separate trained from held-out images (AUROC above 0.5).

`:quick` is the same chain on CPU in CI time (4 min on 2 loaded cores: sample 17 s, score
194 s, mostly compiling four estimators and seven peers, detect 2 s, report 15 s): the committed
random-weight DDPM++ under VPPrecond that the converter made from NVlabs' own pickle
(tests/fixtures/edm_ddpmpp, 16x16x3) and a synthetic stand-in for CIFAR-10 in its
python-pickle format pooled to 16x16, with every estimator (hutchinson, exact, subspace,
paper) and every peer: tests/test_edm_cifar10.py makes the stand-in and runs it.
"""

from experiments.configs.base import get_base_config


def get_config(arg: str | None = None):
  c = get_base_config()
  c.model.pretrained = ""  # required: --config.model.pretrained=/path/to/converted/edm_folder

  c.data.name = "cifar10"
  c.data.path = ""  # required: --config.data.path=/path/to/cifar-10-batches-py
  c.data.resolution = 32
  c.data.num_train = 1000
  c.data.num_heldout = 1000
  c.data.heldout_name = "cifar10_test"
  c.data.num_duplicated = 0
  # EDM's VP networks are trained on t in [1e-5, 1] (VPPrecond's epsilon_t) and its sampler
  # stops at max(0.002, sigma(1e-5) = 0.001): the same here (memvol's eps = 1e-3 would stop
  # Heun at sigma / a = 0.0105)
  c.sde.eps = 1e-5

  c.sample.methods = ("heun",)
  c.sample.num_samples = 1000
  c.sample.batch_size = 250
  c.detect.sample_method = "heun"
  c.score.estimators = ("hutchinson",)
  c.score.num_probes = 1
  c.score.rtol = 1e-3
  c.score.atol = 1e-3
  c.score.batch_size = 50

  if arg == "ve":  # VEPrecond / EDMPrecond networks: x = x0 + sigma z, sigma 0.002 .. 80
    c.sde.name = "ve"
    c.sde.sigma_min = 0.002
    c.sde.sigma_max = 80.0
    c.sde.eps = 0.0
  elif arg == "quick":
    c.data.resolution = 16
    c.data.heldout_name = ""
    c.data.num_train = 4
    c.data.num_heldout = 4
    c.sample.num_samples = 4
    c.sample.heun_steps = 4
    c.sample.batch_size = 4
    c.score.estimators = ("hutchinson", "exact", "subspace", "paper")
    c.score.K = 4
    c.score.paper_steps = 4
    c.score.adaptive = False
    c.score.solver = "euler"
    c.score.num_steps = 2
    c.score.profile_times = 2
    c.score.batch_size = 4
    c.detect.carlini_n = 2
    c.report.top_k = 2
    c.report.num_bootstrap = 50
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '', 've' or 'quick'")
  return c

"""Shared defaults for every experiment config. Not an experiment itself.

Each experiment file (`mnist.py`, `digits.py`, ...) calls `get_base_config()` and
overrides what differs. Sections: data, model, sde, train, sample, score, detect, report.
Owners of a section add fields to it here, with a one-line comment each.
"""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compilation_cache_dir = ""  # JAX persistent compilation cache folder ("" = off; diffrax solves need EQX_ON_ERROR=nan, BUILD.md)

  # --- data (memvol/data.py) ---------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.name = "mnist"            # mnist | digits | lfw | gaussian | mixture | npz | folder | cifar10
  d.path = ""                 # npz file / image folder / cifar-10-batches-py folder
  d.resolution = 14           # output side (average pooling by an integer factor, else resize; 0 = native)
  d.classes = ()              # class subset; () = all
  d.num_train = 96            # distinct training images
  d.num_heldout = 96          # held-out images, disjoint from training
  d.num_duplicated = 8        # how many training images are planted duplicates
  d.duplicate_factor = 8      # each planted duplicate appears this many times in training
  d.random_flip = False       # random horizontal flip during training
  d.split_seed = 0            # seed of the train/held-out split and of the duplicate choice
  d.balanced = True           # class-balanced train and held-out draws when the source has labels
  d.channels = 0              # folder: 1 grey, 3 RGB, 0 = RGB as soon as one image has colour
  d.pool_size = 2000          # gaussian / mixture: images generated
  d.synthetic_std = 0.1       # gaussian / mixture: per-pixel std (images clipped to [-1, 1])
  d.num_components = 4        # mixture: Gaussian components (means uniform in [-0.5, 0.5])
  d.pool_seed = 0             # gaussian / mixture: seed of the generated pool
  d.heldout_name = ""         # second source of the held-out images (a name above or cifar10_test); "" = same pool
  d.heldout_path = ""         # its npz / folder / cifar-10-batches-py path ("" = data.path)
  d.member_split_path = ""    # npz of mia_train_idxs / mia_eval_idxs (PIA, SecMI): members train, non-members held out
  d.dup_strata = ()           # ((d, n), ...): n distinct training images each d times in the stream
  #                             (num_train = sum n, num_duplicated 0); () = num_duplicated / duplicate_factor
  # A mitigation arm's edits of the training stream (memvol/mitigate/ sets them per arm;
  # memvol/train.py applies them); empty = the stream as the split gives it.
  d.drop_ids = ()             # training ids left out of the stream (they stay in the split)
  d.augment_ids = ()          # training ids given stronger augmentation (augment_shift, augment_noise)
  d.augment_shift = 2         # shift of the stronger augmentation, uniform in [-shift, shift] pixels
  d.augment_noise = 0.05      # std of its pixel noise
  d.replace_path = ""         # npz of ids [k] and images [k, H, W, C] shown in place of those images
  d.replace_sha256 = ""       # the sha256 that file must have

  # --- model (memvol/models) ---------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.name = "unet"             # unet | mlp
  m.ch = 24                   # base channels (models.named_config("small_unet"): 0.367M params)
  m.ch_mult = (1, 2)          # channel multiplier per resolution level
  m.num_res_blocks_down = 1   # residual blocks per level on the way down
  m.num_res_blocks_up = 2     # residual blocks per level on the way up (>= down + 1)
  m.attn_resolutions = ()     # resolutions (side length) with self-attention (the middle always has one)
  m.dropout = 0.0
  m.num_groups = 8            # GroupNorm groups
  m.hidden = 256              # mlp: hidden width
  m.num_layers = 3            # mlp: hidden layers
  m.pretrained = ""           # a diffusers UNet2DModel or EDM SongUNet folder (memvol/pretrained.py): no training, fields above unused

  # --- sde (memvol/sde.py) -----------------------------------------------------------
  c.sde = s = ml_collections.ConfigDict()
  s.name = "vp"               # vp | subvp | ve
  s.beta_min = 0.1
  s.beta_max = 20.0
  s.T = 1.0
  s.eps = 1e-3

  # --- train (memvol/train.py) -------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 8000          # total updates (a resumed run continues up to this)
  t.batch_size = 64           # global batch, split over all devices (must divide by their count)
  t.lr = 2e-4                 # Adam peak learning rate
  t.warmup_steps = 200        # linear warm-up: lr * min((k + 1) / warmup_steps, 1) at update k
  t.adam_b1 = 0.9
  t.adam_b2 = 0.999
  t.adam_eps = 1e-8
  t.grad_clip = 1.0           # global-norm gradient clipping (0 = off)
  t.ema_decay = 0.999         # EMA of params, decay min(ema_decay, (1 + k) / (10 + k))
  t.log_every = 100           # steps between log.csv rows and finite-ness checks
  t.ckpt_every = 1000         # steps between orbax checkpoints (and at the last step)
  t.keep_checkpoints = 2      # keep the last N checkpoints
  t.keep_every = 0            # also keep every checkpoint whose step divides by this (0 = none)
  t.sample_every = 2000       # PNG grid of EMA samples every N steps (0 = never)
  t.sample_num = 36           # images in each training sample grid
  t.sample_steps = 250        # reverse-SDE steps for the training sample grids
  t.steps_per_call = 50       # updates per compiled call (lax loop on the device); calls stop at log/ckpt/sample steps
  t.fused_steps = "auto"      # a call as one compiled loop: auto (not on CPU, where XLA runs conv gradients in loops 20x+ slower) | true | false
  t.precision = "default"     # matmul/conv precision of the updates: highest | high | default (TF32 on GPUs)

  # --- sample (memvol/sampling.py) ---------------------------------------------------
  c.sample = sp = ml_collections.ConfigDict()
  sp.num_samples = 512
  sp.methods = ("sde",)       # any of: ode (PF ODE, diffrax), sde (reverse Euler-Maruyama), heun (EDM's sampler), dpm (DPM-Solver++)
  sp.sde_steps = 1000
  sp.denoise = True           # sde: last step returns its mean (no noise); False = the paper's code
  sp.ode_solver = "tsit5"     # euler | heun | midpoint | bosh3 | tsit5 | dopri5 | dopri8
  sp.ode_rtol = 1e-4
  sp.ode_atol = 1e-4
  sp.ode_max_steps = 4096     # ode: a solve needing more steps is an error
  sp.heun_steps = 18          # heun: EDM's deterministic sampler, 2 N - 1 network calls
  sp.heun_rho = 7.0           # heun: noise levels (s_max^(1/rho) .. s_min^(1/rho))^rho
  sp.heun_sigma_min = 0.002   # heun: clipped to the SDE's sigma / a at eps and T
  sp.heun_sigma_max = 80.0
  sp.dpm_steps = 25           # dpm: multistep DPM-Solver++ steps, one network call each
  sp.dpm_order = 2            # dpm: 2 (2M) or 3 (3M); 1 is DDIM
  sp.dpm_schedule = "logsnr"  # dpm: logsnr | time_uniform | time_quadratic | karras (sampling.dpm_times)
  sp.dpm_stochastic = False   # dpm: SDE-DPM-Solver++ (the reverse SDE, orders 1-2) instead of the PF ODE
  sp.batch_size = 256         # samples per device call (and per committed part file)
  sp.use_ema = True
  sp.precision = "highest"    # matmul/conv precision of the network: highest | high | default (BUILD.md)

  # --- score (memvol/scoring.py, memvol/volume.py) -----------------------------------
  c.score = sc = ml_collections.ConfigDict()
  sc.estimators = ("hutchinson",)  # any of: exact, hutchinson, subspace, paper, hutchinson@<preset> (volume.PRESETS)
  sc.batch_size = 64
  sc.solver = "tsit5"
  sc.adaptive = True
  sc.rtol = 1e-4
  sc.atol = 1e-4
  sc.num_steps = 100          # fixed-step solves
  sc.num_probes = 4           # hutchinson probes
  sc.probe = "rademacher"     # rademacher | gaussian
  sc.variance_reduction = ""  # "" | hutch++ (Hutch++ with an identity shift; 3x the JVPs)
  sc.K = 100                  # subspace / paper frame size
  sc.radius = 0.05            # paper: neighbour radius
  sc.paper_steps = 1000       # paper: Euler steps
  # int or tuple: the L(t) profile: n times geometric in sigma from eps to T
  # (volume.profile_times), or a tuple of times; 0 = none
  sc.profile_times = config_dict.FieldReference(16, field_type=object)
  sc.time_grid = "blend"      # fixed-step grid: blend (half uniform in t, half in log sigma) | log_sigma
  sc.control_variate = False  # exact / hutchinson: integrate tr J - D / sigma, add the bound in closed form
  sc.richardson = False       # fixed steps: also solve on half the steps, cancel the h^p error term (2x cost)
  sc.chunk_size = 64          # vectors per vmapped JVP chunk (exact basis, probes, frame, paper points)
  sc.max_steps = 4096         # solver step budget per image (status 1 when exhausted)
  sc.use_ema = True
  sc.precision = "highest"    # matmul/conv precision of every estimator: highest | high | default (BUILD.md)
  # peer scores (memvol/peers.py); logp = ODE likelihood of the first full-trace estimator
  sc.peers = ("loss", "secmi", "pia", "pian", "sima", "flipd", "logp")
  sc.peer = pr = ml_collections.ConfigDict()  # peer settings: the originals' values (DDPM index n -> t = n / 1000), fixed in advance
  pr.loss_t = 0.1             # loss: t (step 100; Carlini et al. 2023 / Matsumoto et al. 2023 find small t ~ 100 of 1000 best)
  pr.loss_num_noise = 4       # loss: noise draws averaged per image
  pr.secmi_t = 0.1            # secmi: t_sec (Duan et al. 2023: t_sec = 100)
  pr.secmi_interval = 0.01    # secmi: DDIM step k (Duan et al. 2023: k = 10)
  pr.pia_t = 0.2              # pia / pian: t (Kong et al. 2024: t = 200 of 1000 for DDPM; their script prints a scan of t)
  pr.sima_t = 0.01            # sima: t (step 10: the small-t regime of Rao et al. 2025; their script scans 0..200)
  # flipd: t0 (Kamkari et al. 2024: a small fixed t0 on images, 0.05 here; their code's
  # default 1e-4 is below memvol's eps)
  pr.flipd_t = 0.05
  pr.p = 4.0                  # pia / pian / sima: exponent of the error sum (their code: l4, sum |.|^4)
  pr.flipd_trace = "auto"     # flipd: auto | exact | hutchinson (auto: exact when D <= flipd_exact_max_dim)
  pr.flipd_exact_max_dim = 1024  # flipd auto: largest D traced exactly (D JVPs)
  pr.flipd_num_probes = 16    # flipd: Hutchinson probes when not exact
  sc.agreement_subset = 0     # first n training images also scored by agreement_estimators (0 = off).
  #   Off unless a config asks (mnist: 8): 32 images with exact, subspace and paper at 1000 steps
  #   cost hours on 2 CPU cores at D = 196, and far more at CIFAR size (BUILD.md, paper-scale cost).
  sc.agreement_estimators = ("exact", "subspace", "paper")  # estimators compared with the primary on the subset (K = score.K, capped at D)
  sc.agreement_paper_steps = 1000  # paper: Euler steps on the agreement subset (the authors': 1000)
  sc.reference = ""           # a screen's workdir (--mode=screen): scores.csv adds LiRA-calibrated columns (lira_off_, lira_on_)

  # --- detect (memvol/detect.py) -----------------------------------------------------
  c.detect = dt = ml_collections.ConfigDict()
  dt.sample_method = "sde"    # which samples are searched for copies
  dt.ratio_threshold = 1.0 / 3.0
  dt.carlini_delta = 1.0 / 3.0  # Carlini et al.: copy when l2(NN1) / (alpha * mean l2 to the n nearest) < delta
  dt.carlini_n = 50           # Carlini et al.: n nearest training images (capped at num_train)
  dt.carlini_alpha = 0.5      # Carlini et al.: alpha
  dt.chunk_size = 256         # samples per jitted search step
  dt.train_chunk_size = 2048  # training images per block of the running top-k scan
  dt.max_pairs_shown = 32     # copied sample / training image pairs in detect/copies.png

  # --- report (memvol/report.py) -----------------------------------------------------
  c.report = r = ml_collections.ConfigDict()
  r.top_k = 8                 # top-k and bottom-k training images shown by score
  r.num_bootstrap = 1000      # bootstrap resamples of the AUROC interval
  r.bootstrap_seed = 0
  r.fpr = 0.01                # TPR is read off the ROC curve at this FPR
  r.alternative = "two-sided"  # two-sided | greater | less (pos vs neg) for Welch and Mann-Whitney

  # --- mitigate (memvol/mitigate/, quality.py, perturb.py; --mode=mitigate only) -----
  c.mitigate = mt = ml_collections.ConfigDict()
  mt.regimes = ("default",)   # regimes: this config + the regime's overrides (none: the workdir is its baseline)
  mt.overrides = ()           # "regime:section.field=value" (a literal); such a regime's baseline gets a sub-workdir
  mt.arms = ("default:none", "default:score:drop:0.1", "default:random:drop:0.1")  # run in this order: regime:none | regime:selection:modification:q
  mt.seeds = (1, 2, 3)        # config.seed of every arm (training, sampling): one arm per seed
  mt.score_column = ""        # scores.csv column ranked by `score` selection ("" = <first estimator>_log_volume)
  mt.risk_reference = ""      # a --mode=screen workdir of this data: its risk.csv ranks the `risk` selection
  mt.adopt = ""               # arm records (a summary.json, docs/results/<name>.records.json or a records folder) whose arms count as done here
  mt.shard = ""               # "k/n": this process runs the arms i (plan order) with i mod n = k ("" = all); one workdir per shard
  mt.records_dir = ""         # a folder every finished arm's record (and each baseline's) is copied to, and adopted from
  mt.on_nonfinite = "refuse"  # a non-finite selection score (failed solve): refuse (name the images) | last (rank last, report)
  mt.num_samples = 0          # samples per arm (0 = sample.num_samples; the `none` arms are then the reference)
  mt.sde_steps = 0            # reverse-SDE steps per arm sample (0 = sample.sde_steps)
  mt.augment_shift = 2        # augment: random shift of up to this many pixels per axis (edges repeated)
  mt.augment_noise = 0.05     # augment: std of added pixel noise, [-1, 1] units
  mt.perturb_budget = 8 / 255  # perturb: L-inf budget as a fraction of the intensity range (x2 in [-1, 1] units)
  mt.perturb_steps = 10       # perturb: PGD sign steps
  mt.perturb_step_size = 0.0  # perturb: PGD step as a fraction of the range (0 = 2.5 budget / steps)
  mt.perturb_probes = 2       # perturb: Hutchinson probes of the differentiated L
  mt.perturb_solver = "heun"  # perturb: fixed-step solver of the differentiated L
  mt.perturb_solve_steps = 16  # perturb: its steps
  mt.perturb_batch_size = 16  # perturb: images per compiled PGD batch
  mt.classifier_steps = 1000  # quality: Adam steps of the feature classifier
  mt.classifier_batch = 128   # quality: its batch size
  mt.classifier_seed = 0      # quality: its seed
  mt.classifier_width = 32    # quality: base channels; features = the 2x-width penultimate layer
  mt.knn_k = 3                # quality: k of the k-NN precision / recall balls

  # --- bench (memvol/bench/; --mode=bench only) -------------------------------------
  c.bench = b = ml_collections.ConfigDict()
  b.num_models = 64           # M models, each on a random half of the pool (even: complementary pairs)
  b.pilot_pool_sizes = (64, 128)  # candidate pool sizes N; the pilot picks one from copy counts
  b.pilot_steps = (2500, 5000, 10000, 15000, 20000)  # candidate train.num_steps, checkpoints of one pilot run per N
  b.copied_band = (0.2, 0.6)  # wanted share of a model's IN images copied at least once
  b.expected_copies = 5.0     # samples per model: an image copied at the pilot's median rate is expected this often
  b.max_samples = 4096        # ... at most this many samples per model
  b.shard = ""                # "k/n": this process runs the models m with m mod n = k ("" = all)
  b.records_dir = ""          # where finished models' records go ("" = workdir/bench/records)
  b.run_models = True         # False: run nothing, only summarise the records present (gather)
  b.num_bootstrap = 2000      # resamples of the crossed bootstrap and the Spearman differences

  # --- screen (memvol/screen/; --mode=screen only) -----------------------------------
  # Memorisation risk of every image of the job's split before training. The score and direction
  # of the model risk come from the digits benchmark's T5 (64 models, the ratio copy label):
  # averaged over the models that never saw a digit, peer_loss correlates with its copy
  # propensity at Spearman -0.571 (volume -0.55, flipd -0.576 at 16x the passes): atypical
  # digits (low score) are the copied ones. Under an absolute-distance copy label the sign
  # flips (nn1_pixel: +0.75 ratio, -0.76 absolute), so the label is named beside the risk.
  c.screen = sn = ml_collections.ConfigDict()
  sn.num_models = 8           # K reference models on complementary random halves (even, >= 4: 2 OUT models per image)
  sn.train_steps = 0          # train.num_steps of each reference model (0 = train.num_steps)
  sn.risk = "model"           # model: the reference models' OUT scores | data: a data-only predictor (no models, seconds)
  sn.risk_score = "peer_loss"  # model risk: the raw score whose OUT-model mean ranks the images
  sn.risk_direction = "lower"  # model risk: lower (a lower OUT mean is riskier) | higher
  sn.data_predictor = "nn1_pixel"  # data risk: a key of memvol.predictors.data_only_predictors
  sn.data_direction = "higher"  # data risk: higher (farther from the nearest other image is riskier) | lower
  sn.copy_label = "ratio"     # the copy definition the directions above were read under (said in every output)
  sn.basis = "digits benchmark T5 (64 models on random halves), ratio label: peer_loss OUT mean vs copy propensity rho -0.571; nn1_pixel +0.75"
  sn.features = True          # data-only predictors in the quality classifier's features too (trains it: mitigate.classifier_*)
  sn.num_shown = 32           # riskiest and safest images on the contact sheet
  sn.shard = ""               # "k/n": this process trains the reference models m with m mod n = k ("" = all)
  sn.records_dir = ""         # where finished reference models' records go ("" = workdir/screen/records)
  sn.run_models = True        # False: train nothing, only write the outputs from the records present
  return c


def shrink_training(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:quick` model and training settings shared by the MNIST quick variants: a 16-channel
  UNet trained at batch 32, checkpointed every 100 steps (train.num_steps stays the caller's)."""
  c.model.ch = 16
  c.model.num_groups = 4
  c.train.batch_size = 32
  c.train.warmup_steps = 50
  c.train.lr = 1e-3
  c.train.ckpt_every = 100
  c.train.log_every = 50
  return c


def shrink_downstream(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:quick` settings of the stages after training (sample, score, detect, report),
  shared by every experiment's quick variant: a few minutes on 2 CPU cores."""
  c.sample.num_samples = 64
  c.sample.sde_steps = 200
  c.sample.batch_size = 64
  c.score.rtol = 1e-3
  c.score.atol = 1e-3
  c.detect.carlini_n = 10
  c.report.num_bootstrap = 200
  return c


def shrink_bench(c: ml_collections.ConfigDict, pool_sizes: tuple[int, int], steps: tuple[int, int],
                 num_models: int, num_samples: int) -> ml_collections.ConfigDict:
  """The `:quick` settings of a benchmark plan after shrink_downstream: two pilot pool sizes
  and lengths, num_models models of num_samples samples (the pilot draws twice that),
  hutchinson@rank32 and the peers loss and pia, a short quality classifier for pool.json."""
  shrink_downstream(c)
  c.train.ckpt_every = min(steps)
  c.sample.num_samples = c.sample.batch_size = int(num_samples)
  c.score.estimators = ("hutchinson@rank32",)
  c.score.peers = ("loss", "pia")
  c.mitigate.classifier_steps = 100
  b = c.bench
  b.num_models, b.pilot_pool_sizes, b.pilot_steps = int(num_models), tuple(pool_sizes), tuple(steps)
  b.max_samples = 2 * int(num_samples)
  b.num_bootstrap = 200
  return c

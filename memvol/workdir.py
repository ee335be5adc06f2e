"""Every path of a workdir, in one place.

A workdir holds one experiment (one data / model / SDE config):

  config.json                the identity sections it was made with (memvol.pipeline)
  pretrained.json            the SHA-256 of pretrained weights (memvol.pretrained)
  timings.json               wall seconds per stage
  .memvol.lock               one job at a time (memvol.lock)
  data/split.json            the train / held-out split (memvol.data)
  checkpoints/<step>/        orbax checkpoints (memvol.checkpoint)
  train/log.csv              the training log (memvol.train), and its figures
  samples/samples_<m>.npz    generated images of sampler m, parts/<m>/, grid_<m>.png (memvol.sampling)
  scores/scores.csv          per-image scores (memvol.scoring: read_scores), manifest.json,
                             profile_<E>.npz, agreement.csv, parts/<E | peer_<p> | agreement_<E>>/
  detect/detect.csv          copy labels (memvol.detect: read_detect), nn.npz, copies.png
  report/                    report.md, summary.json, figures (memvol.report)
  mitigate/<regime>/<arm>/   a mitigation arm's own workdir (memvol.mitigate)
  bench/pilot/n<N>/, bench/models/m<k>/   the benchmark's sub-workdirs, with
                             bench/pilot.json, bench/plan.npz, records/m<k>.json, summary.json,
                             report.md and figures (memvol.bench)
  screen/models/m<k>/        the screen's reference models, with screen/plan.npz, records/m<k>.json,
                             risk.csv, summary.json, report.md and figures (memvol.screen)

Each file's reader and writer live in the module that defines its format; this module only
names the paths, so no module builds a path of another's by hand.
"""

from __future__ import annotations

import os

LOCK_NAME = ".memvol.lock"
# Sections that define what a workdir holds (config.json, each checkpoint's record);
# changing any of them needs a new workdir.
IDENTITY_SECTIONS = ("data", "model", "sde")


def config_record(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def pretrained_record(workdir: str) -> str:
  return os.path.join(workdir, "pretrained.json")


def timings(workdir: str) -> str:
  return os.path.join(workdir, "timings.json")


def lock(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_NAME)


def split(workdir: str) -> str:
  return os.path.join(workdir, "data", "split.json")


def checkpoints(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def train_dir(workdir: str) -> str:
  return os.path.join(workdir, "train")


def train_log(workdir: str) -> str:
  return os.path.join(train_dir(workdir), "log.csv")


# --- samples ---------------------------------------------------------------------------


def samples_dir(workdir: str) -> str:
  return os.path.join(workdir, "samples")


def samples(workdir: str, method: str) -> str:
  """The merged samples of one sampler ('sde' or 'ode')."""
  return os.path.join(samples_dir(workdir), f"samples_{method}.npz")


def sample_parts(workdir: str, method: str) -> str:
  return os.path.join(samples_dir(workdir), "parts", method)


def sample_grid(workdir: str, method: str) -> str:
  return os.path.join(samples_dir(workdir), f"grid_{method}.png")


# --- scores ----------------------------------------------------------------------------


def scores_dir(workdir: str) -> str:
  return os.path.join(workdir, "scores")


def scores_csv(workdir: str) -> str:
  return os.path.join(scores_dir(workdir), "scores.csv")


def scores_manifest(workdir: str) -> str:
  return os.path.join(scores_dir(workdir), "manifest.json")


def profile(workdir: str, estimator: str) -> str:
  return os.path.join(scores_dir(workdir), f"profile_{estimator}.npz")


def agreement_csv(workdir: str) -> str:
  return os.path.join(scores_dir(workdir), "agreement.csv")


def score_parts(workdir: str, estimator: str) -> str:
  return os.path.join(scores_dir(workdir), "parts", estimator)


def peer_parts(workdir: str, name: str) -> str:
  return score_parts(workdir, f"peer_{name}")


def agreement_parts(workdir: str, estimator: str) -> str:
  return score_parts(workdir, f"agreement_{estimator}")


# --- detect, report, mitigate ------------------------------------------------------------


def detect_dir(workdir: str) -> str:
  return os.path.join(workdir, "detect")


def detect_csv(workdir: str) -> str:
  return os.path.join(detect_dir(workdir), "detect.csv")


def nn(workdir: str) -> str:
  return os.path.join(detect_dir(workdir), "nn.npz")


def copies_figure(workdir: str) -> str:
  return os.path.join(detect_dir(workdir), "copies.png")


def report_dir(workdir: str) -> str:
  return os.path.join(workdir, "report")


def mitigate_dir(workdir: str) -> str:
  return os.path.join(workdir, "mitigate")


def mitigate_regime(workdir: str, regime: str) -> str:
  return os.path.join(mitigate_dir(workdir), regime)


def mitigate_arm(workdir: str, regime: str, name: str) -> str:
  """The workdir of one arm (or a regime's own baseline, name 'baseline')."""
  return os.path.join(mitigate_regime(workdir, regime), name)


def bench_dir(workdir: str) -> str:
  return os.path.join(workdir, "bench")


def bench_pilot(workdir: str, pool_size: int) -> str:
  """The pilot sub-workdir of candidate pool size N (training length from copy counts)."""
  return os.path.join(bench_dir(workdir), "pilot", f"n{int(pool_size)}")


def bench_model(workdir: str, model: int) -> str:
  """The sub-workdir of model m of the benchmark (trained on its half of the pool)."""
  return os.path.join(bench_dir(workdir), "models", f"m{int(model):04d}")


def screen_dir(workdir: str) -> str:
  """The screen's outputs: plan.npz, records/, risk.csv, summary.json, report.md, figures."""
  return os.path.join(workdir, "screen")


def screen_model(workdir: str, model: int) -> str:
  """The sub-workdir of reference model m of the screen (trained on its half of the images)."""
  return os.path.join(screen_dir(workdir), "models", f"m{int(model):04d}")


def risk_csv(workdir: str) -> str:
  return os.path.join(screen_dir(workdir), "risk.csv")

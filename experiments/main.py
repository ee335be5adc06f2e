"""memvol entry point: parse flags, dispatch to the experiment stages.

  python -m experiments.main --config=experiments/configs/mnist.py --workdir=runs/mnist
  python -m experiments.main --config=experiments/configs/mnist.py:quick --workdir=runs/quick
  python -m experiments.main --config=... --workdir=... --mode=score --config.score.batch_size=32

Modes: train | sample | score | detect | report | all (default: the whole chain, skipping
stages already complete in the workdir) | mitigate (select, modify, retrain and count
copies again; see experiments/configs/mnist_mitigate.py) | bench (which images will the model
copy: many models on random halves of a pool; see experiments/configs/digits_bench.py) | screen
(every image's memorisation risk before training, from reference models on its halves or the
data alone; see experiments/configs/mnist_screen.py).

Exit status: 0 done; 143 stopped by a preemption notice (SIGTERM) after saving its
progress (rerun the same command to resume); 75 the workdir is locked by another job.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs.base import get_base_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/mnist.py", "Experiment config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, samples, scores and the report.")
_MODE = flags.DEFINE_enum("mode", "all", ["train", "sample", "score", "detect", "report", "all", "mitigate", "bench",
                                          "screen"],
                          "Stage to run; 'all' runs the chain and skips completed stages; 'mitigate' "
                          "(not in 'all') retrains with selected images modified (memvol/mitigate/); 'bench' "
                          "(not in 'all') judges every score over models on random halves of a pool (memvol/bench/); "
                          "'screen' (not in 'all') gives every image a memorisation risk before training "
                          "(memvol/screen/).")
_FORCE = flags.DEFINE_bool("force", False, "With --mode=all: rerun stages even if complete.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs; see BUILD.md).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
flags.mark_flags_as_required(["workdir"])
PREEMPTED_EXIT = 143  # 128 + SIGTERM: what schedulers read as "preempted, requeue me"
LOCKED_EXIT = 75      # EX_TEMPFAIL: the workdir is in use by another job


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from memvol import lock, pipeline, preempt
  logging.set_verbosity(logging.INFO)
  try:
    # Keys are checked against the base config here: the library never imports experiments/.
    pipeline.run(_CONFIG.value, _WORKDIR.value, _MODE.value, force=_FORCE.value, log=print,
                 reference=get_base_config())
  except preempt.Preempted as e:
    print(f"[memvol] {e}", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT)
  except lock.LockHeld as e:
    print(f"[memvol] {e}", file=sys.stderr, flush=True)
    sys.exit(LOCKED_EXIT)


if __name__ == "__main__":
  app.run(main)

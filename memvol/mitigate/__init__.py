"""Acting on the score: select training images, modify them, retrain, count copies again.

The `mitigate` stage (--mode=mitigate; not part of `all`). For each regime of
config.mitigate.regimes (the config with that regime's config.mitigate.overrides entries
"regime:section.field=value" applied) a baseline workdir holds the full chain (train,
sample, score, detect): the given workdir itself for a regime without overrides, else
workdir/mitigate/<regime>/baseline. An arm =
selection x modification x q x seed; it selects k = ceil(q N) of the N distinct training
images of the baseline and retrains from scratch in its own sub-workdir

    workdir/mitigate/<regime>/<selection>-<modification>-q<q>-seed<s>/   (none-seed<s>)

whose config carries the modification in its `data` section (data.drop_ids,
data.augment_ids, data.replace_path: see memvol/data.py), so arms never share a workdir
and the existing stages run unchanged on it (train -> sample -> detect).

Selections (`select_ids`): `score` the top k of a scores.csv column (ties by id); `loss` the
top k of the baseline's peer_loss; `calibrated` the top k of the score column calibrated
against a screen's reference models (lira_off_<column>: the baseline scored with
score.reference); `risk` the top k of a screen's risk before training (mitigate.risk_reference,
memvol/screen/); `random` k ids drawn with the arm's seed; `copied` the baseline's copied images (k =
their number, not ceil(q N)); `none` nothing (an unchanged retrain: the run-to-run spread).
Modifications: `drop` (out of the training stream), `drop_epochs` (the same, with
train.num_steps scaled by the stream's shrink, so every kept image is seen as many times as
in the baseline: the control for "fewer items, more epochs each"), `augment` (stronger
augmentation of the selected images), `perturb` (x + delta by PGD on the image's own L,
perturb.py).

An arm whose arm.json exists is done; a killed run redoes only the unfinished arm (its
stages resume inside). mitigate.adopt names the arm records of a run made elsewhere (its
summary.json, or a committed docs/results/<name>.records.json): an arm they hold for the
same baseline, selection and settings is taken from them instead of retrained. Per arm:
copies (samples that copy a training image, ratio criterion), copied_images (distinct
training images copied), both split into selected / unselected, copies_by_id, sample
quality against the held-out images (quality.py), the final training loss, and for
`perturb` L of the selected images under the retrained model. Output:
workdir/mitigate/summary.json (`arms`: one entry per arm and seed; `groups`: mean and sd
over seeds; `tests`: score vs random at equal k, Welch and Mann-Whitney over seeds, and
every group against the spread of `none`; p-values raw and Holm-adjusted over all tests of
a regime, Welch and Mann-Whitney as two families; `targeted` as a plain difference), report.md
and PNGs. Expected nulls (an sd of one seed, a metric an arm kind does not measure) are named
with their reason in summary.json's `not_estimated`, any other null in `undefined`.

The package, shaped like memvol/bench/: plan.py (arms, selections, configs and workdirs),
arms.py (a regime's baseline and one arm: selection values, retraining, copy counts, adoption),
analysis.py (groups, tests, the primary comparison), outputs.py (report.md, figure,
summary.json); this module is the stage.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from memvol import workdir as wdir
from memvol.bench import plan as bench_plan
from memvol.mitigate.analysis import DIFFERENCES, METRICS, PRIMARY, TESTED, primary_test, summarise
from memvol.mitigate.arms import (ON_NONFINITE, Regime, adopt_arm, baseline_scores, copy_counts, final_loss,
                                  load_adoptable, ranked_values, run_arm, save_record, selection, with_targeted)
from memvol.mitigate.outputs import figure, fmt_group, primary_lines, render_markdown, write_outputs
from memvol.mitigate.plan import (ARM_CHAIN, CHAIN, MODIFICATIONS, RANKED, SELECTIONS, Arm, arm_config, arm_dir,
                                  baseline_dir, check_score_column, check_selections, epoch_matched_steps,
                                  num_selected, parse_arms, regime_config, run_chain, score_column, select_ids,
                                  selection_column)

__all__ = [  # the stage, and what scripts and tests use from the package
    "ARM_CHAIN", "CHAIN", "DIFFERENCES", "DONE_MEANS", "METRICS", "MODIFICATIONS", "ON_NONFINITE", "PRIMARY", "RANKED",
    "SELECTIONS", "TESTED", "Arm", "Regime", "adopt_arm", "arm_config", "arm_dir", "baseline_dir", "baseline_scores",
    "check_score_column", "check_selections", "copy_counts", "epoch_matched_steps", "figure", "final_loss",
    "fmt_group", "is_complete", "load_adoptable", "num_selected", "parse_arms", "primary_lines", "primary_test",
    "ranked_values", "regime_config", "render_markdown", "run", "run_arm", "run_chain", "score_column", "select_ids",
    "selection", "selection_column", "stale_reason", "summarise", "with_targeted", "write_outputs",
]

DONE_MEANS = "every arm of the plan has its record"


def stale_reason(config: Any, workdir: str) -> str | None:
  """Always a reason: the stage is never skipped; it resumes arm by arm (each arm's record
  marks it done) and rewrites the summary."""
  return "the mitigation stage always runs; it resumes arm by arm"


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None


def run(config: Any, workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The stage: every regime's baseline, every arm of this shard (resuming); the summary is
  rewritten after each arm, so a long run can be read while it goes (`num_arms_planned` says
  how many arms the plan has).

  Shards (mitigate.shard = "k/n", one workdir each, the baseline run in each): a shard runs the
  arms i of the plan with i mod n = k, and takes the others from mitigate.adopt or
  mitigate.records_dir where they are there already (else leaves them out of its summary).
  Every finished arm's record is copied to mitigate.records_dir, so the shards' folder, once
  complete, is the whole plan: a run with no shard over it adopts every arm and trains none."""
  mt = config.mitigate
  k, n = bench_plan.parse_shard(str(mt.shard), "mitigate.shard")
  arms = parse_arms(mt)
  for regime in dict.fromkeys(a.regime for a in arms):
    check_score_column(regime_config(config, regime))
    check_selections(regime_config(config, regime), {a.selection for a in arms if a.regime == regime})
  records_dir = str(mt.records_dir)
  sources = [load_adoptable(p) for p in (str(mt.adopt), records_dir) if p and os.path.exists(p)]
  regimes: dict[str, Regime] = {}
  baselines: dict[str, dict[str, Any]] = {}
  records = []
  summary: dict[str, Any] = {}
  for i, arm in enumerate(arms):
    key = (arm.regime, arm.name)
    source = next((s for s in sources if key in s["arms"]), None)
    done = os.path.exists(os.path.join(arm_dir(workdir, arm), "arm.json"))
    if i % n != k and source is None and not done:
      continue
    if arm.regime not in regimes:
      regimes[arm.regime] = Regime(config, workdir, arm.regime, log)
      baselines[arm.regime] = regimes[arm.regime].record(log)
      if records_dir:
        save_record(records_dir, baselines[arm.regime])
    records.append(run_arm(regimes[arm.regime], arm, workdir, log, source))
    if records_dir:
      save_record(records_dir, records[-1], arm)
    summary = summarise(with_targeted(records), baselines) | {"num_arms_planned": len(arms)}
    write_outputs(summary, wdir.mitigate_dir(workdir), log)
  return summary

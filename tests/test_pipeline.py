"""The chain over one workdir, unmocked and tiny: train -> sample -> score -> detect ->
report in the default run; --mode=all skipping (and saying why), --force, reruns when a
detect or report setting changes, check_workdir, and config typos."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import time

import pytest

import tiny_chain
from experiments.configs.base import get_base_config
from memvol import io, pipeline

ROOT = tiny_chain.ROOT


def _check_report(wd: str) -> int:
  spec = importlib.util.spec_from_file_location("check_report", os.path.join(ROOT, "scripts", "check_report.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.main(wd)


def _run(c, wd, mode="all", force=False):
  said = []
  pipeline.run(c, wd, mode, force=force, log=said.append, reference=get_base_config())
  return said


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """(config, workdir, log lines, seconds) of one real --mode=all run on a fresh workdir."""
  wd = str(tmp_path_factory.mktemp("chain") / "wd")
  c = tiny_chain.config()
  t0 = time.perf_counter()
  said = _run(c, wd)
  return c, wd, said, time.perf_counter() - t0


def _copy(chain, tmp_path) -> str:
  wd = str(tmp_path / "wd")
  shutil.copytree(chain[1], wd)
  return wd


def test_train_to_report_unmocked(chain):
  c, wd, said, seconds = chain
  for stage in pipeline.STAGES:
    assert f"[memvol] stage {stage}: to run: " in "\n".join(said)
    assert pipeline.is_complete(c, wd, stage)
  assert _check_report(wd) == 0  # the report's numbers exist and are finite
  split_rows = io.load_csv(os.path.join(wd, "scores", "scores.csv"))
  assert len(split_rows) == 24 and {r["split"] for r in split_rows} == {"train", "heldout"}
  assert len(io.load_csv(os.path.join(wd, "detect", "detect.csv"))) == 12
  assert set(io.load_json(os.path.join(wd, "timings.json"))) == set(pipeline.STAGES)
  print(f"tiny chain: {seconds:.1f} s")


def test_all_skips_complete_stages_saying_why(chain, tmp_path):
  c, wd = chain[0], _copy(chain, tmp_path)
  before = {p: os.path.getmtime(os.path.join(wd, p)) for p in ("detect/detect.csv", "report/report.md")}
  said = _run(c, wd)
  assert len(said) == 5 and all(": skipped, already complete in " in s for s in said)
  assert "(the latest checkpoint has train.num_steps updates)" in said[0]
  assert "made with these settings and inputs" in said[3] and "made with these settings and inputs" in said[4]
  assert before == {p: os.path.getmtime(os.path.join(wd, p)) for p in before}


def test_force_reruns_every_stage(chain, tmp_path):
  c, wd = chain[0], _copy(chain, tmp_path)
  old = {p: open(os.path.join(wd, p), "rb").read() for p in ("detect/detect.csv", "scores/scores.csv")}
  os.utime(os.path.join(wd, "detect", "detect.csv"), (0, 0))
  said = _run(c, wd, force=True)
  for stage in pipeline.STAGES:
    assert f"[memvol] stage {stage}: rerun (--force)" in said and f"[memvol] stage {stage}: start" in said
  assert os.path.getmtime(os.path.join(wd, "detect", "detect.csv")) > 0  # rewritten
  assert old == {p: open(os.path.join(wd, p), "rb").read() for p in old}  # deterministic


def test_changed_detect_setting_reruns_detect_and_report(chain, tmp_path):
  c, wd = tiny_chain.config(detect__ratio_threshold=0.5), _copy(chain, tmp_path)
  said = "\n".join(_run(c, wd))
  for stage in ("train", "sample", "score"):
    assert f"stage {stage}: skipped" in said
  assert "stage detect: to run: settings or inputs changed since its outputs were made: " \
         "detect.ratio_threshold: 0.3333333333333333 -> 0.5" in said
  assert "stage report: to run: settings or inputs changed" in said and "ratio_threshold" in said
  assert io.load_json(os.path.join(wd, "detect", "settings.json"))["detect"]["ratio_threshold"] == 0.5
  assert "d1/d2 < 0.5" in open(os.path.join(wd, "report", "report.md")).read()


def test_changed_report_setting_reruns_only_report(chain, tmp_path):
  c, wd = tiny_chain.config(report__fpr=0.05), _copy(chain, tmp_path)
  said = _run(c, wd)
  assert [s.split(":")[0] for s in said if "skipped" in s] == [
      f"[memvol] stage {s}" for s in ("train", "sample", "score", "detect")]
  assert "stage report: to run: settings or inputs changed since its outputs were made: report.fpr: 0.01 -> 0.05" \
      in "\n".join(said)
  assert io.load_json(os.path.join(wd, "report", "summary.json"))["fpr"] == 0.05


def test_an_interrupted_detect_is_not_taken_as_complete(chain, tmp_path):
  """A stage killed after writing some outputs has no settings record: it reruns."""
  c, wd = chain[0], _copy(chain, tmp_path)
  os.remove(os.path.join(wd, "detect", "settings.json"))
  said = "\n".join(_run(c, wd))
  assert "stage detect: to run: no settings record" in said
  # rescoring changes scores.csv: the report reruns on the new input digest
  rows = io.load_csv(os.path.join(wd, "scores", "scores.csv"))
  rows[0]["exact_log_volume"] = str(float(rows[0]["exact_log_volume"]) + 1.0)
  io.save_csv(os.path.join(wd, "scores", "scores.csv"), rows)
  assert "inputs.scores.csv" in pipeline.status(c, wd, "report")[1]


def test_check_workdir_refuses_another_data_config(chain, tmp_path):
  wd = _copy(chain, tmp_path)
  pipeline.check_workdir(chain[0], wd)  # its own config: fine
  with pytest.raises(ValueError, match=r"differing fields: data.num_train: 12 -> 10"):
    _run(tiny_chain.config(data__num_train=10), wd, "detect")
  with pytest.raises(ValueError, match=r"model.hidden: 16 -> 32"):
    pipeline.check_workdir(tiny_chain.config(model__hidden=32), wd)


def test_unknown_config_keys_are_refused_naming_the_known_ones(tmp_path):
  wd = str(tmp_path / "wd")
  c = tiny_chain.config()
  c.sde.beta_maxx = 30.0
  with pytest.raises(ValueError, match=r"unknown key config.sde.beta_maxx \(a typo\?\); known keys of "
                     r"config.sde: T, beta_max, beta_min, eps, name"):
    _run(c, wd)
  assert not os.path.exists(wd)  # refused before anything is written
  c = tiny_chain.config()
  c.scoring = {"batch_size": 8}
  with pytest.raises(ValueError, match=r"unknown key config.scoring .*known keys of config: .*score"):
    _run(c, wd)
  # the known keys are the reference's, whatever it holds (e.g. sections added later)
  ref = get_base_config()
  ref.sde.beta_maxx = 0.0
  c = tiny_chain.config()
  c.sde.beta_maxx = 30.0
  pipeline.check_keys(c, ref)
  with pytest.raises(ValueError, match="unknown mode"):
    pipeline.run(tiny_chain.config(), wd, "evaluate")


@pytest.mark.parametrize("name", ["mnist", "digits", "cifar10_2to7", "celeba64"])
def test_experiment_configs_use_only_known_keys(name):
  import importlib
  mod = importlib.import_module(f"experiments.configs.{name}")
  for arg in (None, "quick"):
    pipeline.check_keys(mod.get_config(arg), get_base_config())


@pytest.mark.parametrize("name", ["train", "pretrained", "sampling", "scoring", "detect", "report", "mitigate", "bench"])
def test_every_stage_module_implements_the_stage_protocol(name):
  mod = importlib.import_module(f"memvol.{name}")
  assert isinstance(mod, pipeline.Stage)
  assert isinstance(mod.DONE_MEANS, str) and mod.DONE_MEANS

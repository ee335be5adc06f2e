import pytest

from memvol import io


def test_config_diff_names_changed_and_missing_fields():
  old = {"data": {"name": "mnist", "num_train": 96}}
  new = {"data": {"name": "mnist", "num_train": 48, "extra": 1}}
  assert io.config_diff(old, new) == ["data.extra: '<missing>' -> 1", "data.num_train: 96 -> 48"]


def test_a_field_added_later_matches_records_made_before_it(tmp_path):
  """A workdir recorded before model.pretrained existed is the same workdir when the new
  field has its as-before value, and another one when it does not."""
  path = str(tmp_path / "config.json")
  io.save_json(path, {"model": {"name": "unet"}})
  assert io.config_diff({"model": {"name": "unet"}}, {"model": {"name": "unet", "pretrained": ""}}) == []
  io.check_config_matches({"model": {"name": "unet", "pretrained": ""}}, path, ("model",), "w")
  with pytest.raises(ValueError, match="model.pretrained"):
    io.check_config_matches({"model": {"name": "unet", "pretrained": "/x"}}, path, ("model",), "w")


def test_same_settings_reads_a_missing_added_option_as_its_default():
  """A settings record made before an option existed matches the option's as-before value
  (io.ADDED_FIELDS), and only that value."""
  old = {"options": {"solver": "tsit5"}}
  assert io.same_settings(old, {"options": {"solver": "tsit5", "richardson": False}})
  assert not io.same_settings(old, {"options": {"solver": "tsit5", "richardson": True}})
  assert not io.same_settings(old, {"options": {"solver": "heun", "richardson": False}})

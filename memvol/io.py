"""Atomic result files and the workdir's record of its config.

Every result file is written to a temporary name in the same folder and renamed into
place, so a killed run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np


def _write_error(path: str, e: OSError) -> OSError:
  return OSError(e.errno, f"cannot write {path}: {e.strerror or e} (disk full, or the folder is not "
                 "writable?); nothing was written there, the previous file (if any) is intact")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
  """Open a temporary file beside `path`; on clean exit fsync and rename it to `path`. An
  OSError on the way (disk full, read-only folder) is re-raised naming `path`, and the
  temporary file is removed."""
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  except OSError as e:
    raise _write_error(path, e) from e
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise _write_error(path, e) from e
    raise


def save_npz(path: str, **arrays: Any) -> None:
  """np.savez to `path`, atomically."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  with atomic_open(path, "wb") as f:
    f.write(buf.getvalue())


def load_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an .npz file; a clear error when it is missing or corrupt."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError, ...
    raise ValueError(f"{path} is corrupt ({e}); delete it and rerun the stage that writes it") from e


def save_json(path: str, obj: Any) -> None:
  """json.dump to `path`, atomically (sorted keys, indented)."""
  with atomic_open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)


def load_json(path: str) -> Any:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is corrupt ({e}); delete it and rerun the stage that writes it") from e


def save_csv(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
  """Rows of dicts to CSV at `path`, atomically; columns default to the first row's keys."""
  if columns is None:
    columns = list(rows[0].keys()) if rows else []
  with atomic_open(path, "w") as f:
    w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in columns})


def load_csv(path: str) -> list[dict[str, str]]:
  """CSV rows as dicts of strings; a clear error when missing, empty or corrupt."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise ValueError(f"{path} has no rows; delete it and rerun the stage that writes it")
  return rows


def _json_default(o: Any) -> Any:
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (tuple, set, frozenset)):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")


def config_to_dict(config: Any) -> dict[str, Any]:
  """A ConfigDict (or mapping) as plain JSON-able nested dicts, tuples as lists."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d, default=_json_default))


# Identity fields (data / model / sde) added after workdirs and checkpoints were first
# recorded (or removed since), each with the value that means "as before": a record or
# config that lacks the field stands for that value, so old workdirs stay usable.
ADDED_FIELDS = {
    "data.heldout_name": "", "data.heldout_path": "", "model.pretrained": "",
    "data.member_split_path": "", "data.drop_ids": [], "data.augment_ids": [], "data.augment_shift": 2,
    "data.augment_noise": 0.05, "data.replace_path": "", "data.replace_sha256": "",
    "data.dup_strata": [], "data.role": "target",
    "options.richardson": False,  # a volume option added later: old score settings lack it
}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Dotted paths where two nested config dicts differ, each as 'path: old -> new'. A field
  of ADDED_FIELDS missing from either side counts as its as-before value (a field added
  since `old` was recorded, or one removed since, whose old records carry that value)."""
  out = []
  for k in sorted(set(old) | set(new)):
    path = f"{prefix}{k}"
    a, b = (d.get(k, ADDED_FIELDS.get(path, "<missing>")) for d in (old, new))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out.extend(config_diff(a, b, path + "."))
    elif a != b:
      out.append(f"{path}: {a!r} -> {b!r}")
  return out


def same_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
  """Whether two settings records agree (config_diff finds nothing; ADDED_FIELDS honoured)."""
  return not config_diff(old, new)


def check_config_matches(config: Any, path: str, sections: Sequence[str], what: str) -> None:
  """Record `sections` of `config` at `path` (JSON) the first time; afterwards refuse, with a
  ValueError naming every differing field, a config whose `sections` differ from the record."""
  new = {s: config_to_dict(config[s]) for s in sections}
  if not os.path.exists(path):
    save_json(path, new)
    return
  old = load_json(path)
  diff = config_diff({s: old.get(s, {}) for s in sections}, new)
  if diff:
    raise ValueError(
        f"{what} was made with a different config ({path}); differing fields: "
        + "; ".join(diff) + ". Use a new --workdir, or restore the original settings.")


# --- settings records: what made a folder's outputs ------------------------------------

SETTINGS_FILE = "settings.json"


def file_sha256(path: str) -> str:
  """sha256 (hex) of a file's bytes, read in blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def file_digest(path: str) -> str | None:
  """sha256 (hex, 16 chars) of a file's bytes; None when it does not exist."""
  return file_sha256(path)[:16] if os.path.exists(path) else None


def forget_settings(folder: str) -> None:
  """Remove `folder`'s settings record before its outputs are rewritten, so that a run
  stopped half way is never taken as complete."""
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(folder, SETTINGS_FILE))


def record_settings(folder: str, settings: Mapping[str, Any]) -> None:
  """Record the settings that made `folder`'s outputs (write it after them: it marks them
  complete)."""
  save_json(os.path.join(folder, SETTINGS_FILE), settings)


def stale_reason(folder: str, settings: Mapping[str, Any], outputs: Sequence[str]) -> str | None:
  """Why `folder`'s outputs (file names in it) are not the outputs of `settings`; None when
  they all exist and were made with exactly these settings."""
  path = os.path.join(folder, SETTINGS_FILE)
  if not os.path.exists(path):
    return f"no settings record {path} (never run, or stopped before it finished)"
  missing = [o for o in outputs if not os.path.exists(os.path.join(folder, o))]
  if missing:
    return f"outputs missing in {folder}: {', '.join(missing)}"
  try:
    saved = load_json(path)
  except ValueError as e:
    return str(e)
  diff = config_diff(saved, json.loads(json.dumps(settings, default=_json_default)))
  if diff:
    return "settings or inputs changed since its outputs were made: " + "; ".join(diff)
  return None

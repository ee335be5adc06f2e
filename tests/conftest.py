"""Test session set-up: 4 forced host CPU devices (so 1-vs-4-device checks run in one
process), and an `x64` fixture for tight-tolerance maths."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Run the test body with float64 enabled."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="session")
def num_devices() -> int:
  return jax.device_count()

import os
import signal

from memvol import preempt


def test_sigterm_sets_the_flag_only_inside_the_block():
  preempt.clear()
  with preempt.handling():
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempt.requested() and preempt.should_stop(0)
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  preempt.clear()
  assert not preempt.should_stop(1)


def test_preempted_says_how_to_resume():
  e = preempt.Preempted("train", "step 7", "python -m experiments.main --workdir=w")
  assert "step 7" in str(e) and "--workdir=w" in str(e)

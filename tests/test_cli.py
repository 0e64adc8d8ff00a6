"""The scripts' command lines: config overrides apply, and bad ones fail with a message naming the flag."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,expected", [
    ("--config.model.no_such_key=1", "unknown config key in --config.model.no_such_key=1"),
    ("--config.model.backbone.dept=1", "Did you mean 'depth'?"),
    ("--config.model.num_queries=abc", "--config.model.num_queries=abc"),
])
def test_bad_override_fails_with_a_clear_message(override, expected):
  result = run_script("scripts/demo_forward.py", override)
  assert result.returncode != 0
  assert expected in result.stderr
  assert "Traceback" not in result.stderr


def test_demo_runs_with_an_override():
  """The README's main command's script, with a smaller model: prints the output shapes of the contract."""
  result = run_script("scripts/demo_forward.py", "--config.model.num_queries=7", "--config.model.num_classes=5")
  assert result.returncode == 0, result.stderr
  assert "pred_logits (1, 7, 6)  pred_masks (1, 7, 128, 192)" in result.stdout  # coffee 400x600 -> 512x768

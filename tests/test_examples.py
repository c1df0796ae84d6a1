"""The examples a newcomer copies from run and print what they promise."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(name: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_sensor_stream():
    out = run("sensor_stream.py")
    error = float(re.search(r"max \|stream - clip\| = (\S+)", out).group(1))
    assert error < 1e-5 and "exact: True" in out


@pytest.mark.slow
def test_quickstart():
    out = run("quickstart.py")
    assert "receptive field 249 frames, delay 40, exact: False" in out
    error = float(re.search(r"= (\S+) \(output scale", out).group(1))
    assert error < 1e-4
    assert re.search(r"forward_step: [\d.]+ ms per frame", out)


def test_online_action_detection():
    out = run("online_action_detection.py")
    error = float(re.search(r"max \|stream - clip\| = (\S+)", out).group(1))
    assert error < 1e-4 and "delay 0 frames; exact: True" in out and "frame 33 scores: (2, 20)" in out

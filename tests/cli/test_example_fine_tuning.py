"""The prompt-tuning example runs as a user runs it (a real process), on a tiny model.

In-process blocks keep it quick; tests/integration/test_training.py covers training through server processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prompt_tune_classification.py"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_example_trains_and_reports_progress(tiny_model_dir: Path) -> None:
    env = {**os.environ, "PETALNODE_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", str(tiny_model_dir), "--steps", "3", "--batch-size", "8",
         "--tuning-mode", "deep_ptune", "--in-process"],
        capture_output=True, text=True, timeout=110, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [float(x) for x in re.findall(r"step +\d+/3 +loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 3, result.stdout
    assert "held-out accuracy after training" in result.stdout

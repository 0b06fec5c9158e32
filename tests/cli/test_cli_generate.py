"""`petalnode generate` as a user runs it: a real process, real output, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.integration


def _petalnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PETALNODE_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "petalnode.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_generate_prints_the_greedy_continuation(tiny_model_dir: Path) -> None:
    """Without --bootstrap: a local swarm of real processes is started, used, and shut down (what `make run` does)."""
    prompt = "The capital of France is"
    result = _petalnode("generate", prompt, "--model", str(tiny_model_dir), "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
                                skip_special_tokens=True)
    assert result.stdout.startswith(prompt)
    assert result.stdout.strip() == (prompt + expected).strip()
    assert "12 tokens" in result.stderr
    assert "starting a local swarm" in result.stderr and "local swarm ready" in result.stderr


def test_seeded_sampling_is_reproducible(tiny_model_dir: Path) -> None:
    args = ("generate", "one two", "--model", str(tiny_model_dir), "--max-new-tokens", "10",
            "--temperature", "1.5", "--seed", "7", "--in-process")
    first, second = _petalnode(*args), _petalnode(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "x", "--model", "no/such-model"), "not available on this machine"),
        (("generate", "x", "--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
    ],
)
def test_user_errors_are_clear(args: tuple[str, ...], message: str) -> None:
    result = _petalnode(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_without_template_is_refused(tiny_model_dir: Path) -> None:
    result = _petalnode("generate", "hi", "--model", str(tiny_model_dir), "--chat")
    assert result.returncode == 2 and "no chat template" in result.stderr

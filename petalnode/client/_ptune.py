"""Prompt tuning: the trainable parameters a client owns while the frozen blocks run on the swarm.

Two modes, as Petals users know them (`tuning_mode` on `from_pretrained`):
- "ptune": `pre_seq_len` trainable embeddings are prepended to every input sequence.
- "deep_ptune": the same, plus a trainable prompt per block, added (on the server) to that block's input at the
  first `pre_seq_len` positions. Deep prompts start at zero, so an untrained deep prompt changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from petalnode.errors import ConfigError

TUNING_MODES = ("ptune", "deep_ptune")


class PromptTuning(nn.Module):
    def __init__(
        self, mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int, *, init_std: float = 0.02,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if mode not in TUNING_MODES:
            raise ConfigError(f"tuning_mode must be one of {TUNING_MODES} or None, got {mode!r}")
        if pre_seq_len < 1:
            raise ConfigError(f"prompt tuning needs pre_seq_len >= 1, got {pre_seq_len}")
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        self.num_blocks = num_blocks
        self.hidden_size = hidden_size
        self.prompt_embeddings = nn.Parameter(torch.randn(pre_seq_len, hidden_size, dtype=dtype) * init_std)
        self.deep_prompts: nn.Parameter | None = None
        if mode == "deep_ptune":
            self.deep_prompts = nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size, dtype=dtype))

    def shallow(self, batch_size: int) -> torch.Tensor:
        """The prompt to prepend: [batch, pre_seq_len, hidden]."""
        return self.prompt_embeddings[None].expand(batch_size, -1, -1)

    def deep(self) -> torch.Tensor | None:
        """Deep prompts for every block, shared by the batch: [num_blocks, 1, pre_seq_len, hidden] (or None)."""
        return None if self.deep_prompts is None else self.deep_prompts[:, None]

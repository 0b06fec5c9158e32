"""The contract between the client model and whatever runs the transformer blocks.

A `BlockChain` covers all blocks of a model, in order. Locally it is a list of in-process spans; in a swarm it
is a route of remote servers (the node package provides that implementation). The client model is written
once against this contract, which is synchronous because transformers' `generate` is.
"""

from __future__ import annotations

import itertools
from typing import Protocol

import torch

from petalnode.compute import ModelInfo, SessionManager, load_block_span
from petalnode.errors import ConfigError


class ChainSession(Protocol):
    """An open inference session through every block of the model."""

    @property
    def position(self) -> int: ...

    def step(self, hidden_states: torch.Tensor, *, start_position: int | None = None) -> torch.Tensor:
        """[batch, n, hidden] at positions [start, start + n) -> [batch, n, hidden] after the last block."""
        ...

    def close(self) -> None: ...


class BlockChain(Protocol):
    def open_session(
        self, max_length: int, *, batch_size: int = 1, adapter: str | None = None,
        prompts: torch.Tensor | None = None,
    ) -> ChainSession:
        """A session keeping caches; `prompts` are deep prompts [num_blocks, 1 or batch, prefix, hidden]."""
        ...

    def forward(
        self, hidden_states: torch.Tensor, *, prompts: torch.Tensor | None = None, adapter: str | None = None,
    ) -> torch.Tensor:
        """A stateless pass over whole sequences (no cache), for scoring or training.

        Differentiable (torch autograd) with respect to `hidden_states` and the deep `prompts`; block weights
        stay frozen. `adapter` names a LoRA adapter to apply in every block.
        """
        ...

    def close(self) -> None: ...


def even_spans(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, num_blocks) into `parts` contiguous spans whose sizes differ by at most one."""
    if not 1 <= parts <= num_blocks:
        raise ConfigError(f"cannot split {num_blocks} blocks into {parts} spans")
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


class _LocalChainSession:
    def __init__(
        self, managers: list[SessionManager], ranges: list[tuple[int, int]], max_length: int, batch_size: int,
        prompts: torch.Tensor | None,
    ) -> None:
        self._managers = managers
        self._sessions = []
        try:
            for manager, (start, end) in zip(managers, ranges, strict=True):
                span_prompts = None if prompts is None else prompts[start:end]
                self._sessions.append(manager.open(max_length, batch_size=batch_size, prompts=span_prompts))
        except BaseException:
            self.close()
            raise

    @property
    def position(self) -> int:
        return self._sessions[0].position

    def step(self, hidden_states: torch.Tensor, *, start_position: int | None = None) -> torch.Tensor:
        for session in self._sessions:
            hidden_states = session.step(hidden_states, start_position=start_position)
        return hidden_states

    def close(self) -> None:
        for manager, session in zip(self._managers, self._sessions, strict=False):
            manager.close(session.session_id)


class LocalBlockChain:
    """All blocks in this process, split into spans exactly as servers would hold them."""

    def __init__(
        self, info: ModelInfo, *, spans: list[tuple[int, int]] | None = None, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu", cache_budget_bytes: int = 1 << 30,
    ) -> None:
        spans = spans or [(0, info.num_blocks)]
        self.ranges = list(spans)
        self.spans = [load_block_span(info, start, end, dtype=dtype, device=device) for start, end in spans]
        per_block = info.kv_bytes_per_token_per_block(dtype)
        self._managers = [
            SessionManager(
                span, cache_budget_bytes=cache_budget_bytes, kv_bytes_per_token_per_block=per_block,
                hidden_size=info.hidden_size, dtype=dtype,
            )
            for span, (start, end) in zip(self.spans, spans, strict=True)
        ]

    def open_session(
        self, max_length: int, *, batch_size: int = 1, adapter: str | None = None,
        prompts: torch.Tensor | None = None,
    ) -> _LocalChainSession:
        self._check_adapter(adapter)
        return _LocalChainSession(self._managers, self.ranges, max_length, batch_size, prompts)

    def forward(
        self, hidden_states: torch.Tensor, *, prompts: torch.Tensor | None = None, adapter: str | None = None,
    ) -> torch.Tensor:
        self._check_adapter(adapter)
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        for span, (start, end) in zip(self.spans, self.ranges, strict=True):
            span_prompts = None if prompts is None else prompts[start:end]
            hidden_states = span.forward_span(hidden_states, None, position_ids, span_prompts)
        return hidden_states

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None:
            raise ConfigError("LoRA adapters are served by swarm servers; an in-process chain has none")

    def close(self) -> None:
        for manager in self._managers:
            manager.close_all()

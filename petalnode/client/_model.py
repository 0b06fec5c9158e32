"""A Hugging Face style causal LM whose transformer blocks run elsewhere.

The client holds only the tokenizer, embeddings, final norm and LM head; every block runs in a `BlockChain`
(in-process spans, or servers of a swarm). `generate()` is transformers' own, so greedy and sampled decoding,
temperature, top-k/top-p, repetition penalty, stopping criteria and streamers all behave as users expect.

Session semantics (as in Petals): outside `inference_session()`, every `generate()` call opens a session sized
for its prompt plus `max_new_tokens` and closes it afterwards. Inside `with model.inference_session(max_length=N)`,
successive `generate()` calls continue the same server-side caches: pass only the new tokens (or the whole
history; a prefix equal to what the session already holds is skipped).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from petalnode.client._chain import BlockChain, ChainSession, LocalBlockChain
from petalnode.compute import ModelInfo, load_client_head, load_model_info
from petalnode.errors import BadRequestError, InvalidStateError


@dataclass
class _ActiveSession:
    session: ChainSession
    max_length: int
    history: torch.Tensor | None = None  # [batch, position] token ids already in the caches
    new_generate_call: bool = True
    owner_depth: int = field(default=0)


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM with local embeddings/head and remote (or local-span) transformer blocks."""

    config_class = PretrainedConfig
    base_model_prefix = "petalnode"
    main_input_name = "input_ids"
    _supports_cache_class = True
    # Attention runs in the blocks (which pin their own kernel); the client model itself has none.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _no_split_modules: list[str] = []

    def __init__(self, config: PretrainedConfig, head: torch.nn.Module, chain: BlockChain) -> None:
        super().__init__(config)
        self.head = head
        self.chain = chain
        self._active: _ActiveSession | None = None
        self.model_info: ModelInfo | None = None

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        bootstrap: list[str] | None = None,
        chain: BlockChain | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        spans: list[tuple[int, int]] | None = None,
        **chain_options: Any,
    ) -> DistributedModelForCausalLM:
        """Load the client part of `model` (a local directory, or the default model when None).

        Args:
            bootstrap: swarm addresses; the blocks run on the swarm's servers.
            chain: an explicit block chain (overrides `bootstrap`).
            spans: with neither, run all blocks in this process, split into these spans.
        """
        info = load_model_info(model)
        head = load_client_head(info, dtype=dtype, device=device)
        if chain is None:
            if bootstrap:
                from petalnode.node import RemoteBlockChain  # the swarm client (node package)

                chain = RemoteBlockChain.connect(info, bootstrap=bootstrap, dtype=dtype, **chain_options)
            else:
                chain = LocalBlockChain(info, spans=spans, dtype=dtype, device=device)
        instance = cls(info.config, head, chain)
        instance.model_info = info
        instance.generation_config = _generation_config(info.source.path, info.config)
        instance.eval()
        return instance

    # --- transformers plumbing ---------------------------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.head.embed_tokens

    def can_generate(self) -> bool:  # type: ignore[override]
        return True

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Weights come from the checkpoint; never re-initialise them.
        pass

    # --- sessions ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inference_session(self, max_length: int, *, batch_size: int = 1) -> Iterator[ChainSession]:
        """Keep server-side caches across several `generate()` calls (multi-turn chat)."""
        if self._active is not None:
            raise InvalidStateError("an inference session is already active on this model")
        session = self.chain.open_session(max_length, batch_size=batch_size)
        self._active = _ActiveSession(session=session, max_length=max_length)
        try:
            yield session
        finally:
            self._active = None
            session.close()

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if self._active is not None:
            self._active.new_generate_call = True
            return super().generate(inputs, **kwargs)
        if input_ids is None:
            raise BadRequestError("generate() needs input_ids")
        max_new = kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens
        if max_new is None:
            max_length = kwargs.get("max_length") or self.generation_config.max_length or input_ids.shape[1] + 20
        else:
            max_length = input_ids.shape[1] + int(max_new)
        with self.inference_session(max_length=max_length, batch_size=input_ids.shape[0]):
            return super().generate(inputs, **kwargs)

    # --- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise BadRequestError("padded batches (attention_mask with zeros) are not supported yet")
        active = self._active
        if active is not None and input_ids is not None:
            input_ids = self._skip_known_prefix(active, input_ids)
        if inputs_embeds is None:
            if input_ids is None:
                raise BadRequestError("forward() needs input_ids or inputs_embeds")
            inputs_embeds = self.head.embed(input_ids)
        if active is None:
            hidden = self.chain.forward(inputs_embeds)
        else:
            hidden = active.session.step(inputs_embeds, start_position=active.session.position)
            if input_ids is not None:
                active.history = input_ids if active.history is None else torch.cat([active.history, input_ids], 1)
        logits = self.head.logits(hidden, logits_to_keep)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    @staticmethod
    def _skip_known_prefix(active: _ActiveSession, input_ids: torch.Tensor) -> torch.Tensor:
        """On a new generate() call in a multi-turn session, drop the part of the input the caches already hold."""
        first_call, active.new_generate_call = active.new_generate_call, False
        history = active.history
        if not first_call or history is None:
            return input_ids
        known = history.shape[1]
        if input_ids.shape[1] > known and torch.equal(input_ids[:, :known], history):
            return input_ids[:, known:]
        return input_ids

    def close(self) -> None:
        self.chain.close()


def _generation_config(path: Path, config: PretrainedConfig) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(config)


AutoDistributedModelForCausalLM = DistributedModelForCausalLM

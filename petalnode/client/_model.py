"""A Hugging Face style causal LM whose transformer blocks run elsewhere.

The client holds only the tokenizer, embeddings, final norm and LM head; every block runs in a `BlockChain`
(in-process spans, or servers of a swarm). `generate()` is transformers' own, so greedy and sampled decoding,
temperature, top-k/top-p, repetition penalty, stopping criteria and streamers all behave as users expect.

Session semantics (as in Petals): outside `inference_session()`, every `generate()` call opens a session sized
for its prompt plus `max_new_tokens` and closes it afterwards. Inside `with model.inference_session(max_length=N)`,
successive `generate()` calls continue the same server-side caches: pass only the new tokens (or the whole
history; a prefix equal to what the session already holds is skipped).

Fine-tuning: the model is a `torch.nn.Module` whose forward is differentiable through the swarm. With
`tuning_mode="ptune"` or `"deep_ptune"` it owns trainable prompts (see `_ptune.py`); `loss.backward()` fills their
gradients while the frozen blocks' backward runs on the servers. `adapter=` selects a LoRA adapter the servers
announce. `DistributedModelForSequenceClassification` adds a trainable classification head.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast

from petalnode.client._chain import BlockChain, ChainSession, LocalBlockChain
from petalnode.client._ptune import PromptTuning
from petalnode.compute import ModelInfo, load_client_head, load_model_info
from petalnode.errors import BadRequestError, InvalidStateError, VerificationRollback

log = logging.getLogger(__name__)
# A generate() call re-runs at most this often after verification found wrong outputs (each time a liar was banned).
MAX_VERIFICATION_RERUNS = 8

# transformers 5.x renamed the outputs' `past_key_values` field to `cache` (the old name warns on every generate).
_OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class _SessionCache:
    """What the model hands transformers as its cache (the real caches live in the chain's sessions).

    Assisted generation and prompt lookup feed drafted tokens, then call `crop(-n)` to drop the n that were
    rejected; the model's next step then starts n positions earlier, which rolls the chain's caches back.
    """

    is_croppable = True
    is_compileable = False

    def __init__(self) -> None:
        self.to_remove = 0
        self.base = 0  # the session position of the current generate() call's first token
        self.length = 0  # tokens of the current generate() call in the chain's caches

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.to_remove += -tokens_to_remove

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@dataclass
class _ActiveSession:
    session: ChainSession
    max_length: int
    history: torch.Tensor | None = None  # [batch, position] token ids already in the caches
    new_generate_call: bool = True
    owner_depth: int = field(default=0)
    # After a verification rollback: how many leading tokens of the next generate() call the caches already hold.
    skip_next: int | None = None
    # The tokens a generate() call returned but never fed through the blocks (transformers' generate does not run
    # the token it sampled last): fed first on the next call, unless that call's input repeats the whole history.
    pending: torch.Tensor | None = None
    # What transformers holds as this session's cache (see _SessionCache).
    cache: _SessionCache = field(default_factory=lambda: _SessionCache())


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

    def __init__(
        self, config: PretrainedConfig, head: torch.nn.Module, chain: BlockChain, *,
        prompt_tuning: PromptTuning | None = None, adapter: str | None = None,
    ) -> None:
        super().__init__(config)
        self.head = head
        self.chain = chain
        self.prompt_tuning = prompt_tuning
        self.adapter = adapter
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
        tuning_mode: str | None = None,
        pre_seq_len: int = 16,
        adapter: str | None = None,
        _init_kwargs: dict[str, Any] | None = None,
        **chain_options: Any,
    ) -> Any:
        """Load the client part of `model` (a local directory, or the default model when None).

        Args:
            bootstrap: swarm addresses; the blocks run on the swarm's servers.
            chain: an explicit block chain (overrides `bootstrap`).
            spans: with neither, run all blocks in this process, split into these spans.
            tuning_mode: None, "ptune" or "deep_ptune": add trainable prompts of `pre_seq_len` positions.
            adapter: the name of a LoRA adapter to apply on the servers (only servers announcing it are used).
            Further keywords go to the chain (e.g. `codec`, `wait_for_blocks_s` for a swarm; `swarm_key`, a
            `petalnode.swarm_key.SwarmKey` or the path of a key file, to join a private swarm; `verify`, "off",
            "sample" (the default for a swarm) or "full", how much of the servers' work is re-checked on other
            servers, see `petalnode.node.VerifyMode`).
        """
        info = load_model_info(model)
        head = load_client_head(info, dtype=dtype, device=device)
        if chain is None:
            if bootstrap:
                from petalnode.node import RemoteBlockChain  # the swarm client (node package)

                chain = RemoteBlockChain.connect(info, bootstrap=bootstrap, dtype=dtype, **chain_options)
            else:
                chain = LocalBlockChain(info, spans=spans, dtype=dtype, device=device)
        prompt_tuning = None
        if tuning_mode is not None:
            prompt_tuning = PromptTuning(
                tuning_mode, pre_seq_len, info.hidden_size, info.num_blocks,
                init_std=float(getattr(info.config, "initializer_range", 0.02)),
            ).to(device)
        instance = cls(info.config, head, chain, prompt_tuning=prompt_tuning, adapter=adapter,
                       **(_init_kwargs or {}))
        instance.model_info = info
        instance.generation_config = _generation_config(info.source.path, info.config)
        instance.eval()
        return instance

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.prompt_tuning is None else self.prompt_tuning.pre_seq_len

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
        deep = None if self.prompt_tuning is None else self.prompt_tuning.deep()
        session = self.chain.open_session(
            max_length + self.pre_seq_len, batch_size=batch_size, adapter=self.adapter,
            prompts=None if deep is None else deep.detach(),
        )
        self._active = _ActiveSession(session=session, max_length=max_length)
        try:
            yield session
        finally:
            self._active = None
            session.close()

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if self._active is not None:
            return self._generate_checked(inputs, kwargs)
        if input_ids is None:
            raise BadRequestError("generate() needs input_ids")
        max_new = kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens
        if max_new is None:
            max_length = kwargs.get("max_length") or self.generation_config.max_length or input_ids.shape[1] + 20
        else:
            max_length = input_ids.shape[1] + int(max_new)
        # Assisted generation / prompt lookup verifies drafted tokens past the current length: leave them room.
        max_length += _draft_room(kwargs, self.generation_config)
        with self.inference_session(max_length=max_length, batch_size=input_ids.shape[0]):
            return self._generate_checked(inputs, kwargs)

    def _generate_checked(self, inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        """transformers' generate in the active session; with a verifying swarm, every position is checked before
        returning, and after a rollback (a server lied and was banned) generation resumes from the last token
        that came from checked outputs, so the result equals what an honest swarm gives."""
        active = self._active
        assert active is not None
        verify = getattr(active.session, "verify", None)
        kwargs = dict(kwargs)
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if ids is None:
            active.new_generate_call = True
            return super().generate(ids, **kwargs)
        offset = self._call_offset(active, ids)
        if verify is None:
            active.new_generate_call = True
            return self._keep_unfed(active, super().generate(ids, **kwargs), offset)
        call_start = 0 if active.history is None else active.history.shape[1]
        max_new = _max_new_tokens(kwargs, self.generation_config, ids.shape[1])
        generated = ids[:, :0]
        for _ in range(MAX_VERIFICATION_RERUNS + 1):
            call_ids = torch.cat([ids, generated], dim=1)
            call_kwargs = _remaining(kwargs, generated.shape[1], max_new)
            if generated.shape[1] and _ended(generated, kwargs, self.generation_config):
                call_kwargs = None  # the checked tokens already end with EOS: an honest swarm stops there too
            active.new_generate_call = True
            try:
                output = call_ids if call_kwargs is None else super().generate(call_ids, **call_kwargs)
                verify()
                return self._keep_unfed(active, output, offset)
            except VerificationRollback as e:
                generated = self._resume_after_rollback(active, e.position, offset, call_start, ids)
        raise InvalidStateError(f"generation rolled back {MAX_VERIFICATION_RERUNS} times: servers keep disagreeing")

    @staticmethod
    def _call_offset(active: _ActiveSession, ids: torch.Tensor) -> int:
        """Where a generate() call's input starts in the session's token history (see _skip_known_prefix): at 0
        when it repeats the whole history, else after the history and the pending tokens fed before it."""
        history = active.history
        if history is None:
            return 0
        known = history.shape[1]
        if ids.shape[1] > known and torch.equal(ids[:, :known], history):
            return 0
        return known + (0 if active.pending is None else active.pending.shape[1])

    @staticmethod
    def _keep_unfed(active: _ActiveSession, output: Any, offset: int) -> Any:
        """Remember the call's tokens that were never fed (the last one sampled) for the next call; return output
        (a tensor, or transformers' output object with `sequences`)."""
        sequences = output.sequences if hasattr(output, "sequences") else output
        fed = 0 if active.history is None else active.history.shape[1]
        pending = sequences[:, max(0, fed - offset) :]
        active.pending = pending if pending.shape[1] else None
        return output

    def _resume_after_rollback(self, active: _ActiveSession, position: int, offset: int, call_start: int,
                               ids: torch.Tensor) -> torch.Tensor:
        """The caches now hold positions [0, position): keep the tokens that came from checked outputs, and
        return the tokens this call had generated before them (the next run continues after those)."""
        token = position - self.pre_seq_len if self.prompt_tuning is not None else position
        history = active.history
        if history is None or token < call_start or token >= history.shape[1]:
            raise InvalidStateError(f"verification rolled the session back to position {position}, outside this "
                                    "generate() call; start the generation again")
        if token < offset:  # into the tokens fed before this call's input: feed them again first
            log.warning("verification: a server returned wrong hidden states; it was banned and generation "
                        "restarts from this call's first token")
            active.pending = history[:, token:offset]
            active.history = history[:, :token]
            return ids[:, :0]
        log.warning("verification: a server returned wrong hidden states; it was banned and generation resumes "
                    "from token %d (%d tokens already streamed are retracted)", token - offset,
                    history.shape[1] - token)
        valid = history[:, : token + 1]  # the token at `position` was chosen from a checked output
        active.history = history[:, :token]
        active.skip_next = token - offset
        return valid[:, offset + ids.shape[1] :]

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
        hidden = self._hidden_states(input_ids, attention_mask, inputs_embeds)
        logits = self.head.logits(hidden, logits_to_keep)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        cache = kwargs.get("cache", past_key_values)  # newer transformers 5.x pass (and name) it `cache`
        if self._active is not None:
            cache = self._active.cache
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: cache})

    def _hidden_states(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """The last block's output for the input positions (prompt positions removed); differentiable."""
        active = self._active
        _check_padding(attention_mask, allow_right_padding=active is None)
        start = None if active is None else active.session.position
        if active is not None:
            if active.new_generate_call:
                active.cache.to_remove = 0
            # Draft tokens transformers cropped after the last step (rejected): start that many positions earlier.
            start, active.cache.to_remove = max(0, active.session.position - active.cache.to_remove), 0
        if active is not None and input_ids is not None:
            first_call, given = active.new_generate_call, input_ids.shape[1]
            input_ids = self._skip_known_prefix(active, input_ids)
            if first_call:  # the fed tokens end with the call's last one
                active.cache.base = start + input_ids.shape[1] - given
        if inputs_embeds is None:
            if input_ids is None:
                raise BadRequestError("forward() needs input_ids or inputs_embeds")
            inputs_embeds = self.head.embed(input_ids)
        tuning = self.prompt_tuning
        prefix = 0
        if tuning is not None and (active is None or start == 0):
            inputs_embeds = torch.cat([tuning.shallow(inputs_embeds.shape[0]).to(inputs_embeds.dtype),
                                       inputs_embeds], dim=1)
            prefix = tuning.pre_seq_len
            if active is not None:
                active.cache.base += prefix
        if active is None:
            deep = None if tuning is None else tuning.deep()
            hidden = self.chain.forward(inputs_embeds, prompts=deep, adapter=self.adapter)
        else:
            assert start is not None
            hidden = active.session.step(inputs_embeds, start_position=start)
            if input_ids is not None:
                # A start before the end of the history (drafts rejected) forgets the tokens after it.
                kept = None if active.history is None else active.history[:, : max(0, start - self.pre_seq_len)
                                                                          if tuning is not None else start]
                active.history = input_ids if kept is None else torch.cat([kept, input_ids], 1)
            active.cache.length = active.session.position - active.cache.base
        return hidden[:, prefix:]

    @staticmethod
    def _skip_known_prefix(active: _ActiveSession, input_ids: torch.Tensor) -> torch.Tensor:
        """On a new generate() call in a multi-turn session, drop the part of the input the caches already hold."""
        first_call, active.new_generate_call = active.new_generate_call, False
        if first_call and active.skip_next is not None:
            skip, active.skip_next = active.skip_next, None
            return input_ids[:, skip:]
        history = active.history
        if not first_call or history is None:
            return input_ids
        pending, active.pending = active.pending, None
        known = history.shape[1]
        if input_ids.shape[1] > known and torch.equal(input_ids[:, :known], history):
            return input_ids[:, known:]
        # Only the new turn was passed: the previous turn's last token was never fed, so it goes first.
        return input_ids if pending is None else torch.cat([pending.to(input_ids.device), input_ids], dim=1)

    def close(self) -> None:
        self.chain.close()


class DistributedModelForSequenceClassification(DistributedModelForCausalLM):
    """Classification with a trainable head on the client: the last real token's final hidden state -> labels.

    As transformers' `LlamaForSequenceClassification`: final norm, a bias-free linear `score`, pooled at each
    row's last non-padding token (right padding, given by `attention_mask`). Loss: cross-entropy for integer
    labels, mean squared error when `num_labels == 1`, BCE-with-logits for float multi-label targets.
    """

    def __init__(self, config: PretrainedConfig, head: torch.nn.Module, chain: BlockChain, *,
                 num_labels: int = 2, **kwargs: Any) -> None:
        super().__init__(config, head, chain, **kwargs)
        self.num_labels = num_labels
        self.score = torch.nn.Linear(config.hidden_size, num_labels, bias=False)
        torch.nn.init.normal_(self.score.weight, std=float(getattr(config, "initializer_range", 0.02)))

    @classmethod
    def from_pretrained(cls, model: Any = None, *, num_labels: int = 2, **kwargs: Any) -> Any:  # type: ignore[override]
        """As the causal LM's, plus `num_labels` (the head is freshly initialised: train it)."""
        return super().from_pretrained(model, _init_kwargs={"num_labels": num_labels}, **kwargs)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        if self._active is not None:
            raise InvalidStateError("sequence classification runs outside inference sessions")
        hidden = self._hidden_states(input_ids, attention_mask, inputs_embeds)
        if attention_mask is not None:
            last = attention_mask.sum(dim=1).long() - 1
        else:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long)
        pooled = self.head.norm(hidden[torch.arange(hidden.shape[0]), last])
        logits = self.score(pooled.to(self.score.weight.dtype))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif labels.dtype in (torch.long, torch.int):
                loss = torch.nn.functional.cross_entropy(logits.float(), labels.view(-1))
            else:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)


def _max_new_tokens(kwargs: dict[str, Any], config: GenerationConfig, input_length: int) -> int:
    """How many tokens a generate() call asks for (max_new_tokens, else max_length, else the model's config)."""
    if kwargs.get("max_new_tokens") is not None:
        return int(kwargs["max_new_tokens"])
    if kwargs.get("max_length") is not None:
        return int(kwargs["max_length"]) - input_length
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return int(config.max_length or input_length + 20) - input_length


def _draft_room(kwargs: dict[str, Any], config: GenerationConfig) -> int:
    """Positions past max_new_tokens that assisted generation or prompt lookup may draft into."""
    if kwargs.get("prompt_lookup_num_tokens") is not None:
        return int(kwargs["prompt_lookup_num_tokens"])
    if kwargs.get("assistant_model") is not None or kwargs.get("assistant_tokenizer") is not None:
        return int(kwargs.get("num_assistant_tokens") or config.num_assistant_tokens or 20)
    return 0


def _ended(generated: torch.Tensor, kwargs: dict[str, Any], config: GenerationConfig) -> bool:
    """Every row's last generated token is an end-of-sequence token."""
    eos = kwargs.get("eos_token_id", config.eos_token_id)
    if eos is None:
        return False
    ids = torch.tensor([eos] if isinstance(eos, int) else list(eos))
    return bool(torch.isin(generated[:, -1], ids).all())


def _remaining(kwargs: dict[str, Any], done: int, max_new: int) -> dict[str, Any] | None:
    """The keywords of a re-run that already has `done` tokens (None: nothing is left to generate)."""
    if done == 0:
        return kwargs
    if done >= max_new:
        return None
    rest = {k: v for k, v in kwargs.items() if k != "max_length"}
    rest["max_new_tokens"] = max_new - done
    if rest.get("min_new_tokens") is not None:
        rest["min_new_tokens"] = max(0, int(rest["min_new_tokens"]) - done)
    return rest


def _check_padding(attention_mask: torch.Tensor | None, *, allow_right_padding: bool) -> None:
    """Right padding is exact without a mask in causal blocks (real tokens never see later pads); nothing else is."""
    if attention_mask is None or bool(attention_mask.all()):
        return
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    right_padded = torch.equal(mask, torch.arange(mask.shape[1])[None] < lengths[:, None]) and bool((lengths > 0).all())
    if not allow_right_padding or not right_padded:
        raise BadRequestError(
            "only right-padded batches are supported, and only outside generation (attention_mask must be ones "
            "followed by zeros in every row)"
        )


def _generation_config(path: Path, config: PretrainedConfig) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(config)


AutoDistributedModelForCausalLM = DistributedModelForCausalLM
AutoDistributedModelForSequenceClassification = DistributedModelForSequenceClassification

"""Tiny random-weight models of each supported family, built offline in well under a second.

They are real transformers checkpoints (config.json + model.safetensors + a BPE tokenizer trained here), so
every code path that loads a model directory is exercised without any download.
"""

from __future__ import annotations

from pathlib import Path

import torch

_CORPUS = (
    "The capital of France is Paris. The capital of Italy is Rome. Peers host blocks of a model and a "
    "distributed hash table tells clients who hosts which blocks. Hidden states travel between peers. "
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
)


def build_tokenizer(directory: Path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def build_tiny_model(
    directory: Path, *, family: str = "llama", num_layers: int = 6, hidden_size: int = 64, seed: int = 0,
    vocab_size: int = 384, tie_word_embeddings: bool = False,
) -> Path:
    """Write a random tiny model of `family` (llama, mistral or qwen2) into `directory`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init of norms is all ones; perturb them so a skipped or swapped norm cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(directory, vocab_size)
    return directory


def build_lora_adapter(directory: Path, base_dir: Path, *, seed: int = 0, **lora: object) -> Path:
    """Save a real PEFT LoRA adapter for the model in `base_dir` into `directory` (PEFT's own save_pretrained).

    `lora` goes to `peft.LoraConfig` (r, lora_alpha, target_modules, use_rslora, ...). A and B are random and
    nonzero (PEFT initializes B to zero), so the adapter really changes the outputs.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(directory)
    return directory

"""The client: a Hugging Face style model whose blocks run on a chain of spans or servers."""

from petalnode.client._chain import BlockChain, ChainSession, LocalBlockChain, even_spans
from petalnode.client._model import (
    AutoDistributedModelForCausalLM,
    AutoDistributedModelForSequenceClassification,
    DistributedModelForCausalLM,
    DistributedModelForSequenceClassification,
)
from petalnode.client._ptune import PromptTuning

__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "BlockChain",
    "ChainSession",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "LocalBlockChain",
    "PromptTuning",
    "even_spans",
]

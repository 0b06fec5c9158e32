"""The client: a Hugging Face style model whose blocks run on a chain of spans or servers."""

from petalnode.client._chain import BlockChain, ChainSession, LocalBlockChain, even_spans
from petalnode.client._model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM

__all__ = [
    "AutoDistributedModelForCausalLM",
    "BlockChain",
    "ChainSession",
    "DistributedModelForCausalLM",
    "LocalBlockChain",
    "even_spans",
]

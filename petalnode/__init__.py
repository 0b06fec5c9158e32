"""petalnode: run large language models across many ordinary machines, BitTorrent-style.

Importing the package is light (no torch): the DHT processes import it too. The Hugging Face style client is
`petalnode.client.AutoDistributedModelForCausalLM`; the daemon is `petalnode.node.Node`. `Timeouts` sets how
long each phase may take, for all of them.
"""

from petalnode._timeouts import DEFAULT_TIMEOUTS, Timeouts

__version__ = "0.1.0"

__all__ = ["DEFAULT_TIMEOUTS", "Timeouts", "__version__"]

"""petalnode.node."""

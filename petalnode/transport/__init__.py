"""petalnode.transport."""

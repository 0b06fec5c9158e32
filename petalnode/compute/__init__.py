"""petalnode.compute."""

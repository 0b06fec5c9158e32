"""petalnode."""

"""petalnode.codecs."""

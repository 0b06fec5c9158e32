"""petalnode.dht."""

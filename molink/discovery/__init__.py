"""Finding the nodes of a swarm: signed, expiring records in a DHT (hivemind's)."""

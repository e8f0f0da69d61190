"""Finding the nodes of a swarm: signed-later, expiring records in a DHT (hivemind's)."""

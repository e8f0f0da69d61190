"""Swarm membership and peer identity.

A swarm is the set of nodes that hold the same swarm key. Every member derives the same
certificate authority from the key, gives itself a fresh key pair and a certificate issued
by that authority, and speaks gRPC over mutual TLS that accepts only that authority's
certificates. A node's identity is its public key (``NodeIdentity.node_id``), which is what
authorization is keyed on: every member can issue certificates, so names inside a
certificate prove nothing, but only the holder of a private key can complete a TLS
handshake with its public key.
"""

# Submodules: swarm_key (the shared secret), authority (the derived CA), identity
# (NodeIdentity), credentials (gRPC credentials, peer_node_id), node_setup (a node's start).

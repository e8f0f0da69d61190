"""The wire: the versioned protocol, the tensor codec, gRPC channels and streams.

``PROTOCOL_VERSION`` is what nodes compare when one joins another; bump it whenever
``molink.proto`` changes in a way an older peer could misread.
"""

# 7: allowed_token_ids and bad words (an older last stage would ignore them); 6: a caller that expects a node id asks the peer to prove it holds that id's key (call
# metadata, molink.security.peer_proof); 5: heads sign their routes; 4: routes travel with
# steps, stages own their KV; 3: structured output, logit bias, prompt logprobs and
# per-sequence errors; 2: int8 outliers apart
PROTOCOL_VERSION = 7

# Call metadata key reserved for credentials (swarm key, tokens). Unused for now.
CREDENTIALS_METADATA_KEY = "molink-credentials"

__all__ = ["CREDENTIALS_METADATA_KEY", "PROTOCOL_VERSION"]

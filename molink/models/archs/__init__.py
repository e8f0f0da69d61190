"""One module per architecture; each exposes ``ARCHITECTURE`` (see molink.models.registry)."""

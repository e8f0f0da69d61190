"""MoLink: serve one LLM across machines joined by weak networks."""

__version__ = "0.1.0"

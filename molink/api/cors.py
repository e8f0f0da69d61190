"""Cross-origin access for browser pages (vLLM's --allowed-origins and friends).

vLLM allows every origin by default; here none is allowed unless the flags name some, so a
web page a user happens to open cannot read a server on their machine or network.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware


@dataclass(frozen=True)
class CorsPolicy:
    origins: tuple[str, ...]  # "*" for any
    allow_credentials: bool = False
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)


def install_cors(app: FastAPI, policy: CorsPolicy) -> None:
    """Added outside the API-key check: a preflight carries no key, and an error answer
    still needs the headers for the page to read it."""
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(policy.origins),
        allow_credentials=policy.allow_credentials,
        allow_methods=list(policy.methods),
        allow_headers=list(policy.headers),
    )

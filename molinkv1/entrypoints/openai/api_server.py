"""``python -m molinkv1.entrypoints.openai.api_server``: the OpenAI-compatible server.

Same flags and routes as ``molink serve``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from molinkv1.entrypoints import api_server


def main(argv: Sequence[str] | None = None) -> int:
    return api_server.main(argv, prog="molinkv1.entrypoints.openai.api_server")


if __name__ == "__main__":
    sys.exit(main())

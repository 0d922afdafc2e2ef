"""The container health check: exit 0 when ``/readyz`` on this container's port answers 200, else 1.

``python3 -m service.healthcheck`` in the Dockerfile's ``HEALTHCHECK`` and in the compose files. A module and
not inline ``python -c "..."`` code: Podman's Docker API (4.x) splits health-check arguments on spaces, which
turned the inline program into a syntax error (podman issue 26519); arguments without spaces mean the same
thing to every engine. Standard library only, so a check costs an interpreter start and one request.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PALIGEMMA_PORT', '8000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:  # connection refused, timeout, HTTPError (503 while starting or draining)
        sys.stderr.write(f"{url}: {error}\n")  # shown in `docker inspect` health log
        return 1


if __name__ == "__main__":
    sys.exit(main())

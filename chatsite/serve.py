"""Serve the site with daphne, with this site's WebSocket limits: ``python -m chatsite.serve -b HOST -p PORT``.

Any other daphne option may follow. The message and frame caps come from
CHAT_HARD_FRAME_BYTES, so daphne refuses an oversized frame (close 1009) as it
reads the frame's header, before any of it is buffered; the consumer's own
checks (CHAT_MAX_FRAME_BYTES and below) then never see more than that.
"""

from __future__ import annotations

import os
import sys

from daphne.cli import CommandLineInterface

APPLICATION = "chatsite.asgi:application"


def main(argv: list[str]) -> None:
    if any(arg.startswith("--proxy-headers") for arg in argv):
        # daphne would take X-Forwarded-For's leftmost entry, which the client writes itself.
        sys.exit("chatsite.serve: no --proxy-headers; set TRUSTED_PROXY_HOPS instead (README, Deploying)")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    from django.conf import settings

    limit = str(settings.CHAT_HARD_FRAME_BYTES)
    CommandLineInterface().run(
        [*argv, "--websocket-max-message-size", limit, "--websocket-max-frame-size", limit, APPLICATION]
    )


if __name__ == "__main__":
    main(sys.argv[1:])

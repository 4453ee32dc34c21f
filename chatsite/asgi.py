"""ASGI entry point: Django views over HTTP (bodies bounded first), ChatConsumer over WebSocket (served by daphne)."""

import logging
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
# Sets Django up; importing settings gets-or-starts the embedded servers.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from chat import services  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402
from chatsite.bodies import BodyLimit  # noqa: E402

logger = logging.getLogger("chatsite")

try:
    recovered = services.recover_stale()
    if recovered:
        logger.warning("marked %d reply(ies) left streaming by a stopped process as interrupted", recovered)
except Exception:  # noqa: BLE001 - start serving even if the database is not reachable yet
    logger.exception("could not check for interrupted replies at start-up")

http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.SERVE_STATIC else django_asgi_app
# Before Django, which reads a whole body into a spooled file before any view or login check runs.
http_app = BodyLimit(http_app)

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

import asyncio
import contextlib
import logging

from django.conf import settings
from django.core.management.base import BaseCommand
from procrastinate.contrib.django import app

from documents.tasks import QUEUE, retry_stalled_jobs

logger = logging.getLogger("documents.worker")


class Command(BaseCommand):
    help = (
        "Run a document ingestion worker: it takes queued documents from PostgreSQL, parses, splits, "
        "embeds and stores them, and reports progress to their owners' open pages. Run as many as you "
        "like, on any machine that reaches the database (and Redis, for live progress). A worker that "
        "dies mid-document stops sending heartbeats; after WORKER_STALLED_SECONDS another worker runs "
        "that document again. `make run` starts one beside the site."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--concurrency", type=int, default=1, help="documents processed at once (default 1: embedding is CPU-bound)"
        )
        parser.add_argument("--once", action="store_true", help="process what is queued, then exit")

    def handle(self, *args, concurrency: int, once: bool, **options) -> None:
        worker_connector = app.connector.get_worker_connector()
        with app.replace_connector(worker_connector):
            asyncio.run(self.work(concurrency, once))

    async def work(self, concurrency: int, once: bool) -> None:
        async with app.open_async():
            recovering = asyncio.create_task(self.recover())
            try:
                await app.run_worker_async(
                    **{
                        **settings.PROCRASTINATE_WORKER_DEFAULTS,
                        "queues": [QUEUE],
                        "concurrency": concurrency,
                        "wait": not once,
                        "name": "documents",
                    }
                )
            finally:
                recovering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await recovering

    async def recover(self) -> None:
        """Every few seconds: documents whose worker died are queued again (this worker runs them)."""
        while True:
            try:
                await retry_stalled_jobs(settings.WORKER_STALLED_SECONDS)
            except Exception:  # noqa: BLE001 - the database may be restarting; try again later
                logger.warning("could not look for stalled jobs", exc_info=True)
            await asyncio.sleep(max(1.0, settings.WORKER_STALLED_SECONDS / 3))

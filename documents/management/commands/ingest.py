import os
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from tqdm import tqdm

from documents import parsing, services
from documents.models import Document


class Command(BaseCommand):
    help = (
        "Ingest files and folders into the document index: parse, split, embed and store them, here "
        "and now (no worker needed), with a progress bar. Folders are walked for the supported types "
        f"({parsing.SUPPORTED}). A file already ingested with the same content is skipped (content "
        "hash); a changed one replaces its chunks once it is stored. A file that fails is reported with "
        "its reason (its previous version, if any, stays searched) and the rest go on. Each document "
        "is named by its path as given here."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
        owner = parser.add_mutually_exclusive_group(required=True)
        owner.add_argument("--user", metavar="USERNAME", help="the documents belong to this user")
        owner.add_argument("--shared", action="store_true", help="a knowledge base every user can search")
        parser.add_argument("--reingest", action="store_true", help="ingest unchanged files again too")
        parser.add_argument(
            "--threads",
            type=int,
            default=os.cpu_count() or 1,
            help="embedding threads (default: every core; the site's worker uses EMBEDDING_THREADS)",
        )

    def handle(
        self, *args, paths: list[str], user: str | None, shared: bool, reingest: bool, threads: int, **options
    ) -> None:
        settings.EMBEDDING_THREADS = threads
        owner = None
        if user:
            try:
                owner = get_user_model().objects.get(username=user)
            except get_user_model().DoesNotExist as exc:
                raise CommandError(f"No user {user!r}.") from exc
        files = list(self.walk(paths))
        started = time.monotonic()
        chunks = unchanged = 0
        timings: dict[str, float] = {}
        failures: list[tuple[Path, str]] = []
        bar = tqdm(files, unit="file", disable=None, file=self.stderr._out)
        for path in bar:
            bar.set_postfix_str(f"{chunks} chunks", refresh=False)
            try:
                data = path.read_bytes()
            except OSError as exc:
                failures.append((path, f"could not be read: {exc.strerror}"))
                continue
            with transaction.atomic():
                registered = services.register(owner, str(path), data, force=reingest)
            if registered.unchanged:
                unchanged += 1
                continue
            document = registered.document
            if document.status == Document.Status.QUEUED:
                document = services.ingest(document.pk, timings=timings)
            if document is None:
                continue
            if document.status == Document.Status.FAILED:
                kept = " (the previous version is still used)" if document.live_hash else ""
                failures.append((path, document.error + kept))
            else:
                chunks += document.chunk_count
        bar.close()
        for path, reason in failures:
            self.stderr.write(f"failed: {path}: {reason}")
        seconds = time.monotonic() - started
        self.stdout.write(
            f"{len(files)} files: {len(files) - unchanged - len(failures)} ingested ({chunks} chunks), "
            f"{unchanged} unchanged, {len(failures)} failed, in {seconds:.1f} s"
        )
        if timings:
            steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
            rate = chunks / timings["embed"] if timings.get("embed") else 0
            self.stdout.write(f"time by step: {steps} (embedding {rate:.1f} chunks/s)")

    def walk(self, paths: list[str]):
        for name in paths:
            path = Path(name)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and parsing.mime_type_for(p.name))
                yield from found
            else:
                yield path  # named on purpose: missing or of an unsupported type, it is reported

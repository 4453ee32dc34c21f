import asyncio
import json
import sys
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from documents import search


class Command(BaseCommand):
    help = (
        "Search the document index the way a chat turn does (rewrite, full text + vector fused, "
        "rerank) and print the ranked chunks. Searches the shared documents, and USER's own with "
        "--user. --json prints a list of {rank, document, source, chunk_id, score, text, ...}. "
        '--batch FILE reads one JSON object per line ({"question": ..., "history": [...]?}) and '
        "prints one JSON result list per line, in order, so an evaluation pays start-up once. "
        "--mode, --rewrite and --no-rerank change the pipeline from the settings' defaults "
        "(for comparing variants; the chat always uses the defaults)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("question", nargs="?", help="the question (omit with --batch)")
        parser.add_argument("--user", metavar="USERNAME", help="search this user's documents too")
        parser.add_argument("-k", type=int, default=5, help="how many chunks to print (default 5)")
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument("--batch", metavar="FILE", help="questions as JSON lines ('-' reads stdin)")
        parser.add_argument("--mode", choices=search.MODES, default="hybrid", help="default: hybrid")
        parser.add_argument("--rewrite", choices=search.REWRITES, help="default: RETRIEVAL_REWRITE")
        parser.add_argument("--no-rerank", action="store_true", help="skip the rerank stage")

    def handle(self, *args, question: str | None, user: str | None, k: int, batch: str | None, **options) -> None:
        if bool(question) == bool(batch):
            raise CommandError("Give a QUESTION or --batch FILE (not both).")
        user_id = None
        if user:
            try:
                user_id = get_user_model().objects.get(username=user).pk
            except get_user_model().DoesNotExist as exc:
                raise CommandError(f"No user {user!r}.") from exc
        how = search.Query.configured()
        how.mode = options["mode"]
        how.rewrite = options["rewrite"] or how.rewrite
        how.rerank = how.rerank and not options["no_rerank"]
        where = search.scope(user_id or 0)
        if not where:
            self.stderr.write("No ready documents to search.")
        if batch:
            lines = sys.stdin if batch == "-" else open(batch, encoding="utf-8")  # noqa: SIM115
            with lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                        asked, history = item["question"], item.get("history") or []
                    except (ValueError, KeyError, TypeError) as exc:
                        raise CommandError(f"{batch}:{number}: not a {{'question': ...}} JSON object") from exc
                    self.stdout.write(json.dumps(self.ranked(where, asked, history, how, k)))
                    self.stdout.flush()
            return
        hits = self.ranked(where, question, [], how, k)
        if options["json"]:
            self.stdout.write(json.dumps(hits, indent=2))
            return
        for hit in hits:
            place = f"{hit['source']}" + (f", page {hit['page']}" if hit["page"] else "")
            self.stdout.write(self.style.MIGRATE_HEADING(f"{hit['rank']}. {hit['document']} ({place})"))
            self.stdout.write(f"   score {hit['score']:.4f} · chunk {hit['chunk_id']} · {hit['heading']}")
            self.stdout.write(f"   {search.snippet(hit['text'], 300)}\n")

    def ranked(
        self, where: search.Scope, question: str, history: list[dict[str, str]], how: search.Query, k: int
    ) -> list[dict[str, Any]]:
        provider = None
        if how.rewrite == "llm":
            from chat.llm import get_provider

            provider = get_provider()
        query = asyncio.run(search.search_query(question, history, how.rewrite, provider))
        hits = search.pipeline(where, query, how, k)
        return [
            {
                "rank": rank,
                "document": hit.title,
                "source": hit.source,
                "chunk_id": hit.chunk_id,
                "score": round(hit.score, 6),
                "text": hit.text,
                "document_id": hit.document_id,
                "heading": hit.heading,
                "page": hit.page,
                "query": query,
            }
            for rank, hit in enumerate(hits, 1)
        ]

"""The sidebar with 10,000 conversations: the first page, a later page, and search, timed through
the same function the page's requests use (chat/sidebar.py), against a baseline in the same run:
the same search done with ILIKE on the same rows (what it costs without the indexes).

    .venv/bin/python bench/sidebar.py

It keeps its own database under var/bench/sidebar/ (seeded once: two users with 10,000
conversations of 6 messages each, 120,000 messages in all).
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONVERSATIONS = 10_000
MESSAGES = 6
WORDS = (
    "garden train invoice python session commit bicycle recipe tomato holiday budget meeting email "
    "report backup server kitchen paint window lesson guitar river mountain ticket contract insurance "
    "doctor school football camera laptop printer battery coffee flight hotel museum concert"
).split()
QUERIES = ["garden", "sess comm", "invoice budget", "zebra", "tom", "flight hotel museum"]


def seed() -> None:
    from django.contrib.auth.models import User
    from django.db import connection

    from chat.models import Conversation, Message

    if Conversation.objects.count() >= 2 * CONVERSATIONS:
        return
    rng = random.Random(7)
    for name in ("reader", "neighbour"):
        user, _ = User.objects.get_or_create(username=name)
        conversations = Conversation.objects.bulk_create(
            Conversation(owner=user, title=" ".join(rng.sample(WORDS, 3)).capitalize()) for _ in range(CONVERSATIONS)
        )
        Message.objects.bulk_create(
            (
                Message(conversation=c, role="user" if i % 2 == 0 else "assistant",
                        content=" ".join(rng.choices(WORDS, k=25)))
                for c in conversations
                for i in range(MESSAGES)
            ),
            batch_size=5000,
        )  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE chat_conversation")
        cursor.execute("ANALYZE chat_message")


def timed(fn, repeats: int = 20) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times) * 1000, times[int(0.95 * len(times))] * 1000


def main() -> int:
    os.environ.setdefault("CHATSITE_VAR_DIR", str(ROOT / "var" / "bench" / "sidebar"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db.models import Q

    from chat import sidebar
    from chat.models import Conversation, Message

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    seed()
    print(f"seeded / checked in {time.monotonic() - started:.0f} s: "
          f"{Conversation.objects.count()} conversations, {Message.objects.count()} messages")  # fmt: skip
    user = User.objects.get(username="reader")

    def ilike(q: str) -> list:
        words = q.split()
        title = Q()
        text = Q()
        for word in words:
            title &= Q(title__icontains=word)
            text &= Q(content__icontains=word)
        ids = Message.objects.filter(text, conversation__owner=user).values("conversation_id")
        return list(
            Conversation.objects.filter(owner=user)
            .filter(title | Q(pk__in=ids))
            .order_by("-updated_at", "-pk")[: sidebar.PAGE_SIZE]
        )

    first, following = sidebar.page(user)
    print("\n| request | p50 | p95 | baseline (ILIKE) p50 | results |")
    print("|---|---|---|---|---|")
    p50, p95 = timed(lambda: sidebar.page(user))
    print(f"| first page (50) | {p50:.1f} ms | {p95:.1f} ms | - | {len(first)} |")
    p50, p95 = timed(lambda: sidebar.page(user, before=following))
    print(f"| second page | {p50:.1f} ms | {p95:.1f} ms | - | {len(sidebar.page(user, before=following)[0])} |")
    for q in QUERIES:
        p50, p95 = timed(lambda q=q: sidebar.page(user, q))
        base, _ = timed(lambda q=q: ilike(q), repeats=5)
        found = len(sidebar.page(user, q)[0])
        print(f"| search `{q}` | {p50:.1f} ms | {p95:.1f} ms | {base:.0f} ms ({base / p50:.0f}x) | {found} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

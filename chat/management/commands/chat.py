import asyncio
import sys
import uuid
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from chat import services
from chat.flows.answer import new_store, run_answer
from chat.llm import ProviderError, get_provider
from chat.replies.stream import ReplyStream


class TerminalStream(ReplyStream):
    """A ReplyStream that writes to the terminal instead of a conversation group."""

    def __init__(self, reply_id: int, out, err) -> None:
        super().__init__(layer=None, conversation_id=0, reply_id=reply_id)
        self.out, self.err = out, err

    async def emit(self, delta: str) -> None:
        self.pending += delta
        await self.publish()  # no coalescing: the terminal wants every token

    async def send(self, *frames: dict[str, Any]) -> None:
        for frame in frames:
            self.show(frame)

    def show(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "chunk":
            self.out.write(frame["delta"])
            self.out.flush()
        elif frame["type"] == "status":
            self.err.write(f"[{frame['state'].replace('_', ' ')}]\n")
        elif frame["type"] == "done":
            self.out.write("\n")
            usage = frame["usage"]
            line = (
                f"[{frame['status']}; prompt tokens {usage['prompt_tokens']}, "
                f"completion tokens {usage['completion_tokens']}]"
            )
            if frame["error"]:
                line += f"\nerror ({frame['error']['code']}): {frame['error']['message']}"
            self.err.write(line + "\n")


class Command(BaseCommand):
    help = (
        "Send one message and stream the reply to stdout, through the same flow as the web chat. "
        "Handy for checking the configured model provider. The turn is saved as a new conversation "
        "of --user (created if missing)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("message", help="What to say.")
        parser.add_argument("--user", default="cli", help="Username that owns the conversation (default: cli).")

    def handle(self, *args, message: str, user: str, **options) -> None:
        owner, _ = get_user_model().objects.get_or_create(username=user)
        status = asyncio.run(self._turn(owner, message))
        if status != "complete":
            raise CommandError(f"the reply ended as {status}")

    async def _turn(self, owner, message: str) -> str:
        try:
            model_name = get_provider().model_name
        except ProviderError:
            model_name = ""
        client_id = str(uuid.uuid4())
        turn = await asyncio.to_thread(services.begin_turn, owner, None, client_id, message, None, model_name, "")
        shared = new_store(turn, TerminalStream(turn.reply.pk, sys.stdout, sys.stderr))
        await run_answer(shared)
        return shared["outcome"].status

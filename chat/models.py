from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector
from django.db import models
from django.db.models import Q


class Conversation(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, blank=True)
    # Answers search the owner's documents (and the shared ones); off: plain chat.
    use_documents = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Bumped on every new message, so "newest first" means "most recently active".
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [
            models.Index(fields=["owner", "-updated_at"], name="conversation_owner_recent"),
            # The sidebar's search (chat/sidebar.py): words, any language, prefix matches.
            GinIndex(SearchVector("title", config="simple"), name="conversation_title_search"),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class MessageQuerySet(models.QuerySet):
    def shown(self) -> "MessageQuerySet":
        """The messages still in their conversation: not taken out by an edit (``replaced_at``)."""
        return self.filter(replaced_at__isnull=True)


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming"
        COMPLETE = "complete"
        STOPPED = "stopped"
        ERROR = "error"
        # Left `streaming` by a process that died.
        INTERRUPTED = "interrupted"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    # Set by the client on user messages: a repeated send is recognised, not duplicated.
    client_id = models.UUIDField(null=True, blank=True)
    # An assistant message answers one user message; a regenerated reply answers the same one.
    reply_to = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="replies")
    sources = models.JSONField(default=list, blank=True)

    model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    first_token_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Time to first token")
    latency_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Total time of the reply")
    error_code = models.CharField(max_length=32, blank=True)
    error_message = models.TextField(blank=True)
    # What happened, for staff (admin); users see error_message, which names nothing about the deployment.
    error_detail = models.TextField(blank=True)

    # The channel-layer address of the running generation: `stop` from any process is sent there.
    control_channel = models.CharField(max_length=200, blank=True)
    # Set by `stop`; the generation also sees it at its next flush, even if the channel message is lost.
    stop_requested = models.BooleanField(default=False)

    # Set when an edit of this or an earlier user message took it out of the conversation: hidden
    # from the user, the model and search, and kept for admins (with its feedback).
    replaced_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    # Touched by every flush while streaming: an old value means the generating process died.
    updated_at = models.DateTimeField(auto_now=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["conversation", "created_at", "id"], name="message_conversation_order"),
            GinIndex(SearchVector("content", config="simple"), name="message_content_search"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "client_id"],
                condition=Q(client_id__isnull=False),
                name="message_client_id_unique_per_conversation",
            ),
            # One reply at a time per conversation, enforced across processes.
            models.UniqueConstraint(
                fields=["conversation"],
                condition=Q(status="streaming"),
                name="one_streaming_reply_per_conversation",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.pk}: {self.content[:60]}"


class Feedback(models.Model):
    """A user's thumbs up or down on a reply, with an optional comment: one per user and reply."""

    class Rating(models.IntegerChoices):
        GOOD = 1, "Good"
        BAD = -1, "Bad"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="feedback")
    rating = models.SmallIntegerField(choices=Rating.choices)
    comment = models.TextField(blank=True, max_length=2000)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        constraints = [models.UniqueConstraint(fields=["message", "user"], name="feedback_one_per_user_and_reply")]

    def __str__(self) -> str:
        return f"{self.get_rating_display()} on #{self.message_id}"

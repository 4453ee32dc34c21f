from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from procrastinate.contrib.django.models import ProcrastinateJob

from chat.llm.redact import redact
from chat.models import Conversation, Feedback, Message

USAGE_FIELDS = ("model", "prompt_tokens", "completion_tokens", "first_token_ms", "latency_ms")


class PermissionFirst:
    """Django's history view looks the object up before it checks the permission: staff without it got
    a redirect for an id that names nothing and 403 for a real one, so they could tell which ids exist.
    Checked first, both get 403 (tests/test_isolation.py)."""

    def history_view(self, request, object_id, extra_context=None):
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        return super().history_view(request, object_id, extra_context)


# The admins of other apps' models (registered before this module is imported, INSTALLED_APPS order).
for model in (get_user_model(), Group, ProcrastinateJob):
    registered = type(admin.site.get_model_admin(model))
    admin.site.unregister(model)
    admin.site.register(model, type(registered.__name__, (PermissionFirst, registered), {}))


@admin.display(description="sources")
def cited_sources(message: Message) -> str:
    """The passages the reply's prompt held, numbered as the reply cites them, each linked to its chunk."""
    if not message.sources:
        return "—"
    return format_html(
        "<ol>{}</ol>",  # no inline style: the Content-Security-Policy refuses it
        format_html_join(
            "",
            "<li value='{}'><a href='{}'>{}</a> <small>{}</small></li>",
            (
                (
                    source.get("n"),
                    reverse("admin:documents_chunk_change", args=[source.get("chunk_id")]),
                    source.get("title"),
                    source.get("heading") or "",
                )
                for source in message.sources
            ),
        ),
    )


@admin.display(description="error detail")
def error_detail(message: Message) -> str:
    """Redacted again when shown: rows written before details were redacted may hold a provider URL's credentials."""
    return redact(message.error_detail)


class MessageInline(admin.TabularInline):
    model = Message
    fk_name = "conversation"
    extra = 0
    can_delete = False
    fields = (
        "created_at",
        "role",
        "status",
        "replaced_at",
        "content",
        cited_sources,
        *USAGE_FIELDS,
        "error_code",
        error_detail,
    )
    readonly_fields = fields
    ordering = ("created_at", "id")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(PermissionFirst, admin.ModelAdmin):
    list_display = ("title", "owner", "message_count", "tokens", "created_at", "updated_at")
    list_filter = ("owner", "created_at", "messages__status")
    search_fields = ("title", "messages__content", "owner__username")
    date_hierarchy = "created_at"
    inlines = [MessageInline]
    readonly_fields = ("owner", "created_at", "updated_at")

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("owner")
            .annotate(
                _messages=Count("messages", distinct=True),
                _tokens=Coalesce(Sum("messages__prompt_tokens"), 0) + Coalesce(Sum("messages__completion_tokens"), 0),
            )
        )

    @admin.display(ordering="_messages", description="messages")
    def message_count(self, obj: Conversation) -> int:
        return obj._messages

    @admin.display(ordering="_tokens", description="tokens")
    def tokens(self, obj: Conversation) -> int | None:
        return obj._tokens


@admin.register(Message)
class MessageAdmin(PermissionFirst, admin.ModelAdmin):
    list_display = ("id", "conversation", "role", "status", "short_content", *USAGE_FIELDS, "created_at")
    list_filter = (
        "status",
        "role",
        ("replaced_at", admin.EmptyFieldListFilter),
        "conversation__owner",
        "created_at",
        "model",
    )
    search_fields = ("content", "conversation__title")
    date_hierarchy = "created_at"
    list_select_related = ("conversation",)
    exclude = ["error_detail"]  # shown redacted, by error_detail() below
    readonly_fields = [
        *(f.name for f in Message._meta.fields if f.name not in ("sources", "error_detail")),
        cited_sources,
        error_detail,
    ]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:80]


@admin.register(Feedback)
class FeedbackAdmin(PermissionFirst, admin.ModelAdmin):
    list_display = ("rating", "model", "short_comment", "reply", "user", "updated_at")
    list_filter = ("rating", "message__model", "updated_at", "user")
    search_fields = ("comment", "message__content", "user__username")
    date_hierarchy = "updated_at"
    list_select_related = ("message", "user")
    readonly_fields = ("message", "user", "rating", "comment", "created_at", "updated_at")
    # The changelist shows good / bad counts per model above the list (templates/admin/chat/feedback/).
    change_list_template = "admin/chat/feedback/change_list.html"

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(ordering="message__model", description="model")
    def model(self, obj: Feedback) -> str:
        return obj.message.model

    @admin.display(description="comment")
    def short_comment(self, obj: Feedback) -> str:
        return obj.comment[:80]

    @admin.display(description="reply")
    def reply(self, obj: Feedback) -> str:
        url = reverse("admin:chat_message_change", args=[obj.message_id])
        return format_html("<a href='{}'>#{}</a> {}", url, obj.message_id, obj.message.content[:60])

    def changelist_view(self, request, extra_context=None):
        per_model = (
            Feedback.objects.values("message__model")
            .annotate(good=Count("pk", filter=Q(rating=1)), bad=Count("pk", filter=Q(rating=-1)))
            .order_by("message__model")
        )
        return super().changelist_view(request, {**(extra_context or {}), "per_model": per_model})

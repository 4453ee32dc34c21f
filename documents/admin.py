from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from chat.admin import PermissionFirst
from documents.models import Chunk, Document


@admin.register(Document)
class DocumentAdmin(PermissionFirst, admin.ModelAdmin):
    list_display = ("title", "owner", "status", "chunk_count", "mime_type", "size", "embedding_model", "updated_at")
    list_filter = ("status", "mime_type", "embedding_model", ("owner", admin.EmptyFieldListFilter))
    search_fields = ("title", "source", "owner__username", "content_hash", "live_hash")
    readonly_fields = (
        "chunks",
        "content_hash",
        "live_hash",
        "size",
        "mime_type",
        "status",
        "error",
        "chunk_count",
        "embedding_model",
        "embedding_dimensions",
        "attempts",
        "created_at",
        "updated_at",
    )
    raw_id_fields = ("owner",)

    @admin.display(description="chunks")
    def chunks(self, document: Document) -> str:
        # A link, not an inline: a long manual has thousands of chunks.
        url = reverse("admin:documents_chunk_changelist") + f"?document__id__exact={document.pk}"
        return format_html('<a href="{}">{} chunks</a>', url, document.chunk_count)


@admin.register(Chunk)
class ChunkAdmin(PermissionFirst, admin.ModelAdmin):
    list_display = ("document", "ordinal", "heading", "page", "token_count")
    search_fields = ("text", "heading", "document__title")
    raw_id_fields = ("document",)
    exclude = ("embedding",)
    readonly_fields = ("document", "ordinal", "heading", "page", "token_count", "char_start", "char_end", "text")

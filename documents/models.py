"""Documents and their chunks: what is searched, and what a citation points into."""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from django.db.models import Q
from django.utils import timezone
from pgvector.django import HnswIndex, VectorField

# The vector column's size. The offline embedder (MiniLM) makes 384; a remote endpoint is asked
# for vectors of this size (OpenAI's text-embedding-3 models take a `dimensions` argument).
EMBEDDING_DIMENSIONS = 384


class DocumentQuerySet(models.QuerySet):
    def visible_to(self, user) -> DocumentQuerySet:
        """What ``user`` may search: their own documents and the shared ones."""
        return self.filter(Q(owner=user) | Q(owner__isnull=True))

    def live(self) -> DocumentQuerySet:
        """Documents with a version in the index (its chunks and text), whatever their latest upload."""
        return self.exclude(live_hash="")

    def searchable(self) -> DocumentQuerySet:
        """Live documents whose vectors the configured embedder can be compared with."""
        from documents.embedding import configured_model_name

        return self.live().filter(embedding_model=configured_model_name())

    def waiting_for_reembed(self) -> DocumentQuerySet:
        """Live documents embedded by another model: left out of search until ``manage.py reembed``."""
        from documents.embedding import configured_model_name

        return self.live().exclude(embedding_model=configured_model_name())


class Document(models.Model):
    """A document and its versions: the *live* one, whose chunks and text are searched and cited
    (``live_hash``), and the latest upload (``content_hash``, ``status``, ``error``), which
    replaces the live one only once it is ready (Store, in one transaction). A new version that
    fails leaves the live one as it was.

    The fields about what is searched (title, mime_type, size, chunk_count, embedding_*) describe
    the live version once there is one; before, the first upload.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        PROCESSING = "processing"
        READY = "ready"
        FAILED = "failed"

    # No owner: a shared document, searchable by every user (``manage.py ingest --shared``).
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="documents"
    )
    title = models.CharField(max_length=300)
    # The upload's file name, or the path given to ``manage.py ingest``: with the owner, it names
    # the document, so ingesting the same source again replaces it.
    source = models.CharField(max_length=1000)
    content_hash = models.CharField(
        max_length=64, blank=True, help_text="sha256 of the latest upload's bytes (empty: refused unread)"
    )
    live_hash = models.CharField(
        max_length=64, blank=True, default="", help_text="sha256 of the version searched (empty: none yet)"
    )
    mime_type = models.CharField(max_length=100)
    size = models.PositiveBigIntegerField(help_text="bytes")
    status = models.CharField(
        max_length=20, choices=Status.choices, default=Status.QUEUED, help_text="the latest upload's state"
    )
    error = models.TextField(blank=True, help_text="why the latest upload failed, as its owner sees it")
    chunk_count = models.PositiveIntegerField(default=0)
    # The chunks' vectors were made by this model; another model's vectors cannot be compared with them.
    embedding_model = models.CharField(max_length=200, blank=True)
    embedding_dimensions = models.PositiveIntegerField(null=True, blank=True)
    # Ingestion runs, counted when a worker starts one: bounds retries after workers die.
    attempts = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = DocumentQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "source"], nulls_distinct=False, name="document_source_unique"),
        ]

    def __str__(self) -> str:
        return self.title

    @property
    def waits_for_reembed(self) -> bool:
        from documents.embedding import configured_model_name

        return bool(self.live_hash) and self.embedding_model != configured_model_name()


class DocumentFile(models.Model):
    """The latest upload's bytes, in the database so that a worker on any machine can read them,
    and the live version's extracted text, which its chunks' character spans point into.

    Kept apart from ``Document`` so that listing documents never loads them.
    """

    document = models.OneToOneField(Document, on_delete=models.CASCADE, primary_key=True, related_name="file")
    data = models.BinaryField(help_text="the latest upload's bytes: what an ingestion run parses")
    text = models.TextField(blank=True, help_text="the live version's extracted text")


class Chunk(models.Model):
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    ordinal = models.PositiveIntegerField()
    text = models.TextField()
    token_count = models.PositiveIntegerField()
    # The headings above the chunk, outermost first, joined with " › ".
    heading = models.TextField(blank=True)
    # Where the chunk's text lies in the document's extracted text (code points), and its PDF page.
    char_start = models.PositiveIntegerField()
    char_end = models.PositiveIntegerField()
    page = models.PositiveIntegerField(null=True, blank=True)
    embedding = VectorField(dimensions=EMBEDDING_DIMENSIONS)
    # Headings weigh more than body text. Computed by PostgreSQL, so it can never disagree with the text.
    search = models.GeneratedField(
        expression=SearchVector("heading", weight="A", config="english")
        + SearchVector("text", weight="B", config="english"),
        output_field=SearchVectorField(),
        db_persist=True,
    )

    class Meta:
        ordering = ["document", "ordinal"]
        constraints = [models.UniqueConstraint(fields=["document", "ordinal"], name="chunk_ordinal_unique")]
        indexes = [
            HnswIndex(
                name="chunk_embedding_hnsw",
                fields=["embedding"],
                m=16,
                ef_construction=64,
                opclasses=["vector_cosine_ops"],
            ),
            GinIndex(fields=["search"], name="chunk_search_gin"),
        ]

    def __str__(self) -> str:
        return f"{self.document} #{self.ordinal}"


class Upload(models.Model):
    """A file accepted for ingestion, counted against its owner's daily quota (documents/quota.py).
    Rows older than the quota's window are deleted as the owner uploads again."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    size = models.PositiveBigIntegerField(help_text="bytes")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["owner", "created_at"], name="upload_owner_created")]

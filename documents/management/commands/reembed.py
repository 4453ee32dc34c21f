from django.core.management.base import BaseCommand
from django.db import transaction
from tqdm import tqdm

from documents.embedding import configured_model_name, get_embedder
from documents.models import Chunk, Document
from documents.splitting import embedded_text


class Command(BaseCommand):
    help = (
        "Re-embed the chunks of every document embedded with another model than the configured one "
        "(EMBEDDING_BASE_URL / EMBEDDING_MODEL, or the offline MiniLM). Vectors of two models cannot "
        "be compared, so such documents are left out of search until this has run. Chunks keep their "
        "text; each document's vectors are replaced in one transaction."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--all", action="store_true", help="re-embed every ready document, even current ones")

    def handle(self, *args, all: bool, **options) -> None:
        embedder = get_embedder()
        documents = Document.objects.filter(status=Document.Status.READY)
        if not all:
            documents = documents.exclude(embedding_model=configured_model_name())
        documents = list(documents.only("id", "title", "content_hash"))
        chunks = 0
        for document in tqdm(documents, unit="document", disable=None, file=self.stderr._out):
            rows = list(Chunk.objects.filter(document=document).only("id", "text", "heading").order_by("ordinal"))
            texts = [embedded_text(r.heading, r.text) for r in rows]
            vectors = embedder.embed(texts)
            with transaction.atomic():
                current = Document.objects.select_for_update().filter(pk=document.pk).first()
                if current is None or current.content_hash != document.content_hash:
                    continue  # deleted or re-ingested meanwhile (with the current model)
                for row, vector in zip(rows, vectors, strict=True):
                    row.embedding = vector
                Chunk.objects.bulk_update(rows, ["embedding"], batch_size=500)
                current.embedding_model, current.embedding_dimensions = embedder.name, embedder.dimensions
                current.save(update_fields=["embedding_model", "embedding_dimensions", "updated_at"])
            chunks += len(rows)
        self.stdout.write(f"{len(documents)} documents re-embedded with {embedder.name} ({chunks} chunks).")

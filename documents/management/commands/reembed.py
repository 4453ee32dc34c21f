from django.core.management.base import BaseCommand
from django.db import transaction
from tqdm import tqdm

from documents.embedding import get_embedder
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
        parser.add_argument("--all", action="store_true", help="re-embed every live document, even current ones")

    def handle(self, *args, all: bool, **options) -> None:
        embedder = get_embedder()
        # The live versions, whatever their latest upload is doing: those are what is searched.
        documents = Document.objects.live() if all else Document.objects.waiting_for_reembed()
        documents = list(documents.only("id", "title", "live_hash"))
        chunks = 0
        for document in tqdm(documents, unit="document", disable=None, file=self.stderr._out):
            rows = list(Chunk.objects.filter(document=document).only("id", "text", "heading").order_by("ordinal"))
            texts = [embedded_text(r.heading, r.text) for r in rows]
            vectors = embedder.embed(texts)
            with transaction.atomic():
                current = Document.objects.select_for_update().filter(pk=document.pk).first()
                if current is None or current.live_hash != document.live_hash:
                    continue  # deleted, or a new version stored meanwhile (with the current model)
                for row, vector in zip(rows, vectors, strict=True):
                    row.embedding = vector
                Chunk.objects.bulk_update(rows, ["embedding"], batch_size=500)
                current.embedding_model, current.embedding_dimensions = embedder.name, embedder.dimensions
                current.save(update_fields=["embedding_model", "embedding_dimensions", "updated_at"])
            chunks += len(rows)
        self.stdout.write(f"{len(documents)} documents re-embedded with {embedder.name} ({chunks} chunks).")

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.db.models.functions import Length, Substr
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from chat import protocol
from documents import services, tasks
from documents.models import Document, DocumentFile
from documents.parsing import MIME_TYPES, SUPPORTED

# One request carries at most this many files (the page sends them in groups of this size).
MAX_FILES_PER_UPLOAD = 20


@login_required
def index(request: HttpRequest) -> HttpResponse:
    documents = Document.objects.filter(owner=request.user).only(
        "id", "title", "source", "status", "error", "chunk_count", "size", "created_at"
    )
    return render(
        request,
        "documents/index.html",
        {
            "documents": documents,
            "shared_count": Document.objects.filter(owner__isnull=True, status=Document.Status.READY).count(),
            "max_bytes": settings.DOCUMENTS_MAX_UPLOAD_BYTES,
            "max_files": MAX_FILES_PER_UPLOAD,
            "supported": SUPPORTED,
            "accept": ",".join(sorted(MIME_TYPES)),
        },
    )


@login_required
@require_POST
def upload(request: HttpRequest) -> JsonResponse:
    """Files from the page: each is stored and queued (or refused with its reason), one JSON row per file."""
    files = request.FILES.getlist("files")
    if not files:
        return JsonResponse({"error": "No file was sent."}, status=400)
    if len(files) > MAX_FILES_PER_UPLOAD:
        return JsonResponse({"error": f"At most {MAX_FILES_PER_UPLOAD} files at once."}, status=400)
    room = settings.DOCUMENTS_LIMIT_PER_USER - Document.objects.filter(owner=request.user).count()
    if len(files) > room:
        return JsonResponse(
            {"error": f"You have reached the limit of {settings.DOCUMENTS_LIMIT_PER_USER} documents."}, status=429
        )
    rows = []
    for file in files:
        too_big = file.size > settings.DOCUMENTS_MAX_UPLOAD_BYTES
        data = b"" if too_big else file.read()
        with transaction.atomic():
            registered = services.register(request.user, file.name, data, size=file.size)
            if registered.document.status == Document.Status.QUEUED and not registered.unchanged:
                tasks.enqueue(registered.document)
        frame = protocol.document(registered.document)
        frame["unchanged"] = registered.unchanged
        rows.append(frame)
    return JsonResponse({"documents": rows})


# Text shown either side of a cited passage.
PASSAGE_CONTEXT_CHARS = 600


@login_required
def passage(request: HttpRequest, document_id: int) -> JsonResponse:
    """A cited passage (``start``..``end`` of the document's extracted text, from a source) with
    some text around it, for the page to show highlighted. Only a document the user may search."""
    document = get_object_or_404(
        Document.objects.visible_to(request.user).filter(status=Document.Status.READY), pk=document_id
    )
    try:
        start, end = int(request.GET["start"]), int(request.GET["end"])
    except (KeyError, ValueError):
        return JsonResponse({"error": "`start` and `end` must be character offsets."}, status=400)
    if not 0 <= start <= end:
        return JsonResponse({"error": "`start` and `end` must be character offsets."}, status=400)
    begin = max(0, start - PASSAGE_CONTEXT_CHARS)
    # Only the window is read from the database, not the whole text (SQL substr is 1-based).
    window = (
        DocumentFile.objects.filter(pk=document.pk)
        .annotate(window=Substr("text", begin + 1, end + PASSAGE_CONTEXT_CHARS - begin), length=Length("text"))
        .values("window", "length")
        .first()
    ) or {"window": "", "length": 0}
    text, length = window["window"], window["length"]
    first = start - begin
    cut = end - begin
    page = document.chunks.filter(char_start__lte=start, char_end__gt=start).values_list("page", flat=True).first()
    return JsonResponse(
        {
            "document_id": str(document.pk),
            "title": document.title,
            "page": page,
            "before": ("…" if begin > 0 else "") + text[:first],
            "passage": text[first:cut],
            "after": text[cut:] + ("…" if end + PASSAGE_CONTEXT_CHARS < length else ""),
        }
    )


@login_required
@require_POST
def delete(request: HttpRequest, document_id: int) -> HttpResponse:
    # Someone else's document is "not found", exactly like one that does not exist.
    document = get_object_or_404(Document, pk=document_id, owner=request.user)
    document.delete()  # its chunks and file go with it (a running job then stores nothing)
    if request.headers.get("Accept", "").startswith("application/json"):
        return JsonResponse({"deleted": str(document_id)})
    return redirect("documents:index")

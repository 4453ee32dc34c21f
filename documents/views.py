from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.db.models.functions import Length, Substr
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from chat import protocol
from documents import quota, services, tasks
from documents.models import Document, DocumentFile
from documents.parsing import MIME_TYPES, SUPPORTED

# One request carries at most this many files (the page sends them in groups of this size).
MAX_FILES_PER_UPLOAD = 20


@login_required
def index(request: HttpRequest) -> HttpResponse:
    documents = Document.objects.filter(owner=request.user).only(
        "id", "title", "source", "status", "error", "chunk_count", "size", "created_at", "live_hash", "embedding_model"
    )
    shared = Document.objects.filter(owner__isnull=True)
    return render(
        request,
        "documents/index.html",
        {
            "documents": documents,
            "shared_count": shared.searchable().count(),
            "shared_waiting": shared.waiting_for_reembed().count(),
            "max_bytes": settings.DOCUMENTS_MAX_UPLOAD_BYTES,
            "quota_files": settings.DOCUMENTS_QUOTA_FILES_PER_DAY,
            "quota_bytes": settings.DOCUMENTS_QUOTA_BYTES_PER_DAY,
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
        try:
            with transaction.atomic():
                registered = services.register(request.user, file.name, data, size=file.size)
                if registered.queued:
                    quota.charge(request.user, file.size)  # over the quota: all of this file is rolled back
                    tasks.enqueue(registered.document)
        except quota.Exceeded as exc:
            # The files before this one are stored and listed; this one and the rest are not.
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
            answer = {"error": str(exc), "retry_after": exc.retry_after, "documents": rows}
            return JsonResponse(answer, status=429, headers=headers)
        frame = protocol.document(registered.document)
        frame["unchanged"] = registered.unchanged
        rows.append(frame)
    return JsonResponse({"documents": rows})


# Text shown either side of a cited passage.
PASSAGE_CONTEXT_CHARS = 600


@login_required
def passage(request: HttpRequest, document_id: int) -> JsonResponse:
    """A cited passage (``start``..``end`` of the document's extracted text, from a source) with
    some text around it, for the page to show highlighted. Only a document the user may search, in
    its live version (whatever its latest upload is doing)."""
    document = get_object_or_404(Document.objects.visible_to(request.user).live(), pk=document_id)
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

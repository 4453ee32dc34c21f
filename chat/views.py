import json

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from chat import limits, logins, protocol, sidebar
from chat.models import Conversation, Feedback, Message


def model_note() -> str:
    if settings.LLM_PROVIDER == "local":
        return (
            "Answers come from a small offline model running on this server: "
            "fine for a demo, weak at facts and arithmetic. Point OPENAI_BASE_URL at a real model for more."
        )
    return f"Answers come from {settings.LLM_MODEL}."


def _chat_page(request: HttpRequest, current: Conversation | None) -> HttpResponse:
    # The first page, for the first paint; the page's script then takes over the list (search, more pages).
    conversations, _ = sidebar.page(request.user)
    return render(
        request,
        "chat/chat.html",
        {
            "conversations": conversations,
            "current": current,
            "max_chars": settings.CHAT_MAX_MESSAGE_CHARS,
            "model_note": model_note(),
        },
    )


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return _chat_page(request, None)


@login_required
def conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    # Someone else's conversation is a 404, the same as one that does not exist.
    current = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    return _chat_page(request, current)


def _too_many(request: HttpRequest, template: str, form, wait: int, message: str) -> HttpResponse:
    response = render(request, template, {"form": form, "throttled": message}, status=429)
    response["Retry-After"] = str(wait)
    return response


class LoginView(auth_views.LoginView):
    """Django's login; over the failed-login limits (chat/logins.py) it shows its form again with a 429."""

    def post(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            return super().post(request, *args, **kwargs)
        except logins.LoginThrottled as refused:
            # An unbound form: rendering a bound one would validate it, which authenticates again.
            form = self.get_form_class()(request, initial={"username": request.POST.get("username", "")})
            return _too_many(request, self.template_name, form, refused.retry_after, str(refused))


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("chat:home")
    form = UserCreationForm(request.POST or None)
    if request.method == "POST":
        wait = limits.signup_blocked(request)
        if wait is not None:
            message = f"Too many accounts were made from your address. Try again in {wait // 60 + 1} minutes."
            return _too_many(request, "registration/signup.html", form, wait, message)
        if form.is_valid():
            user = form.save()
            limits.signed_up(request)
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("chat:home")
    return render(request, "registration/signup.html", {"form": form})


# A comment longer than this is refused, not cut.
FEEDBACK_COMMENT_CHARS = 2000


@login_required
@require_POST
def feedback(request: HttpRequest, message_id: int) -> JsonResponse:
    """Thumbs up or down (``{"rating": 1 | -1, "comment": "..."}``) on one of the user's replies;
    sending again replaces it."""
    # Someone else's reply is "not found", exactly like one that does not exist.
    reply = get_object_or_404(Message, pk=message_id, role=Message.Role.ASSISTANT, conversation__owner=request.user)
    try:
        data = json.loads(request.body)
        rating = int(data["rating"])
        comment = str(data.get("comment") or "").strip()
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": 'Send {"rating": 1 or -1, "comment": optional text}.'}, status=400)
    if rating not in Feedback.Rating.values:
        return JsonResponse({"error": "`rating` must be 1 (good) or -1 (bad)."}, status=400)
    if len(comment) > FEEDBACK_COMMENT_CHARS:
        return JsonResponse({"error": f"Comments can be at most {FEEDBACK_COMMENT_CHARS} characters."}, status=400)
    Feedback.objects.update_or_create(message=reply, user=request.user, defaults={"rating": rating, "comment": comment})
    return JsonResponse({"message_id": str(reply.pk), "rating": rating, "comment": comment})


def _listed(conversation: Conversation) -> dict:
    return protocol.conversation(conversation)["conversation"]


def _tell_tabs(conversation: Conversation, deleted: bool = False) -> None:
    async_to_sync(sidebar.tell_tabs)(get_channel_layer(), conversation, deleted)


@login_required
def conversations(request: HttpRequest) -> JsonResponse:
    """The sidebar's list: ``?q=`` searches titles and message text, ``?before=`` is the cursor
    of the next page (``next`` in the answer; null on the last page)."""
    try:
        rows, following = sidebar.page(request.user, request.GET.get("q", "")[:200], request.GET.get("before", ""))
    except ValueError:
        return JsonResponse({"error": "`before` must be a cursor from a previous page."}, status=400)
    return JsonResponse({"conversations": [_listed(c) for c in rows], "next": following})


@login_required
@require_POST
def rename(request: HttpRequest, conversation_id: int) -> JsonResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    try:
        title = " ".join(str(json.loads(request.body)["title"]).split())
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": 'Send {"title": "..."}.'}, status=400)
    if not title:
        return JsonResponse({"error": "A title cannot be empty."}, status=400)
    max_length = Conversation._meta.get_field("title").max_length
    if len(title) > max_length:
        return JsonResponse({"error": f"Titles can be at most {max_length} characters."}, status=400)
    # update(): renaming is not activity, so the conversation keeps its place in the list.
    Conversation.objects.filter(pk=conversation.pk).update(title=title)
    conversation.title = title
    _tell_tabs(conversation)
    return JsonResponse(_listed(conversation))


@login_required
@require_POST
def delete(request: HttpRequest, conversation_id: int) -> JsonResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    # A reply still streaming there finds its row gone at its next write and stops (chat/replies/row.py).
    conversation.delete()
    conversation.pk = conversation_id  # delete() clears it
    _tell_tabs(conversation, deleted=True)
    return JsonResponse({"deleted": str(conversation_id)})

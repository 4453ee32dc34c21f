from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods

from chat.models import Conversation


def model_note() -> str:
    if settings.LLM_PROVIDER == "local":
        return (
            "Answers come from a small offline model running on this server: "
            "fine for a demo, weak at facts and arithmetic. Point OPENAI_BASE_URL at a real model for more."
        )
    return f"Answers come from {settings.LLM_MODEL}."


def _chat_page(request: HttpRequest, current: Conversation | None) -> HttpResponse:
    conversations = Conversation.objects.filter(owner=request.user).only("id", "title", "updated_at")[:200]
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


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("chat:home")
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect("chat:home")
    return render(request, "registration/signup.html", {"form": form})

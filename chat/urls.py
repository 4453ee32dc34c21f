from django.urls import path

from chat import views

app_name = "chat"
urlpatterns = [
    path("", views.home, name="home"),
    path("c/<int:conversation_id>/", views.conversation, name="conversation"),
    path("feedback/<int:message_id>/", views.feedback, name="feedback"),
    path("conversations/", views.conversations, name="conversations"),
    path("conversations/<int:conversation_id>/rename/", views.rename, name="rename"),
    path("conversations/<int:conversation_id>/delete/", views.delete, name="delete"),
]

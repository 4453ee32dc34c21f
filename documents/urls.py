from django.urls import path

from documents import views

app_name = "documents"
urlpatterns = [
    path("", views.index, name="index"),
    path("upload/", views.upload, name="upload"),
    path("<int:document_id>/delete/", views.delete, name="delete"),
    path("<int:document_id>/passage/", views.passage, name="passage"),
]

"""A document's live version (``live_hash``) apart from its latest upload, and the upload log the
daily quota counts.

Today's data keeps its meaning: a ``ready`` document was searched, so its current file is its
live version; any other was not searched (a queued re-upload's old chunks were hidden and its
text already blanked), so it has no live version yet.
"""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models
from django.db.models import F


def ready_documents_are_live(apps, schema_editor):
    Document = apps.get_model("documents", "Document")
    Document.objects.filter(status="ready").update(live_hash=F("content_hash"))


class Migration(migrations.Migration):
    dependencies = [
        ("documents", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="document",
            name="live_hash",
            field=models.CharField(
                blank=True, default="", help_text="sha256 of the version searched (empty: none yet)", max_length=64
            ),
        ),
        migrations.RunPython(ready_documents_are_live, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="document",
            name="content_hash",
            field=models.CharField(
                blank=True, help_text="sha256 of the latest upload's bytes (empty: refused unread)", max_length=64
            ),
        ),
        migrations.AlterField(
            model_name="document",
            name="error",
            field=models.TextField(blank=True, help_text="why the latest upload failed, as its owner sees it"),
        ),
        migrations.AlterField(
            model_name="document",
            name="status",
            field=models.CharField(
                choices=[("queued", "Queued"), ("processing", "Processing"), ("ready", "Ready"), ("failed", "Failed")],
                default="queued",
                help_text="the latest upload's state",
                max_length=20,
            ),
        ),
        migrations.AlterField(
            model_name="documentfile",
            name="data",
            field=models.BinaryField(help_text="the latest upload's bytes: what an ingestion run parses"),
        ),
        migrations.AlterField(
            model_name="documentfile",
            name="text",
            field=models.TextField(blank=True, help_text="the live version's extracted text"),
        ),
        migrations.CreateModel(
            name="Upload",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("size", models.PositiveBigIntegerField(help_text="bytes")),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "owner",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="+", to=settings.AUTH_USER_MODEL
                    ),
                ),
            ],
            options={
                "indexes": [models.Index(fields=["owner", "created_at"], name="upload_owner_created")],
            },
        ),
    ]

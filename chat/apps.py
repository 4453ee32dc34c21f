from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import post_migrate, pre_migrate


def _without_statement_timeout(using: str, **kwargs) -> None:
    """`migrate` may build an index over every chunk (HNSW over 100k chunks took 89 s): its connection runs
    without the statement time limit (DATABASE_STATEMENT_TIMEOUT), and gets it back afterwards."""
    with connections[using].cursor() as cursor:
        cursor.execute("SET statement_timeout = 0")
        # Nor the lock one: its ALTER TABLEs wait for a worker's Store transaction rather than fail.
        cursor.execute("SET lock_timeout = 0")


def _with_statement_timeout(using: str, **kwargs) -> None:
    with connections[using].cursor() as cursor:
        cursor.execute("RESET statement_timeout")  # back to the values the connection started with
        cursor.execute("RESET lock_timeout")


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_login_failed

        from chat import logins  # also registers its system check

        user_login_failed.connect(logins.count_failure, dispatch_uid="chat.logins.count_failure")
        pre_migrate.connect(_without_statement_timeout, dispatch_uid="chat.migrate_without_statement_timeout")
        post_migrate.connect(_with_statement_timeout, dispatch_uid="chat.migrate_with_statement_timeout")

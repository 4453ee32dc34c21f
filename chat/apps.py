from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_login_failed

        from chat import logins  # also registers its system check

        user_login_failed.connect(logins.count_failure, dispatch_uid="chat.logins.count_failure")

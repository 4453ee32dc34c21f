"""Deployment settings: `check --deploy` is clean with HTTPS=1, and the generated secret key is private."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.servers import ROOT

# No service is started: nothing here connects to them.
OFFLINE = {"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none", "REDIS_URL": "redis://127.0.0.1:1/0"}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "HTTPS", "SECRET_KEY", "ALLOWED_HOSTS"}}
    return subprocess.run(
        [sys.executable, *args], env={**environment, **OFFLINE, **env}, cwd=ROOT, capture_output=True, text=True
    )


def test_check_deploy_is_clean_with_https_a_real_key_and_hosts(tmp_path):
    env = {
        "CHATSITE_VAR_DIR": str(tmp_path),
        "SECRET_KEY": "k7Gq2vXw9pLr4tZs8bNm3cYh6fJd1eRu5aKo0iWl2xVb7nQp9sTg4yHz",
        "ALLOWED_HOSTS": "chat.example.com",
    }
    insecure = run(env, "manage.py", "check", "--deploy")
    assert "security.W004" in insecure.stderr  # without HTTPS=1: no HSTS, cookies over HTTP...
    clean = run({**env, "HTTPS": "1"}, "manage.py", "check", "--deploy")
    assert clean.returncode == 0, clean.stderr
    assert "System check identified no issues (0 silenced)." in clean.stdout, clean.stdout + clean.stderr


def test_the_generated_secret_key_is_made_once_private_and_whole(tmp_path):
    """Eight processes start at once on a fresh var/: one key, mode 0600, no temporary file left."""
    env = {"CHATSITE_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "chatsite.settings"}
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: run(env, "-c", code), range(8)))
    keys = {result.stdout.strip() for result in results}
    assert all(result.returncode == 0 for result in results), [r.stderr for r in results]
    assert len(keys) == 1 and len(keys.pop()) >= 50
    key_file = tmp_path / "secret_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("secret_key.*.tmp"))

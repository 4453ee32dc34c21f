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


def test_secrets_stay_out_of_the_docker_build_context(tmp_path):
    """The repository's .dockerignore, applied with Docker's own rules (docker-py's build context,
    the tar it sends): an .env file, its variants, keys and var/ (the generated secret key) are not
    in the context, so the Dockerfile's `COPY . .` cannot put them in the image; the code is."""
    import tarfile

    from docker.utils.build import tar

    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    secrets = [".env", ".env.production", "chatsite/.env", "deploy/.env.local", "tls.key", "certs/site.pem",
               "secrets/db-password", "var/secret_key"]  # fmt: skip
    code = ["manage.py", "requirements.txt", "chatsite/settings.py", "Dockerfile", "docs/env.md"]
    for name in secrets + code:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    with tarfile.open(fileobj=tar(str(tmp_path), exclude=patterns)) as context:
        sent = {member.name for member in context.getmembers() if member.isfile()}
    assert sent == set(code)
    # The image gets files only by COPY from this context (no ADD, no other stage): what the
    # context leaves out, the image cannot have.
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    copies = [line for line in dockerfile if line.startswith(("COPY", "ADD"))]
    assert "COPY . ." in copies and all(line.startswith("COPY") and "--from" not in line for line in copies)

"""Real server processes for end-to-end and browser tests."""

import http.cookiejar
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from chatsite import embedded

ROOT = Path(__file__).resolve().parent.parent
USERNAME = "erin"
PASSWORD = "e2e-pass-4821"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start_site(var: Path, llm_base_url: str):
    """Two daphne processes on a second embedded PostgreSQL + Valkey (given as DATABASE_URL / REDIS_URL).

    A generator: yields the two ports, stops everything when closed.
    """
    db = embedded.postgres(var)
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@{urllib.parse.quote(db['HOST'], safe='')}/postgres",
        "REDIS_URL": embedded.valkey(var),
        "CHATSITE_VAR_DIR": str(var),
        "OPENAI_BASE_URL": llm_base_url,
        "OPENAI_API_KEY": "test-key",
        "LLM_MODEL": "test-model",
        "ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
    }
    env.pop("LLM_PROVIDER", None)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], env=env, cwd=ROOT, check=True, capture_output=True)
    subprocess.run(
        [
            *manage,
            "shell",
            "-c",
            "from django.contrib.auth.models import User; "
            f"User.objects.create_user('{USERNAME}', password='{PASSWORD}')",
        ],
        env=env,
        cwd=ROOT,
        check=True,
    )
    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatsite.asgi:application"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(var / f"daphne-{port}.log", "w"),
        )
        for port in ports
    ]
    try:
        for port in ports:
            wait_for_http(f"http://127.0.0.1:{port}/accounts/login/")
        yield ports
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)
        embedded.stop_valkey(var)
        embedded.stop_postgres(var)


def login(port: int) -> str:
    """Log in through the HTML form, as a browser does; return the Cookie header."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"http://127.0.0.1:{port}/accounts/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"username": USERNAME, "password": PASSWORD, "csrfmiddlewaretoken": token}).encode()
    response = opener.open(f"http://127.0.0.1:{port}/accounts/login/", form)
    assert response.url.endswith("/"), "login did not redirect to the chat page"
    assert "sessionid" in {c.name for c in jar}
    return "; ".join(f"{c.name}={c.value}" for c in jar)

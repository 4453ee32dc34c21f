"""Failed-login and sign-up limits (chat/logins.py, chat/limits.py): on every login path, per the
address TRUSTED_PROXY_HOPS names, and with Redis gone."""

import http.cookiejar
import logging
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import redis
from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import RequestFactory
from django.urls import URLResolver, get_resolver

from chat import limits, logins
from chatsite import embedded, serve
from tests.servers import PASSWORD, USERNAME, free_port

pytestmark = pytest.mark.django_db


def fail(client, path: str, username: str, **headers) -> int:
    return client.post(path, {"username": username, "password": "wrong"}, **headers).status_code


def log_in(client, path: str, username: str, password: str, **headers):
    return client.post(path, {"username": username, "password": password}, **headers)


@pytest.fixture(autouse=True)
def long_window(settings):
    """Windows are fixed: a day-long one is not crossed by a test (the window test sets its own)."""
    settings.LOGIN_FAILURES_WINDOW = 24 * 3600


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("stella", password="right-pass-123", is_staff=True, is_superuser=True)


# --- every login path ---------------------------------------------------------------------------


def test_admin_login_meets_the_limit_and_then_refuses_the_right_password_until_the_window_ends(client, settings, staff):
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    settings.LOGIN_FAILURES_WINDOW = 12
    if 12 - time.time() % 12 < 9:  # the window is fixed: start near its beginning (each guess hashes a password)
        time.sleep(12 - time.time() % 12)
    for _ in range(3):
        assert fail(client, "/admin/login/", "stella") == 200
    refused = log_in(client, "/admin/login/", "stella", "right-pass-123")
    assert refused.status_code == 429 and 0 < int(refused["Retry-After"]) <= 12
    assert b"Too many failed attempts" in refused.content
    assert "_auth_user_id" not in client.session
    time.sleep(int(refused["Retry-After"]))
    assert log_in(client, "/admin/login/", "stella", "right-pass-123").status_code == 302
    assert client.session["_auth_user_id"] == str(staff.pk)


def test_failures_on_the_site_login_count_for_the_admin_login_and_back(client, settings, staff, django_user_model):
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    for _ in range(3):
        assert fail(client, "/accounts/login/", "stella") == 200
    assert log_in(client, "/admin/login/", "stella", "right-pass-123").status_code == 429

    django_user_model.objects.create_user("tom", password="right-pass-456")
    for _ in range(3):
        assert fail(client, "/admin/login/", "tom") == 200
    refused = log_in(client, "/accounts/login/", "tom", "right-pass-456")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert b"Too many failed attempts" in refused.content and b'value="tom"' in refused.content  # the form again


def test_per_address_failures_are_shared_by_the_login_paths(client, settings, staff):
    settings.LOGIN_FAILURES_PER_ADDRESS = 4
    for name in ("u1", "u2"):
        assert fail(client, "/accounts/login/", name) == 200
    for name in ("u3", "u4"):
        assert fail(client, "/admin/login/", name) == 200
    assert log_in(client, "/admin/login/", "stella", "right-pass-123").status_code == 429


def test_any_authenticate_call_meets_the_limit_and_counts(rf, settings, django_user_model, client):
    """A login path added later calls authenticate(): it is throttled and its failures count."""
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    django_user_model.objects.create_user("uma", password="right-pass-123")
    for _ in range(3):
        assert authenticate(None, username="uma", password="wrong") is None  # no request: the username only
    with pytest.raises(logins.LoginThrottled) as refused:
        authenticate(rf.post("/somewhere/"), username="uma", password="right-pass-123")
    assert refused.value.retry_after > 0
    assert log_in(client, "/accounts/login/", "uma", "right-pass-123").status_code == 429


def _plain_paths(patterns, prefix: str = ""):
    for pattern in patterns:
        route = str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from _plain_paths(pattern.url_patterns, prefix + route)
        elif not any(c in route for c in "<^(*$"):  # no arguments to make up
            yield "/" + prefix + route


def test_every_login_page_in_the_urlconf_is_throttled(client, settings, django_user_model):
    """Each page that asks for a username and a password (found in the URLconf, not listed here)."""
    settings.LOGIN_FAILURES_PER_USERNAME = 2
    pages = []
    for path in sorted(set(_plain_paths(get_resolver().url_patterns))):
        page = client.get(path)
        if page.status_code == 200 and b'name="password"' in page.content and b'name="username"' in page.content:
            pages.append(path)
    assert {"/accounts/login/", "/admin/login/"} <= set(pages)
    for i, path in enumerate(pages):
        name = f"staff{i}"
        django_user_model.objects.create_user(name, password="right-pass-123", is_staff=True)
        for _ in range(2):
            assert fail(client, path, name) == 200, path
        assert log_in(client, path, name, "right-pass-123").status_code == 429, path


def test_the_system_check_keeps_the_throttle_in_place(settings):
    call_command("check")  # as configured: no error
    settings.AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.ModelBackend"]
    with pytest.raises(SystemCheckError, match="chat.E001"):
        call_command("check")
    settings.AUTHENTICATION_BACKENDS = [logins.BACKEND, "django.contrib.auth.backends.ModelBackend"]
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if m != logins.MIDDLEWARE]
    with pytest.raises(SystemCheckError, match="chat.E002"):
        call_command("check")


# --- the client's address -----------------------------------------------------------------------


@pytest.mark.parametrize("hops", [0, 1])
def test_a_spoofed_forwarded_for_does_not_escape_the_per_address_login_limit(client, settings, django_user_model, hops):
    settings.TRUSTED_PROXY_HOPS = hops
    settings.LOGIN_FAILURES_PER_ADDRESS = 3
    django_user_model.objects.create_user("vic", password="right-pass-123")
    # hops = 1: a proxy that appends (the real address, rightmost); 0: the client talks to the site itself.
    real = "203.0.113.7" if hops else "127.0.0.1"

    def spoofed(i: int) -> dict:
        return {"HTTP_X_FORWARDED_FOR": f"198.51.100.{i}, {real}" if hops else f"198.51.100.{i}"}

    for i in range(3):  # a different username and a different leftmost address each time
        assert fail(client, "/accounts/login/", f"name{i}", **spoofed(i)) == 200
    assert log_in(client, "/accounts/login/", "vic", "right-pass-123", **spoofed(9)).status_code == 429
    if hops:  # the header is read: another client behind the same proxy is not blocked
        other = {"HTTP_X_FORWARDED_FOR": "198.51.100.1, 203.0.113.8"}
        assert log_in(client, "/accounts/login/", "vic", "right-pass-123", **other).status_code == 302


@pytest.mark.parametrize("hops", [0, 1])
def test_a_spoofed_forwarded_for_does_not_escape_the_signup_limit(client, settings, hops):
    settings.TRUSTED_PROXY_HOPS = hops
    settings.SIGNUP_LIMIT_PER_HOUR = 2
    real = "203.0.113.7" if hops else "127.0.0.1"

    def sign_up(name: str, i: int) -> int:
        form = {"username": name, "password1": "a-Long-pass-123", "password2": "a-Long-pass-123"}
        spoof = f"198.51.100.{i}, {real}" if hops else f"198.51.100.{i}"
        status = client.post("/accounts/signup/", form, HTTP_X_FORWARDED_FOR=spoof).status_code
        client.logout()
        return status

    assert sign_up("ann", 1) == 302 and sign_up("ben", 2) == 302
    assert sign_up("cat", 3) == 429
    assert not User.objects.filter(username="cat").exists()


@pytest.mark.parametrize(
    ("hops", "peer", "header", "address"),
    [
        (0, "192.0.2.1", "198.51.100.1", "192.0.2.1"),  # the header is ignored
        (1, "192.0.2.1", "198.51.100.1, 203.0.113.7", "203.0.113.7"),
        (2, "192.0.2.1", "198.51.100.1, 203.0.113.7, 192.0.2.9", "203.0.113.7"),
        (2, "192.0.2.1", "203.0.113.7", "203.0.113.7"),  # fewer entries than proxies: the farthest seen
        (1, "192.0.2.1", None, "192.0.2.1"),  # no header: the peer
        (1, "192.0.2.1", " , ", "192.0.2.1"),
        (0, "2001:db8:1:2:aaaa::1", None, "2001:db8:1:2::/64"),  # one host's whole /64 is one address
        (0, "::ffff:192.0.2.5", None, "192.0.2.5"),
        (1, "192.0.2.1", "unknown", "unknown"),
    ],
)
def test_client_address(settings, hops, peer, header, address):
    settings.TRUSTED_PROXY_HOPS = hops
    extra = {"REMOTE_ADDR": peer} | ({"HTTP_X_FORWARDED_FOR": header} if header is not None else {})
    assert limits.client_address(RequestFactory().get("/", **extra)) == address


def test_two_addresses_of_one_ipv6_host_share_the_limit(client, settings, django_user_model):
    settings.LOGIN_FAILURES_PER_ADDRESS = 2
    django_user_model.objects.create_user("wes", password="right-pass-123")
    for i in range(2):
        assert fail(client, "/accounts/login/", f"name{i}", REMOTE_ADDR=f"2001:db8:1:2::{i + 1}") == 200
    refused = log_in(client, "/accounts/login/", "wes", "right-pass-123", REMOTE_ADDR="2001:db8:1:2::99")
    assert refused.status_code == 429


def post_through_daphne(port: int, path: str, username: str, password: str, forwarded_for: str) -> int:
    """A browser's login post (its CSRF cookie and token) to a real daphne process, X-Forwarded-For spoofed."""

    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # a login's 302 is the answer, not a page to follow

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), Stay)
    page = opener.open(f"http://127.0.0.1:{port}{path}").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", form.encode(), {"X-Forwarded-For": forwarded_for}
    )
    try:
        return opener.open(request).status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.e2e
def test_daphne_as_served_counts_the_peer_not_a_spoofed_forwarded_for(site):
    """The site as chatsite.serve runs it (TRUSTED_PROXY_HOPS unset): 20 failures per address, from
    both processes, each with another leftmost X-Forwarded-For, and then the right password waits."""
    try:
        for i in range(20):
            port = site.ports[i % 2]
            assert post_through_daphne(port, "/admin/login/", f"guess{i}", "wrong", f"198.51.100.{i}") == 200
        assert post_through_daphne(site.ports[0], "/accounts/login/", USERNAME, PASSWORD, "198.51.100.99") == 429
    finally:  # the site outlives this test: its other tests log in from this address too
        client = redis.Redis.from_url(site.env["REDIS_URL"])
        for key in client.scan_iter("limit:*"):
            client.delete(key)
    assert post_through_daphne(site.ports[0], "/accounts/login/", USERNAME, PASSWORD, "198.51.100.99") == 302


def test_serve_refuses_daphnes_proxy_headers():
    with pytest.raises(SystemExit, match="TRUSTED_PROXY_HOPS"):
        serve.main(["-b", "127.0.0.1", "-p", "0", "--proxy-headers"])


# --- Redis gone -----------------------------------------------------------------------------------


@pytest.fixture
def limits_redis(settings):
    """Point the limits' Redis client at ``url`` (the channel layer is left alone)."""

    def point(url: str) -> None:
        settings.REDIS_URL = url
        limits._redis.cache_clear()
        limits._redis_down_until = 0.0

    yield point
    limits._redis.cache_clear()
    limits._redis_down_until = 0.0


@pytest.fixture
def own_valkey(tmp_path):
    """A Valkey of this test's own (to pause): its URL and its pid."""
    url = embedded.valkey(tmp_path)
    pid = int((tmp_path / "valkey.pid").read_text())
    yield url, pid
    os.kill(pid, signal.SIGCONT)
    embedded.stop_valkey(tmp_path)


@pytest.fixture
def unanswered_port():
    """A TCP port whose backlog is full: a connect() there hangs, as to a host that is gone."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    filler = socket.create_connection(server.getsockname())
    yield server.getsockname()[1]
    filler.close()
    server.close()


def fallback_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "chat.limits" and r.levelno == logging.WARNING and "counted in this process only" in r.getMessage()
    ]


def login_and_sign_up_without_redis(client, settings, django_user_model, caplog, error: str) -> None:
    """Log in and sign up (each within the time-out's bound), then meet both limits counted here."""
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    settings.SIGNUP_LIMIT_PER_HOUR = 1
    django_user_model.objects.create_user("xena", password="right-pass-123")
    start = time.monotonic()
    assert log_in(client, "/accounts/login/", "xena", "right-pass-123").status_code == 302
    # One time-out (then Redis is not asked for LIMITS_REDIS_RETRY_SECONDS), and a password hash.
    assert time.monotonic() - start < settings.LIMITS_REDIS_TIMEOUT + 3
    client.logout()
    form = {"username": "yan", "password1": "a-Long-pass-123", "password2": "a-Long-pass-123"}
    assert client.post("/accounts/signup/", form).status_code == 302
    client.logout()
    form = {"username": "zed", "password1": "a-Long-pass-123", "password2": "a-Long-pass-123"}
    assert client.post("/accounts/signup/", form).status_code == 429
    for _ in range(3):
        assert fail(client, "/accounts/login/", "xena") == 200
    assert log_in(client, "/accounts/login/", "xena", "right-pass-123").status_code == 429
    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1 and error in warnings[0], warnings  # once: Redis was not asked again meanwhile


def test_login_and_signup_work_while_redis_is_paused(
    client, settings, django_user_model, caplog, own_valkey, limits_redis
):
    url, pid = own_valkey
    settings.LIMITS_REDIS_TIMEOUT = 0.5
    settings.LIMITS_REDIS_RETRY_SECONDS = 60
    limits_redis(url)
    assert fail(client, "/accounts/login/", "someone") == 200
    assert redis.Redis.from_url(url).keys("limit:login:user:someone:*")  # counted in this Valkey while it answers
    os.kill(pid, signal.SIGSTOP)
    login_and_sign_up_without_redis(client, settings, django_user_model, caplog, "TimeoutError")


def test_login_and_signup_work_with_redis_refusing_connections(
    client, settings, django_user_model, caplog, limits_redis
):
    settings.LIMITS_REDIS_RETRY_SECONDS = 60
    limits_redis(f"redis://127.0.0.1:{free_port()}/0")
    login_and_sign_up_without_redis(client, settings, django_user_model, caplog, "ConnectionError")


def test_login_and_signup_work_when_redis_cannot_be_connected_to(
    client, settings, django_user_model, caplog, unanswered_port, limits_redis
):
    settings.LIMITS_REDIS_TIMEOUT = 0.5
    settings.LIMITS_REDIS_RETRY_SECONDS = 60
    limits_redis(f"redis://127.0.0.1:{unanswered_port}/0")
    login_and_sign_up_without_redis(client, settings, django_user_model, caplog, "TimeoutError")


def test_a_paused_redis_costs_one_time_out_then_is_not_asked(settings, own_valkey, limits_redis):
    url, pid = own_valkey
    settings.LIMITS_REDIS_TIMEOUT = 0.5
    settings.LIMITS_REDIS_RETRY_SECONDS = 60
    limits_redis(url)
    assert limits.hit("probe", 60)[0] == 1
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    assert limits.hit("probe", 60)[0] == 1  # counted here: this process had not counted it before
    waited = time.monotonic() - start
    assert 0.5 <= waited < 0.5 + 0.4  # one time-out: no retries, not REDIS_SOCKET_TIMEOUT's 10 s
    start = time.monotonic()
    assert limits.count("probe", 60)[0] == 1
    assert time.monotonic() - start < 0.05  # not asked again meanwhile


def test_counts_go_back_to_redis_when_it_answers_again(client, settings, caplog, own_valkey, limits_redis):
    url, pid = own_valkey
    settings.LIMITS_REDIS_TIMEOUT = 0.5
    settings.LIMITS_REDIS_RETRY_SECONDS = 1
    limits_redis(url)
    os.kill(pid, signal.SIGSTOP)
    assert fail(client, "/accounts/login/", "quinn") == 200
    assert fallback_warnings(caplog)
    os.kill(pid, signal.SIGCONT)
    time.sleep(1.1)
    assert fail(client, "/accounts/login/", "quinn") == 200
    [key] = redis.Redis.from_url(url).keys("limit:login:user:quinn:*")
    assert redis.Redis.from_url(url).get(key) == b"1"  # the failure while paused was counted in the process

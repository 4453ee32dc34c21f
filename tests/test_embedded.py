"""The embedded servers' files: private socket directories, and `make stop` signals only its own servers."""

import os
import subprocess
import sys

import pytest

from chatsite import embedded


def long_var(tmp_path):
    """A var/ whose path is too long for a unix socket: sockets then go to a directory elsewhere."""
    var = tmp_path / ("v" * (embedded.MAX_SOCKET_PATH - len(str(tmp_path))))
    var.mkdir()
    return var


@pytest.mark.parametrize("owner,mode", [(os.getuid(), 0o777), (65534, 0o700)])
def test_a_shared_socket_directory_someone_else_could_control_is_refused(tmp_path, owner, mode):
    var = long_var(tmp_path)
    expected = embedded.socket_dir(var)  # made private by us: accepted
    assert expected != var and expected.stat().st_mode & 0o777 == 0o700
    try:
        os.chown(expected, owner, -1)
        expected.chmod(mode)
        with pytest.raises(RuntimeError, match="not a private directory"):
            embedded.socket_dir(var)
    finally:
        os.chown(expected, os.getuid(), -1)
        expected.rmdir()


@pytest.mark.skipif(os.getuid() != 0, reason="pgserver makes the directory world-writable only as root")
def test_postgres_socket_directory_is_not_left_world_writable(tmp_path):
    var = long_var(tmp_path)
    host = embedded.postgres(var)["HOST"]
    try:
        assert host != str(var / "pgdata")  # the fallback directory pgserver chmods 0777
        assert not os.stat(host).st_mode & 0o022
    finally:
        embedded.stop_postgres(var)


def test_stop_signals_only_its_own_servers(tmp_path):
    """A pid file left by a server long gone may name a process that reused the pid."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "valkey.pid").write_text(str(stranger.pid))
        (tmp_path / "pgdata").mkdir()
        (tmp_path / "pgdata" / "postmaster.pid").write_text(f"{stranger.pid}\n{tmp_path / 'pgdata'}\n")
        assert embedded.stop_valkey(tmp_path) is False
        assert embedded.stop_postgres(tmp_path) is False
        assert stranger.poll() is None  # still running: never signalled
    finally:
        stranger.kill()
        stranger.wait()

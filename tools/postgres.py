"""A throwaway local PostgreSQL for tests and benches (127.0.0.1 only), from Debian's binaries.

``initdb`` into a fresh folder, then the server itself as a child process on a free port,
killed with the process that started it (like ``tools/homeserver.py``'s Synapse). Local
socket connections are trusted (the harness's own, through ``psql``); TCP connections need
the password, so a test can give a wrong one. PostgreSQL refuses to run as root: as root, the
cluster belongs to the ``postgres`` system user. ``fsync=off``: a cluster for tests only.
Synchronous on purpose, like ``homeserver.py``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from homeserver import die_with_parent, free_port, stop_child

USER = "lambda"
PASSWORD = "lambda-test-password"
INSTALL_HINT = "install Debian's postgresql package (as root: apt-get install -y postgresql)"


class PostgresError(RuntimeError):
    """The local PostgreSQL could not be set up or did not answer."""


def binaries() -> Path:
    """The folder of Debian's PostgreSQL server binaries (the newest version installed)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not found:
        raise PostgresError(f"no PostgreSQL server binaries in /usr/lib/postgresql: {INSTALL_HINT}")
    return Path(found[-1]).parent


class LocalPostgres:
    """One cluster in a fresh folder: ``start``, ``stop`` (fast shutdown, like ``pg_ctl stop
    -m fast``), ``start`` again on the same port, ``create_database``, ``url``."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = binaries()
        self.port = port or free_port()
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        # Not under pytest's tmp folder: as root that is closed to the postgres user.
        self.dir = Path(tempfile.mkdtemp(prefix="lambda-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir
        self._process: subprocess.Popen[bytes] | None = None
        if self.owner is not None:
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (and make its cluster, the first time); nothing if it runs."""
        if self.running:
            return
        if not self.data.exists():
            self._initdb()
        log = open(self.dir / "postgres.log", "ab")
        self._process = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-k",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._as_owner(),
            preexec_fn=die_with_parent(signal.SIGINT),  # a fast shutdown
        )
        log.close()
        self._wait_ready(timeout)

    def stop(self) -> None:
        """A fast shutdown: sessions are ended, the data is kept."""
        stop_child(self._process, signal.SIGINT, 30)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement through psql on the local socket; its output, unaligned."""
        done = subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                USER,
                "-d",
                database,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                statement,
            ],
            capture_output=True,
            text=True,
            **self._as_owner(),
        )
        if done.returncode != 0:
            raise PostgresError(f"psql {statement!r}: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _initdb(self) -> None:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.owner is not None:
            os.chown(pwfile, self.owner.pw_uid, self.owner.pw_gid)
        done = subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            **self._as_owner(),
        )
        pwfile.unlink()
        if done.returncode != 0:
            raise PostgresError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")

    def _as_owner(self) -> dict:
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise PostgresError(
                    f"postgres exited with {self._process.returncode}; "
                    f"see {self.dir / 'postgres.log'}"
                )
            ready = subprocess.run(
                [
                    str(self.bin / "pg_isready"),
                    "-q",
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                ],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise PostgresError(f"PostgreSQL did not answer on port {self.port} within {timeout:.0f}s")


if __name__ == "__main__":  # a quick manual check: start, print the URL, wait for Ctrl-C
    with LocalPostgres() as server:
        print(server.url(), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass

"""A throwaway PostgreSQL cluster for the tests of ``state.url`` (real server, loopback only).

``PgCluster`` runs Debian's server binaries (``/usr/lib/postgresql/<v>/bin``, 15
preferred): ``initdb`` refuses to run as root, so as root every server command
runs as the ``postgres`` system user (``runuser``), otherwise as ourselves. The
cluster lives in a private temporary directory, listens on a free 127.0.0.1
port with its Unix socket in that directory, and is removed when stopped.
Host connections need a password (scram-sha-256), so a wrong one is refused.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import free_port

ADMIN = "tn_admin"
ADMIN_PASSWORD = "admin-pw-4b1e"  # a throwaway cluster's, on loopback only


def server_bin() -> Path | None:
    """The directory of the PostgreSQL server binaries, or None (15 first, then the newest)."""
    preferred = Path("/usr/lib/postgresql/15/bin")
    if (preferred / "initdb").exists():
        return preferred
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


def why_no_cluster() -> str | None:
    """None if a cluster can be started here, else the reason (for pytest.skip)."""
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    if server_bin() is None:
        return "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' system user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and no runuser to run initdb as 'postgres'"
    return None


class PgCluster:
    """One server: ``start()``, ``stop()`` (kept on disk, to start again), ``remove()``.

    ``durable``: the server fsyncs its WAL as a production server does (the benchmarks:
    a commit then costs what it costs in use); without it, as for the tests, ``fsync``
    is off: a crash of the server process still loses nothing committed (the OS holds
    the WAL), only a crash of the machine could.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        binaries = server_bin()
        assert binaries is not None
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="tasknotes-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._names = itertools.count(1)
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _cmd(self, name: str, *args: str) -> list[str]:
        command = [str(self.bin / name), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self._as_postgres else command

    def _run(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._cmd(name, *args), capture_output=True, text=True,
                              check=check, timeout=120, cwd=self.root)

    def _initdb(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(ADMIN_PASSWORD + "\n")
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", ADMIN, f"--pwfile={pwfile}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        pwfile.unlink()

    def start(self) -> None:
        """Start the server and wait (pg_ctl -w, then pg_isready) until it accepts connections."""
        sync = "on" if self.durable else "off"
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   f"-c fsync={sync} -c full_page_writes={sync} -c max_connections=50")
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"),
                           "-o", options, "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{self.log()}")
        deadline = time.monotonic() + 60
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within 60 s\n{self.log()}")
            time.sleep(0.05)

    def ready(self) -> bool:
        return self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port),
                         check=False).returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed, no checkpoint) and wait."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                  check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "log").read_text(errors="replace")[-4000:]
        return ""

    def url(self, database: str, *, password: str = ADMIN_PASSWORD, port: int | None = None) -> str:
        return (f"postgresql://{ADMIN}:{password}@127.0.0.1:{port or self.port}/{database}")

    def create_database(self) -> str:
        """A fresh, empty database; its name."""
        import psycopg  # noqa: PLC0415 - optional: the tests skip without it

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg  # noqa: PLC0415 - optional: the tests skip without it

        with contextlib.suppress(psycopg.OperationalError), psycopg.connect(
                self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

"""Shared fixtures for the AWS-client test suite.

These tests start the real `updraft` binary and drive it with unmodified AWS clients:
the `aws` CLI (v1, run as a subprocess with `--output json`) and boto3.

Environment:
  UPDRAFT_BIN            the server binary (default <repo>/target/debug/updraft)
  UPDRAFT_TEST_DATABASE  optional postgres:// URL; each server then gets a fresh
                         database created next to the one the URL names (via psql)
                         and dropped afterwards. Without psql the URL is used as is.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.session
import pytest
from botocore.config import Config

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The venv's bin directory (the one running pytest): its `aws` is the pinned CLI.
VENV_BIN = Path(sys.executable).parent

ROLE_ARN = "arn:aws:iam::123456789012:role/updraft-ota-role"
CLI_ERROR_RE = re.compile(r"An error occurred \(([^)]+)\)(?: \(reached max retries: \d+\))? when calling the (\w+) operation")


def unique(prefix: str = "t") -> str:
    """A short unique resource name (valid as thing, group, job, stream and OTA id)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class CliError(AssertionError):
    def __init__(self, args: tuple, rc: int, stdout: str, stderr: str):
        self.cli_args = args
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        m = CLI_ERROR_RE.search(stderr)
        self.code = m.group(1) if m else None
        super().__init__(
            f"aws {' '.join(args)} exited {rc}\nstderr: {stderr.strip()}\nstdout: {stdout.strip()}"
        )


def _find_aws() -> str:
    exe = VENV_BIN / "aws"
    if exe.exists():
        return str(exe)
    found = shutil.which("aws")
    if not found:
        raise RuntimeError("the aws CLI is not installed (pip install -r tests/aws/requirements.txt)")
    return found


class PgDatabase:
    """A fresh PostgreSQL database next to the one a URL names (created with psql)."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.name = f"updraft_test_{uuid.uuid4().hex[:12]}"
        parts = urlsplit(base_url)
        self.url = urlunsplit((parts.scheme, parts.netloc, "/" + self.name, parts.query, ""))
        self.created = False
        self.psql = shutil.which("psql")

    def create(self) -> str:
        if not self.psql:
            # Nothing to create with: use the URL as given (tests use unique names).
            return self.base_url
        subprocess.run(
            [self.psql, self.base_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", f'CREATE DATABASE "{self.name}"'],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.created = True
        return self.url

    def drop(self) -> None:
        if self.created:
            subprocess.run(
                [self.psql, self.base_url, "-q", "-c", f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'],
                capture_output=True,
                timeout=30,
            )
            self.created = False


class Server:
    """One `updraft serve` process on a data directory, and clients for it."""

    def __init__(
        self,
        data_dir: Path,
        binary: str | None = None,
        database: str | None = None,
        extra_args: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(extra_env or {})
        self.binary = binary or os.environ.get("UPDRAFT_BIN") or str(REPO / "target" / "debug" / "updraft")
        if not Path(self.binary).exists():
            raise RuntimeError(f"server binary {self.binary} does not exist: run `cargo build` first")
        self.database = database
        self.proc: subprocess.Popen | None = None
        self.endpoint: str | None = None
        # Everything endpoints.json lists ({"http": ..., and any other listener}).
        self.endpoints: dict[str, str] = {}
        self.log_path = self.data_dir.parent / (self.data_dir.name + ".log")
        self._log = None
        self.starts = 0
        self.aws_exe = _find_aws()

    # ------------------------------------------------------------------ process

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None, "server already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        endpoints = self.data_dir / "endpoints.json"
        # A restart on the same directory: wait for the new file, not the old one.
        if endpoints.exists():
            endpoints.unlink()
        cmd = [self.binary, "serve", "--data-dir", str(self.data_dir), "--http", "127.0.0.1:0"]
        # Every other listener the binary has also gets a free port, so that servers
        # never collide with each other or with anything else on the machine.
        external = "--broker-url" in self.extra_args
        for flag in ("--mqtt", "--mqtts"):
            if flag in self._serve_flags() and not external:
                cmd += [flag, "127.0.0.1:0"]
        cmd += self.extra_args
        if self.database:
            cmd += ["--database", self.database]
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n===== start #{self.starts + 1}: {' '.join(cmd)}\n".encode())
        self._log.flush()
        # Only the flags above configure the server (no stray UPDRAFT_* settings).
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPDRAFT_") or k == "UPDRAFT_LOG"}
        env.setdefault("UPDRAFT_LOG", "info,sqlx=warn")
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"updraft exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            if endpoints.exists():
                try:
                    data = json.loads(endpoints.read_text())
                    self.endpoint = data["http"]
                    self.endpoints = data
                    break
                except (ValueError, KeyError):
                    pass  # being written
            time.sleep(0.05)
        else:
            self.kill()
            raise RuntimeError(f"updraft did not write endpoints.json within {timeout}s:\n{self.log_tail()}")
        for f in ("credentials", "config"):
            assert (self.data_dir / f).exists(), f"{f} was not written"

    def _serve_flags(self) -> set[str]:
        if not hasattr(self, "_flags"):
            p = subprocess.run([self.binary, "serve", "--help"], capture_output=True, text=True, timeout=30)
            self._flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", p.stdout))
        return self._flags

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait for a graceful exit (kill after `timeout`); returns the exit code."""
        if self.proc is None:
            return None
        rc = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                rc = None
        else:
            rc = self.proc.returncode
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            self.proc = None
        if self._log:
            self._log.close()
            self._log = None

    def restart(self) -> int | None:
        rc = self.stop()
        self.start()
        return rc

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # -------------------------------------------------------------- credentials

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / "credentials"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "config"

    def credentials(self) -> tuple[str, str]:
        cp = configparser.ConfigParser()
        cp.read(self.credentials_file)
        return cp["updraft"]["aws_access_key_id"], cp["updraft"]["aws_secret_access_key"]

    @property
    def region(self) -> str:
        cp = configparser.ConfigParser()
        cp.read(self.config_file)
        return cp["profile updraft"]["region"]

    # ---------------------------------------------------------------- aws CLI

    @property
    def env(self) -> dict[str, str]:
        """Environment for the aws CLI: the server's credential files, profile updraft."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_SHARED_CREDENTIALS_FILE=str(self.credentials_file),
            AWS_CONFIG_FILE=str(self.config_file),
            AWS_PROFILE="updraft",
            AWS_DEFAULT_OUTPUT="json",
            AWS_EC2_METADATA_DISABLED="true",
            # Surface server errors at once instead of retrying 5xx for seconds.
            AWS_RETRY_MODE="standard",
            AWS_MAX_ATTEMPTS="1",
            AWS_PAGER="",
            PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        )
        return env

    def aws_run(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        assert self.endpoint, "server not started"
        cmd = [self.aws_exe, "--endpoint-url", self.endpoint, "--output", "json", *map(str, args)]
        return subprocess.run(
            cmd, env=self.env, input=input, capture_output=True, text=True, timeout=timeout, cwd=str(self.data_dir.parent)
        )

    def aws(self, *args: str, input: str | None = None, timeout: float = 120) -> Any:
        """Runs `aws ARGS`; returns the parsed JSON output ({} for no output); raises CliError."""
        p = self.aws_run(*args, input=input, timeout=timeout)
        if p.returncode != 0:
            raise CliError(args, p.returncode, p.stdout, p.stderr)
        out = p.stdout.strip()
        if not out:
            return {}
        try:
            return json.loads(out)
        except ValueError:
            # High-level `aws s3` commands print text, not JSON.
            return {"_text": out}

    def aws_fail(self, *args: str, input: str | None = None) -> tuple[str | None, str]:
        """Runs `aws ARGS` expecting failure; returns (error code, stderr)."""
        p = self.aws_run(*args, input=input)
        assert p.returncode != 0, f"aws {' '.join(map(str, args))} unexpectedly succeeded: {p.stdout}"
        m = CLI_ERROR_RE.search(p.stderr)
        return (m.group(1) if m else None), p.stderr

    # ------------------------------------------------------------------ boto3

    def session(self) -> boto3.session.Session:
        """A boto3 session reading the server's credential/config files, profile updraft."""
        bs = botocore.session.Session()
        bs.set_config_variable("credentials_file", str(self.credentials_file))
        bs.set_config_variable("config_file", str(self.config_file))
        bs.set_config_variable("profile", "updraft")
        return boto3.session.Session(botocore_session=bs)

    def client(self, service: str = "iot", *, parameter_validation: bool = True, **config: Any):
        cfg = Config(
            retries={"total_max_attempts": 1},
            parameter_validation=parameter_validation,
            connect_timeout=10,
            read_timeout=60,
            **config,
        )
        if service == "s3" and "s3" not in config:
            cfg = cfg.merge(Config(s3={"addressing_style": "path"}))
        return self.session().client(service, endpoint_url=self.endpoint, config=cfg)


def _new_server(tmp_root: Path) -> tuple[Server, PgDatabase | None]:
    pg = None
    database = None
    base = os.environ.get("UPDRAFT_TEST_DATABASE")
    if base:
        pg = PgDatabase(base)
        database = pg.create()
    srv = Server(tmp_root / "data", database=database)
    srv.start()
    return srv, pg


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running server on a fresh data directory (and fresh database), per test module."""
    root = tmp_path_factory.mktemp("updraft")
    srv, pg = _new_server(root)
    try:
        yield srv
    finally:
        srv.kill()
        if pg:
            pg.drop()


@pytest.fixture(scope="module")
def iot(server):
    return server.client("iot")


@pytest.fixture(scope="module")
def s3(server):
    return server.client("s3")


# ------------------------------------------------------------------ firmware / signing


class Signer:
    """An ECDSA P-256 key and self-signed certificate, as a device's OTA signer would use."""

    def __init__(self):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "updraft-test-ota-signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def sign_b64(self, data: bytes) -> str:
        return base64.b64encode(self.sign(data)).decode()

    def verify(self, data: bytes, signature_der: bytes) -> None:
        """Raises cryptography.exceptions.InvalidSignature when it does not verify."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        self.key.public_key().verify(signature_der, data, ec.ECDSA(hashes.SHA256()))


@pytest.fixture(scope="session")
def signer():
    return Signer()


def firmware_bytes(size: int = 70_001) -> bytes:
    """Deterministic, non-trivial firmware content of `size` bytes."""
    import hashlib

    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def wait_for(fn, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Calls fn() until it returns a truthy value; returns it, or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


COUNTERS = (
    "numberOfCanceledThings",
    "numberOfSucceededThings",
    "numberOfFailedThings",
    "numberOfRejectedThings",
    "numberOfQueuedThings",
    "numberOfInProgressThings",
    "numberOfRemovedThings",
    "numberOfTimedOutThings",
)


def check_counters(details: dict, **expected: int) -> None:
    """All eight jobProcessDetails counters are present; the named ones have these values,
    the others are zero."""
    missing = [c for c in COUNTERS if c not in details]
    assert not missing, f"jobProcessDetails lacks {missing}: {details}"
    want = {c: 0 for c in COUNTERS}
    for k, v in expected.items():
        key = k if k.startswith("numberOf") else f"numberOf{k}Things"
        assert key in want, key
        want[key] = v
    got = {c: details[c] for c in COUNTERS}
    assert got == want, f"jobProcessDetails {got} != expected {want}"

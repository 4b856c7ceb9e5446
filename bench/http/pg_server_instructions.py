#!/usr/bin/env python3
"""Postgres server instructions per request, counted exactly with callgrind: how much work
the database does for one request of each Postgres variant of bench-http (`postgres`,
`postgres-local`, `pg-floor`). Throughput runs on a small VM are noisy (other processes,
WAL flushes); instruction counts are not, so a change to the store's SQL is measured
here first.

    cargo build --release --manifest-path bench/http/Cargo.toml
    python3 bench/http/pg_server_instructions.py                      # postgres, pg-floor
    python3 bench/http/pg_server_instructions.py --variants postgres --cases new,replay
    python3 bench/http/pg_server_instructions.py --bench-http /tmp/old-bench-http

How: a throwaway PostgreSQL cluster (initdb in a temporary directory, 127.0.0.1 on a free
port, fsync off, no autovacuum) runs under `valgrind --tool=callgrind
--trace-children=yes --toggle-collect=PostgresMain`, so every backend counts what it
does from its main loop on, and writes its count when it exits. For each variant and
case, bench-http runs twice against it, with N1 and then N2 sequential requests (one
keep-alive connection, new keys or one key replayed) on a Postgres pool of one connection
(`--pg-pool 1`); the backends of each run end with it. (count of run N2 - count of run N1)
/ (N2 - N1) cancels what both runs share (the connections and their setup, the schema, the
store's checks). With the default pool of 40, a connection back in the pool a moment late
made the next request open another, and the same binary measured 455 k to 546 k per new
key from run to run; with one, each run opens the same connections. Counts depend on
what ran before on the cluster:
compare them from the same --variants and --cases order. User-space instructions only:
the kernel's work for a round trip (the socket calls) is not in it, so a change that
trades instructions for round trips needs a throughput run (`run.py`) too.

Needs: valgrind, a PostgreSQL server installation (`pg_config --bindir`, or
/usr/lib/postgresql/*/bin), and bench-http built. Run as root, the cluster runs as the
user `postgres` (initdb refuses root). Python 3.11 standard library only. Takes a few
minutes per variant and case (the server runs about 50x slower under valgrind).
"""

from __future__ import annotations

import argparse
import glob
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BODY = '{"amount":1250,"currency":"EUR","reference":"order-8e03978e","customer":"cus_4f1c2a9b","method":"sepa_dd"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindir() -> Path:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        path = Path(out.stdout.strip())
        if (path / "initdb").exists():
            return path
    except (OSError, subprocess.CalledProcessError):
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        sys.exit("no PostgreSQL server installation found (pg_config --bindir, /usr/lib/postgresql/*/bin)")
    return Path(found[-1]).parent


def as_cluster_user(cmd: list[str]) -> list[str]:
    """Runs `cmd` as `postgres` when this script runs as root (initdb refuses root)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--"] + cmd


class Cluster:
    """A throwaway cluster under callgrind; every backend writes `cg.<pid>` into `out`."""

    def __init__(self, bin_dir: Path, root: Path):
        self.bin = bin_dir
        self.data = root / "data"
        self.out = root / "callgrind"
        self.port = free_port()
        self.out.mkdir()
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(self.out, "postgres")
        subprocess.run(as_cluster_user([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]),
                       check=True, capture_output=True)
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(as_cluster_user([
            "valgrind", "--tool=callgrind", "--trace-children=yes", "--toggle-collect=PostgresMain",
            f"--callgrind-out-file={self.out}/cg.%p",
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(root),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "autovacuum=off", "-c", "bgwriter_delay=10000", "-c", "wal_writer_delay=10000",
            "-c", "checkpoint_timeout=3600", "-c", "max_connections=60",
        ]), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            time.sleep(0.5)
        else:
            self.stop()
            sys.exit("the callgrind cluster did not start; see its server.log")
        subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                        "-qc", "CREATE DATABASE test", "postgres"], check=True, capture_output=True)

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/test"

    def files(self) -> set[str]:
        return set(glob.glob(str(self.out / "cg.*")))

    def stop(self) -> None:
        subprocess.run(as_cluster_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast"]),
                       capture_output=True)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def counted(paths: list[str]) -> int:
    total = 0
    for path in paths:
        text = Path(path).read_text(errors="replace")
        m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if m:
            total += int(m.group(1))
    return total


def run_once(cluster: Cluster, bench_http: str, variant: str, case: str, n: int) -> int:
    """Instructions of the backends that served one bench-http run of `n` requests."""
    before = cluster.files()
    port = free_port()
    env = dict(os.environ, DATABASE_URL=cluster.url)
    # One connection, so that both runs open the same ones.
    pool = ["--pg-pool", "1"]
    app = subprocess.Popen([bench_http, "--variant", variant, "--port", str(port), "--workers", "1"] + pool,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if app.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"bench-http --variant {variant} did not start")
                time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        tag = time.time_ns()
        for i in range(n):
            key = f"cg-{tag}-{i}" if case == "new" else f"cg-{tag}-replayed"
            conn.request("POST", "/payments", body=BODY,
                         headers={"Idempotency-Key": key, "Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            if reply.status not in (200, 201):
                sys.exit(f"{variant} {case}: request {i} answered {reply.status}")
        conn.close()
    finally:
        app.terminate()
        app.wait()
    # The backends write their counts as they exit, after the app closed its connections.
    deadline = time.monotonic() + 60
    while True:
        fresh = sorted(cluster.files() - before)
        done = [f for f in fresh if os.path.getsize(f) > 0]
        if fresh and len(done) == len(fresh):
            time.sleep(1)
            fresh = sorted(cluster.files() - before)
            if all(os.path.getsize(f) > 0 for f in fresh):
                return counted(fresh)
        if time.monotonic() > deadline:
            return counted(done)
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="postgres,pg-floor")
    p.add_argument("--cases", default="new")
    p.add_argument("--n1", type=int, default=200, help="requests of the first run (default 200)")
    p.add_argument("--n2", type=int, default=1000, help="requests of the second run (default 1000)")
    p.add_argument("--bench-http", default=str(HERE / "target" / "release" / "bench-http"))
    p.add_argument("--keep", action="store_true",
                   help="keep the callgrind files (one per backend, for callgrind_annotate) and say where")
    args = p.parse_args()
    if not Path(args.bench_http).exists():
        sys.exit(f"{args.bench_http} not found: cargo build --release --manifest-path bench/http/Cargo.toml")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found (apt-get install valgrind)")
    root = Path(tempfile.mkdtemp(prefix="pg-callgrind-"))
    cluster = Cluster(bindir(), root)
    try:
        print(f"{'variant':16} {'case':7} {'instructions/request':>22}")
        for variant in args.variants.split(","):
            for case in args.cases.split(","):
                a = run_once(cluster, args.bench_http, variant, case, args.n1)
                b = run_once(cluster, args.bench_http, variant, case, args.n2)
                print(f"{variant:16} {case:7} {(b - a) / (args.n2 - args.n1):>22,.0f}", flush=True)
    finally:
        cluster.stop()
        if args.keep:
            print(f"callgrind files: {cluster.out} (the largest are the backends that served requests)")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

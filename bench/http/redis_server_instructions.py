#!/usr/bin/env python3
"""Redis server instructions per request, counted exactly with callgrind: what the server
does for the store's scripts (`reserve.lua`, `complete.lua`) next to the hand-written
floor's two (bench-http's `floor` variant), per new key and per replay. Throughput runs
on a small VM move by 10-20 % between runs; these counts do not, so a change to a script
is measured here first.

    python3 bench/http/redis_server_instructions.py
    python3 bench/http/redis_server_instructions.py --complete /tmp/complete-b.lua   # A/B a script
    python3 bench/http/redis_server_instructions.py --record-bytes 300

How: a throwaway redis-server (127.0.0.1, a free port, no persistence) runs under
`valgrind --tool=callgrind`. This script loads the scripts, fills the keyspace with 20,000
keys first (so that no run below makes Redis's main dictionary grow and rehash: that step
alone moved one count by 15 k), then for each case sends 200 requests to warm up, zeroes
the counters (`callgrind_control -z`), sends N requests (each a pipeline of its commands,
one request at a time), dumps the counters and divides by N. What is counted is the
server's user-space work for the commands (reading them, the script, the reply), not the
kernel's socket work.

The requests are shaped as the store sends them: a key `{bench:}{<64 hex>}`, a 32-byte
fingerprint, a 16-byte token, a lease of 30 s, and a record blob of `--record-bytes`
(default 120: about what bench-http's handler answer encodes to); no wake-up channel (the
scripts build it from the key). The floor's key is short (`fl:<n>`) and its record the
status and body, as in bench-http.

Needs: valgrind (callgrind_control), redis-server on PATH (or --redis-server). Python 3.11
standard library only. Takes about a minute.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Resp  # noqa: E402  (run.py's RESP client)

LUA = Path(__file__).resolve().parent.parent.parent / "crates" / "tower-idempotency-redis" / "lua"
# bench-http's floor (src/main.rs, FLOOR_RESERVE and FLOOR_COMPLETE).
FLOOR_RESERVE = ("local v = redis.call('GET', KEYS[1]) if v then return v end "
                 "redis.call('SET', KEYS[1], '', 'PX', ARGV[1]) return false")
FLOOR_COMPLETE = "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1"
PREFILL = 20_000
WARM = 200


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="measured requests per case (default 2000)")
    p.add_argument("--record-bytes", type=int, default=120, help="size of the stored record (default 120)")
    p.add_argument("--reserve", default=str(LUA / "reserve.lua"), help="the reserve script (default: the crate's)")
    p.add_argument("--complete", default=str(LUA / "complete.lua"), help="the complete script (default: the crate's)")
    p.add_argument("--redis-server", default=shutil.which("redis-server"), help="redis-server binary")
    args = p.parse_args()
    if not args.redis_server or not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("redis_server_instructions.py: needs redis-server and valgrind (callgrind_control) on PATH")
    if not 100 <= args.requests <= 100_000 or not 0 <= args.record_bytes <= 1_000_000:
        p.error("--requests must be in [100, 100000], --record-bytes in [0, 1000000]")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp(prefix="redis-callgrind-"))
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p", args.redis_server,
         "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = Resp(port, timeout=120)
                conn.pipe([["PING"]])
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("redis_server_instructions.py: redis-server did not start under valgrind")
                time.sleep(0.2)
        sha = {name: conn.pipe([["SCRIPT", "LOAD", Path(path).read_text()]])[0].decode()
               for name, path in (("reserve", args.reserve), ("complete", args.complete))}
        sha["floor_reserve"] = conn.pipe([["SCRIPT", "LOAD", FLOOR_RESERVE]])[0].decode()
        sha["floor_complete"] = conn.pipe([["SCRIPT", "LOAD", FLOOR_COMPLETE]])[0].decode()
        for start in range(0, PREFILL, 1000):
            conn.pipe([["SET", f"prefill:{i}", "x", "PX", 3_600_000] for i in range(start, start + 1000)])

        fp, token, record = b"F" * 32, b"T" * 16, b"R" * args.record_bytes
        floor_record = b"201" + b"R" * max(args.record_bytes - 60, 0)

        def key(i: int) -> str:
            return "{bench:}{%064x}" % i

        def reserve(i: int) -> list:
            return ["EVALSHA", sha["reserve"], 1, key(i), fp, token, 30_000, 1, 0]

        cases = {
            "store new key": lambda i: [
                reserve(i),
                ["EVALSHA", sha["complete"], 1, key(i), token, record, 600_000]],
            "store replay": lambda i: [reserve(i)],
            "floor new key": lambda i: [
                ["EVALSHA", sha["floor_reserve"], 1, f"fl:{i}", 600_000],
                ["EVALSHA", sha["floor_complete"], 1, f"fl:{i}", floor_record, 600_000]],
            "floor replay": lambda i: [["EVALSHA", sha["floor_reserve"], 1, f"fl:{i}", 600_000]],
        }
        expect = {"store new key": [1, 1], "store replay": None, "floor new key": [None, 1],
                  "floor replay": None}
        n = args.requests
        print(f"{'case':16s} {'instructions/request':>22s}")
        for name, make in cases.items():
            # A replay reads the keys its new-key case stored (the same numbers).
            for i in range(n + WARM):
                if i == WARM:
                    subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                replies = conn.pipe(make(i))
                want = expect[name]
                if want is not None and [int(r) if r is not None else None for r in replies] != want:
                    sys.exit(f"{name}: unexpected replies {replies!r} (is the script one of this crate's?)")
                if want is None and not (isinstance(replies[0], list) or replies[0]):
                    sys.exit(f"{name}: not a replay: {replies!r}")
            before = set(glob.glob(f"{out}/cg.*"))
            subprocess.run(["callgrind_control", "-d", name.replace(" ", "-"), str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            total = 0
            for _ in range(50):
                for path in set(glob.glob(f"{out}/cg.*")) - before:
                    for line in open(path):
                        if line.startswith(("summary:", "totals:")):
                            total = max(total, int(line.split()[1]))
                if total:
                    break
                time.sleep(0.1)
            print(f"{name:16s} {total / n:22,.0f}", flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

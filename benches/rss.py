#!/usr/bin/env python3
"""Issue 11: what RSS with concurrent 9.9 MB requests is made of (BENCHMARKS.md, "RSS with
concurrent 9.9 MB requests").

For each in-flight budget (`listen.max_in_flight_bytes`), with glibc's default malloc and
with its mmap threshold fixed at 128 KiB (GLIBC_TUNABLES, so freed body buffers go back to
the kernel): 128 requests of 9.9 MB, 64 at a time, each on a new connection; peak RSS
(sampled every 10 ms), RSS 2 s after, and RSS after `malloc_trim(0)` called in the process
through gdb (when gdb is installed): what that returns was free memory glibc kept.
With --latency instead: a 9.9 MB request's latency and CPU with both mallocs, two gpulinks
side by side, requests interleaved one at a time, and direct for reference.

Uses benches/compare.py's upstream (native nginx) and moto; traffic on 127.253.x.y and
127.254.x.y only. Run after `bash benches/compare.sh` has installed what it needs:

    python3 benches/rss.py --gpulink target/release/gpulink \\
        --python .venv/bin/python --moto .venv/bin/moto_server [--latency]
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402

FIXED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}


def burst(addr, body, n, c):
    """n POSTs of body, c at a time, each on its own connection: answers by status."""
    codes, errors, lock = {}, [0], threading.Lock()
    share = [n // c + (1 if i < n % c else 0) for i in range(c)]

    def worker(k):
        for _ in range(k):
            conn = http.client.HTTPConnection(addr, 8000, timeout=120)
            try:
                conn.request("POST", "/inference", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                with lock:
                    codes[r.status] = codes.get(r.status, 0) + 1
            except (OSError, http.client.HTTPException):
                with lock:
                    errors[0] += 1
            finally:
                conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes, errors[0]


def trimmed_rss(pid):
    if not shutil.which("gdb"):
        return None
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (int) malloc_trim(0)"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return C.rss_mib(pid)


def start_gpulink(a, b, d, procs, name, address, budget, env):
    conf = C.gpulink_conf(b["ca"], b["key_arn"], address)
    if budget:
        conf = conf.replace("[listen]\n", f'[listen]\nmax_in_flight_bytes = "{budget}"\n', 1)
    path = os.path.join(d, f"{name}.toml")
    with open(path, "w") as f:
        f.write(conf)
    p = procs.start(name, [a.gpulink, "run", "--config", path], env=dict(b["env"], RUST_LOG="warn", **env),
                    logfile=os.path.join(d, f"{name}.log"))
    C.wait_until(f"{name} /ready", lambda: C.http_ok(f"http://{address}:9901/ready"), timeout=60)
    return p


def budgets(a, b, d, procs, body):
    rows = []
    for malloc, env in (("default", {}), ("mmap_threshold=131072", FIXED)):
        for budget in a.budgets.split(","):
            name = f"gpulink-{len(rows)}"
            p = start_gpulink(a, b, d, procs, name, C.GPULINK, budget, env)
            burst(C.GPULINK, body, 4, 2)  # warm-up: pools, the data key
            before = C.rss_mib(p.pid)
            with C.RssSampler(p.pid) as s:
                codes, errors = burst(C.GPULINK, body, 2 * a.concurrency, a.concurrency)
            time.sleep(2)
            after = C.rss_mib(p.pid)
            row = dict(malloc=malloc, budget=budget, before=before, peak=s.peak, after=after,
                       trimmed=trimmed_rss(p.pid), codes=codes, errors=errors)
            C.log(json.dumps(row))
            rows.append(row)
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
    print(f"\n{2 * a.concurrency} requests of 9.9 MB, {a.concurrency} at a time; RSS in MiB; "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}\n")
    print("| glibc malloc | max_in_flight_bytes | before | peak | 2 s after | after malloc_trim(0) | answers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        t = "–" if r["trimmed"] is None else f"{r['trimmed']:.1f}"
        print(f"| {r['malloc']} | {r['budget']} | {r['before']:.1f} | {r['peak']:.1f} | {r['after']:.1f} | {t} | "
              f"{r['codes']}, errors {r['errors']} |")


def latency(a, b, d, procs, body):
    def post(conn, headers):
        t = time.perf_counter()
        conn.request("POST", "/inference", body, headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"rss.py: answer {r.status}")
        return (time.perf_counter() - t) * 1000

    pids, conns = {}, {}
    for name, address, env in (("default", C.GPULINK, {}), ("mmap_threshold=131072", C.GPULINK_1W, FIXED)):
        pids[name] = start_gpulink(a, b, d, procs, name.split("=")[0], address, None, env).pid
        conns[name] = http.client.HTTPConnection(address, 8000, timeout=120)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conns["direct"] = http.client.HTTPSConnection(C.UPSTREAMS[0], 8443, context=ctx, timeout=120)
    plain = {"Content-Type": "application/json"}
    headers = {k: b["tenant"] if k == "direct" else plain for k in conns}
    for name, conn in conns.items():
        for _ in range(3):
            post(conn, headers[name])
    cpu0 = {k: C.cpu_ms(v) for k, v in pids.items()}
    lat = {k: [] for k in conns}
    for _ in range(a.requests):
        for name, conn in conns.items():
            lat[name].append(post(conn, headers[name]))
    print(f"\n{a.requests} requests of 9.9 MB each, one at a time, interleaved; load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}\n")
    print("| path | p50 ms | mean ms | CPU ms per request | RSS after (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in lat.items():
        cpu = f"{(C.cpu_ms(pids[name]) - cpu0[name]) / a.requests:.1f}" if name in pids else "–"
        rss = f"{C.rss_mib(pids[name]):.1f}" if name in pids else "–"
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.mean(values):.1f} | {cpu} | {rss} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpulink", required=True)
    ap.add_argument("--python", required=True, help="a python with boto3 (the test .venv)")
    ap.add_argument("--moto", required=True)
    ap.add_argument("--budgets", default="256MiB,128MiB,64MiB")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", action="store_true", help="the latency A/B instead of the budgets")
    ap.add_argument("--requests", type=int, default=30, help="--latency: requests per path")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="gpulink-rss-")
    procs = C.Procs()
    try:
        b = C.start_backends(a, d, procs)
        with open(b["big"], "rb") as f:
            body = f.read()
        (latency if a.latency else budgets)(a, b, d, procs, body)
    finally:
        procs.stop_all()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()

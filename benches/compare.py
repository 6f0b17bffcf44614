#!/usr/bin/env python3
"""The side-by-side load benchmark behind `bash benches/compare.sh` (issue 11).

Starts, on loopback only (127.253.x.y and 127.254.x.y):

* the upstream: native nginx on three "ENI" addresses 127.254.{10,11,12}.50, TLS on :8443
  (a certificate made for the run, HTTP/1.1 keep-alive) answering a small JSON, and
  `/health` on :8080. It only discards bodies, so it is never the bottleneck;
* moto as KMS (127.253.0.30), with a fresh key;
* nginx as a TLS-originating reverse proxy (127.253.0.10:8000): keep-alive upstream pool,
  certificate verified, the three tenant headers set, no encryption;
* gpulink (127.253.0.20:8000, admin :9901): `format = "aws-esdk"` (warm data-key cache),
  phase `privatelink-only`, `RUST_LOG=warn`.

and measures the three paths (direct = the load generator talks TLS to one upstream
address itself, nginx, gpulink) in one run, interleaved per measurement: maximum
throughput (wrk), latency at fixed rates (oha with latency correction), CPU per 1,000
requests and peak RSS per process tree (from /proc), a 9.9 MB body's latency, RSS with
64 concurrent 9.9 MB requests, idle RSS and start-to-/ready. It prints a Markdown table
with gpulink's figures as ratios to nginx and to direct.

Only the standard library; the tools' paths come from benches/compare.sh.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

UPSTREAMS = ["127.254.10.50", "127.254.11.50", "127.254.12.50"]
NGINX_PROXY = "127.253.0.10"
GPULINK = "127.253.0.20"
GPULINK_1W = "127.253.0.21"
MOTO = "127.253.0.30"
MOTO_PORT = 5000
SERVER_NAME = "gpu-cluster.yourcompany.internal"
TENANT = "tenant-bench"
MODEL_POOL = "model-a"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BIG_BODY = 9_900_000
SMALL_BODY = 1024


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# /proc: CPU and memory per process tree
# ---------------------------------------------------------------------------------------


def tree(pid):
    """The pid and all its descendants (nginx master and workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_ms(pid):
    """utime + stime of the whole tree, in ms (all threads included)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total * 1000.0 / CLK_TCK


def status_kib(pid, key):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def rss_mib(pid):
    return status_kib(pid, "VmRSS") / 1024.0


def hwm_mib(pid):
    return status_kib(pid, "VmHWM") / 1024.0


class RssSampler:
    """The largest VmRSS of a tree seen while it runs (every 10 ms)."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# ---------------------------------------------------------------------------------------
# Setting up: certificates, configuration files, processes
# ---------------------------------------------------------------------------------------


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def make_certs(d):
    ca_key, ca, key, csr, crt = (os.path.join(d, n) for n in ("ca.key", "ca.pem", "tls.key", "tls.csr", "tls.pem"))
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=gpulink bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"])
    run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", f"/CN={SERVER_NAME}"])
    ext = os.path.join(d, "ext.cnf")
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:{SERVER_NAME}," + ",".join(f"IP:{a}" for a in UPSTREAMS) + "\n"
                "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", crt, "-days", "2", "-extfile", ext])
    return ca, crt, key


def nginx_common(d, workers):
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
"""


def upstream_conf(d, crt, key):
    listen_tls = "\n".join(f"    listen {a}:8443 ssl;" for a in UPSTREAMS)
    listen_health = "\n".join(f"    listen {a}:8080;" for a in UPSTREAMS)
    return nginx_common(d, 2) + f"""http {{
  access_log off;
  client_body_temp_path {d}/body;
  client_max_body_size 0;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
{listen_tls}
    ssl_certificate {crt};
    ssl_certificate_key {key};
    ssl_session_cache shared:TLS:1m;
    location / {{
      default_type application/json;
      return 200 '{{"id":"bench","output":"ok"}}';
    }}
  }}
  server {{
{listen_health}
    location = /health {{
      default_type application/json;
      return 200 '{{"status":"healthy"}}';
    }}
  }}
}}
"""


def proxy_conf(d, ca, key_arn):
    servers = "\n".join(f"    server {a}:8443;" for a in UPSTREAMS)
    return nginx_common(d, 2) + f"""http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  client_max_body_size 20m;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  upstream cluster {{
{servers}
    keepalive 64;
    keepalive_requests 10000000;
  }}
  server {{
    listen {NGINX_PROXY}:8000;
    location / {{
      proxy_pass https://cluster;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host {SERVER_NAME};
      proxy_set_header X-Tenant-ID {TENANT};
      proxy_set_header X-KMS-Key-ID {key_arn};
      proxy_set_header X-Encryption-Format aws-esdk-v2;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_name {SERVER_NAME};
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }}
  }}
}}
"""


def gpulink_conf(ca, key_arn, address, extra=""):
    eni = ", ".join(f'"{a}:8443"' for a in UPSTREAMS)
    return extra + f"""[listen]
address = "{address}:8000"
drain_delay = "0s"
shutdown_grace = "5s"

[admin]
address = "{address}:9901"

[tenant]
id = "{TENANT}"
model_pool = "{MODEL_POOL}"

[kms]
key_id = "{key_arn}"
region = "us-east-1"
format = "aws-esdk"
endpoint_url = "http://{MOTO}:{MOTO_PORT}"

[upstream]
server_name = "{SERVER_NAME}"
ca_file = "{ca}"

[[regions]]
name = "us-east-1"
privatelink = [{eni}]

[migration]
phase = "privatelink-only"
"""


class Procs:
    """The processes this run started; all stopped at the end, whatever happens."""

    def __init__(self):
        self.items = []

    def start(self, name, cmd, env=None, logfile=None):
        out = open(logfile, "wb") if logfile else subprocess.DEVNULL
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if logfile else subprocess.DEVNULL,
                             env=env, start_new_session=True)
        self.items.append((name, p))
        return p

    def stop_all(self):
        for _, p in reversed(self.items):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for _, p in self.items:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def wait_until(what, check, timeout=60.0, every=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(every)
    raise SystemExit(f"benchmark: {what} not ready within {timeout:.0f} s")


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def tcp_open(host, port):
    import socket

    try:
        socket.create_connection((host, port), 0.5).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# Load generators
# ---------------------------------------------------------------------------------------


class Path:
    def __init__(self, name, url, pid_fn, headers, insecure=False):
        self.name, self.url, self.pid_fn, self.headers, self.insecure = name, url, pid_fn, headers, insecure


def wrk_max(path, body_file, seconds, d):
    lua = os.path.join(d, f"wrk-{path.name}.lua")
    with open(lua, "w") as f:
        f.write(f'wrk.method = "POST"\nlocal f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
        for k, v in path.headers.items():
            f.write(f'wrk.headers["{k}"] = "{v}"\n')
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", "-s", lua, path.url],
                         capture_output=True, text=True, check=True).stdout
    result = {"rps": 0.0, "requests": 0, "errors": 0}
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("Requests/sec:"):
            result["rps"] = float(s.split()[1])
        elif "requests in" in s:
            result["requests"] = int(s.split()[0])
        elif s.startswith("Non-2xx"):
            result["errors"] += int(s.split()[-1])
        elif s.startswith("Socket errors"):
            result["errors"] += sum(int(x.strip(",")) for x in s.split()[3::2])
    return result


def oha(path, oha_bin, body_file, extra):
    cmd = [oha_bin, "--no-tui", "--output-format", "json", "-m", "POST", "-D", body_file]
    for k, v in path.headers.items():
        cmd += ["-H", f"{k}: {v}"]
    if path.insecure:
        cmd.append("--insecure")
    out = subprocess.run(cmd + extra + [path.url], capture_output=True, text=True, check=True).stdout
    j = json.loads(out)
    pct = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    return {
        "p50": pct["p50"] * 1000, "p99": pct["p99"] * 1000, "p999": pct["p99.9"] * 1000,
        "max": j["summary"]["slowest"] * 1000, "rps": j["summary"]["requestsPerSec"],
        "ok": codes.get("200", 0), "codes": codes,
        "errors": sum(j.get("errorDistribution", {}).values()),
    }


def measured(path, fn):
    """Runs fn, returning its result with the CPU the path's process tree used."""
    pid = path.pid_fn()
    before = cpu_ms(pid) if pid else 0.0
    r = fn()
    r["cpu_ms"] = (cpu_ms(pid) - before) if pid else None
    return r


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short phases, for trying it out")
    ap.add_argument("--oha", required=True)
    ap.add_argument("--gpulink", required=True)
    ap.add_argument("--python", required=True, help="a python with boto3 (the test .venv)")
    ap.add_argument("--moto", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--one-worker", action="store_true",
                    help="also measure a second gpulink with one request-path worker ([runtime] workers = 1; "
                         "with --instructions: TOKIO_WORKER_THREADS=1, for builds from before [runtime])")
    ap.add_argument("--perf", metavar="FILE",
                    help="perf record -g gpulink during the 5k/s phase (with --instructions: during its "
                         "perf stat drive) into FILE")
    ap.add_argument("--instructions", action="store_true",
                    help="instead of the load run: per-request counts that do not depend on the machine's load "
                         "(user-space instructions under callgrind; syscalls, futex calls and context switches "
                         "from perf stat), N requests at a fixed concurrency per path")
    ap.add_argument("--requests", type=int, default=20000, help="--instructions: requests per perf stat drive")
    ap.add_argument("--callgrind-requests", type=int, default=2000,
                    help="--instructions: requests per callgrind drive (0: skip callgrind)")
    ap.add_argument("--concurrency", type=int, default=16, help="--instructions: connections, one request each at a time")
    ap.add_argument("--workers", default="",
                    help="--instructions: comma-separated [runtime] workers values, one gpulink each "
                         "(default: one gpulink with the default configuration)")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="--instructions: also measure this gpulink binary (an older build) with each "
                         "--workers value, in the same run, for a before/after")
    a = ap.parse_args()
    if a.instructions:
        d = tempfile.mkdtemp(prefix="gpulink-instructions-")
        procs = Procs()
        try:
            rows = run_instructions(a, d, procs)
        finally:
            procs.stop_all()
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)
        print_instructions(a, rows)
        return

    secs = 3 if a.quick else 10
    big_n = 5 if a.quick else 20
    d = tempfile.mkdtemp(prefix="gpulink-compare-")
    procs = Procs()
    results = {"quick": a.quick, "seconds": secs}
    try:
        results.update(run_all(a, d, procs, secs, big_n))
    finally:
        procs.stop_all()
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    print_report(results)


def start_backends(a, d, procs):
    """Certificates, the two bodies, the native nginx upstream, moto and a KMS key."""
    b = {}
    b["ca"], crt, key = make_certs(d)
    b["small"] = os.path.join(d, "small.json")
    with open(b["small"], "w") as f:
        pad = SMALL_BODY - len('{"model":"m","input":""}')
        f.write('{"model":"m","input":"' + "x" * pad + '"}')
    b["big"] = os.path.join(d, "big.json")
    with open(b["big"], "w") as f:
        f.write('{"input":"' + "y" * (BIG_BODY - len('{"input":""}')) + '"}')

    b["env"] = env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")

    up_dir = os.path.join(d, "upstream")
    os.makedirs(up_dir)
    with open(os.path.join(up_dir, "nginx.conf"), "w") as f:
        f.write(upstream_conf(up_dir, crt, key))
    b["upstream"] = procs.start("upstream", ["nginx", "-p", up_dir, "-c", "nginx.conf", "-g", "daemon off;"],
                                logfile=os.path.join(d, "upstream.log"))
    procs.start("moto", [a.moto, "-H", MOTO, "-p", str(MOTO_PORT)], env=env, logfile=os.path.join(d, "moto.log"))
    wait_until("upstream", lambda: all(http_ok(f"http://{u}:8080/health") for u in UPSTREAMS))
    wait_until("moto", lambda: tcp_open(MOTO, MOTO_PORT))
    b["key_arn"] = run([a.python, "-c",
                        "import boto3,sys; k=boto3.client('kms',endpoint_url=sys.argv[1],region_name='us-east-1')"
                        ".create_key(); print(k['KeyMetadata']['Arn'])", f"http://{MOTO}:{MOTO_PORT}"],
                       env=env).stdout.strip()
    b["tenant"] = {"Content-Type": "application/json", "X-Tenant-ID": TENANT, "X-KMS-Key-ID": b["key_arn"],
                   "X-Encryption-Format": "aws-esdk-v2", "Host": SERVER_NAME}
    return b


def run_all(a, d, procs, secs, big_n):
    res = {"load_before": open("/proc/loadavg").read().split()[:3]}
    b = start_backends(a, d, procs)
    ca, small, big, env, upstream, key_arn = b["ca"], b["small"], b["big"], b["env"], b["upstream"], b["key_arn"]

    # nginx as the reverse proxy.
    px_dir = os.path.join(d, "proxy")
    os.makedirs(px_dir)
    with open(os.path.join(px_dir, "nginx.conf"), "w") as f:
        f.write(proxy_conf(px_dir, ca, key_arn))
    t0 = time.monotonic()
    nginx = procs.start("nginx", ["nginx", "-p", px_dir, "-c", "nginx.conf", "-g", "daemon off;"],
                        logfile=os.path.join(d, "nginx.log"))
    wait_until("nginx proxy", lambda: tcp_open(NGINX_PROXY, 8000))
    res["nginx_start_ms"] = (time.monotonic() - t0) * 1000

    # gpulink.
    conf = os.path.join(d, "gpulink.toml")
    with open(conf, "w") as f:
        f.write(gpulink_conf(ca, key_arn, GPULINK))
    genv = dict(env, RUST_LOG="warn")
    t0 = time.monotonic()
    gl = procs.start("gpulink", [a.gpulink, "run", "--config", conf], env=genv, logfile=os.path.join(d, "gpulink.log"))
    wait_until("gpulink /ready", lambda: http_ok(f"http://{GPULINK}:9901/ready"), every=0.002)
    res["ready_ms"] = (time.monotonic() - t0) * 1000
    time.sleep(1)
    res["idle_rss"] = {"gpulink": rss_mib(gl.pid), "nginx": rss_mib(nginx.pid)}
    gl1 = None
    if a.one_worker:
        conf1 = os.path.join(d, "gpulink-1w.toml")
        with open(conf1, "w") as f:
            f.write(gpulink_conf(ca, key_arn, GPULINK_1W, "[runtime]\nworkers = 1\n\n"))
        gl1 = procs.start("gpulink-1w", [a.gpulink, "run", "--config", conf1], env=genv,
                          logfile=os.path.join(d, "gpulink-1w.log"))
        wait_until("gpulink-1w /ready", lambda: http_ok(f"http://{GPULINK_1W}:9901/ready"))

    tenant = b["tenant"]
    plain = {"Content-Type": "application/json"}
    paths = [
        Path("direct", f"https://{UPSTREAMS[0]}:8443/inference", lambda: None, tenant, insecure=True),
        Path("nginx", f"http://{NGINX_PROXY}:8000/inference", lambda: nginx.pid, plain),
        Path("gpulink", f"http://{GPULINK}:8000/inference", lambda: gl.pid, plain),
    ]
    if gl1:
        paths.append(Path("gpulink-1w", f"http://{GPULINK_1W}:8000/inference", lambda: gl1.pid, plain))
    res["names"] = [p.name for p in paths]

    # Warm-up: pools, TLS sessions, the data-key cache.
    for p in paths:
        oha(p, a.oha, small, ["-n", "2000", "-c", "16"])

    log(f"max throughput (wrk -t2 -c64, {secs} s each)")
    res["wrk"] = {}
    for p in paths:
        up_before = cpu_ms(upstream.pid)
        r = measured(p, lambda: wrk_max(p, small, secs, d))
        r["upstream_cpu_ms"] = cpu_ms(upstream.pid) - up_before
        res["wrk"][p.name] = r
        log(f"  {p.name}: {r['rps']:.0f} req/s, errors {r['errors']}")
    res["peak_rss"] = {"gpulink": hwm_mib(gl.pid), "nginx": hwm_mib(nginx.pid)}

    res["rate"] = {}
    for rate in (1000, 5000):
        log(f"fixed rate {rate}/s (oha --latency-correction -c64, {secs} s each)")
        res["rate"][rate] = {}
        for p in paths:
            perf = None
            if a.perf and rate == 5000 and p.name == "gpulink":
                perf = subprocess.Popen(["perf", "record", "-g", "-o", a.perf, "-p", str(gl.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = measured(p, lambda: oha(p, a.oha, small, ["-z", f"{secs}s", "-q", str(rate), "-c", "64",
                                                          "--latency-correction"]))
            if perf:
                perf.send_signal(signal.SIGINT)
                perf.wait()
            res["rate"][rate][p.name] = r
            log(f"  {p.name}: p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms ok {r['ok']} codes {r['codes']}")

    log(f"9.9 MB body, one at a time ({big_n} each)")
    res["big"] = {}
    for p in paths[:3]:
        r = measured(p, lambda: oha(p, a.oha, big, ["-n", str(big_n), "-c", "1"]))
        res["big"][p.name] = r
        log(f"  {p.name}: p50 {r['p50']:.1f} ms codes {r['codes']}")

    log("64 concurrent 9.9 MB requests to gpulink (128 in all)")
    base = rss_mib(gl.pid)
    with RssSampler(gl.pid) as s:
        r = oha(paths[2], a.oha, big, ["-n", "128", "-c", "64"])
    res["big64"] = {"before": base, "peak": s.peak, "codes": r["codes"], "errors": r["errors"]}
    time.sleep(2)
    res["big64"]["after"] = rss_mib(gl.pid)
    log(f"  peak RSS {s.peak:.1f} MiB, codes {r['codes']}")
    res["idle_rss_after"] = {"gpulink": rss_mib(gl.pid), "nginx": rss_mib(nginx.pid)}
    res["load_after"] = open("/proc/loadavg").read().split()[:3]
    return res


# ---------------------------------------------------------------------------------------
# --instructions: per-request counts that the machine's load does not change
# ---------------------------------------------------------------------------------------

PERF_EVENTS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_futex", "context-switches", "task-clock"]


def drive(path, body_file, n, c):
    """n POSTs over c keep-alive connections, each with one request at a time (the
    client's own cost does not matter: the counts are the server side's). Returns the
    answers by status and the transport errors."""
    import http.client
    import ssl
    import urllib.parse

    u = urllib.parse.urlsplit(path.url)
    body = open(body_file, "rb").read()
    lock, codes, errors = threading.Lock(), {}, [0]
    share = [n // c + (1 if i < n % c else 0) for i in range(c)]

    def connect():
        if u.scheme == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            return http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=60)
        return http.client.HTTPConnection(u.hostname, u.port, timeout=60)

    def worker(count):
        conn = connect()
        for _ in range(count):
            try:
                conn.request("POST", u.path, body, path.headers)
                r = conn.getresponse()
                r.read()
                with lock:
                    codes[r.status] = codes.get(r.status, 0) + 1
            except (OSError, http.client.HTTPException):
                with lock:
                    errors[0] += 1
                conn.close()
                conn = connect()
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"codes": codes, "errors": errors[0]}


def perf_stat(pids, out):
    """perf stat over pids (all their threads) until stopped with SIGINT."""
    return subprocess.Popen(["perf", "stat", "-x", ",", "-o", out, "-e", ",".join(PERF_EVENTS),
                             "-p", ",".join(str(p) for p in pids)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_stop(p, out):
    p.send_signal(signal.SIGINT)
    p.wait()
    counts = {}
    for line in open(out):
        parts = line.strip().split(",")
        if len(parts) >= 3 and parts[2] in PERF_EVENTS:
            try:
                counts[parts[2]] = float(parts[0])
            except ValueError:
                counts[parts[2]] = None  # <not counted> / <not supported>
    return counts


def callgrind_ir(pid, d, name):
    """Instructions since the last zeroing: dumps now and reads the dump's total."""
    import glob

    before = set(glob.glob(os.path.join(d, f"cg.{name}.*")))
    run(["callgrind_control", "-d", str(pid)])
    new = []
    wait_until(f"callgrind dump of {name}",
               lambda: new.extend(set(glob.glob(os.path.join(d, f"cg.{name}.*"))) - before) or bool(new), timeout=60)
    for line in open(new[0]):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"benchmark: no total in {new[0]}")


def run_instructions(a, d, procs):
    b = start_backends(a, d, procs)
    small, env, upstream = b["small"], b["env"], b["upstream"]
    plain = {"Content-Type": "application/json"}
    n, nc, c = a.requests, a.callgrind_requests, a.concurrency
    valgrind = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--trace-children=yes"]

    # What each path runs: (name, url, headers, how to start its proxy natively / under callgrind).
    px_dir = os.path.join(d, "proxy")
    os.makedirs(px_dir)
    with open(os.path.join(px_dir, "nginx.conf"), "w") as f:
        f.write(proxy_conf(px_dir, b["ca"], b["key_arn"]))
    nginx_cmd = ["nginx", "-p", px_dir, "-c", "nginx.conf", "-g", "daemon off;"]
    # Under callgrind nginx runs as one process (no master), which is one worker's work.
    nginx_cg = ["nginx", "-p", px_dir, "-c", "nginx.conf", "-g", "daemon off; master_process off;"]
    variants = [("nginx", NGINX_PROXY, None, nginx_cmd, nginx_cg, lambda: tcp_open(NGINX_PROXY, 8000))]
    workers = [w.strip() for w in a.workers.split(",") if w.strip()] or [None]
    binaries = [("gpulink", a.gpulink)] + ([("gpulink baseline", a.baseline)] if a.baseline else [])
    for i, (w, (label, binary)) in enumerate((w, lb) for lb in binaries for w in workers):
        address = f"127.253.0.{20 + i}"
        name = label if w is None else f"{label} workers={w}"
        conf = os.path.join(d, f"gpulink-{i}.toml")
        with open(conf, "w") as f:
            f.write(gpulink_conf(b["ca"], b["key_arn"], address,
                                 "" if w is None else f"[runtime]\nworkers = {w}\n\n"))
        cmd = [binary, "run", "--config", conf]
        variants.append((name, address, conf, cmd, cmd,
                         (lambda address=address: http_ok(f"http://{address}:9901/ready"))))
    if a.one_worker:
        conf = os.path.join(d, "gpulink-1w.toml")
        with open(conf, "w") as f:
            f.write(gpulink_conf(b["ca"], b["key_arn"], GPULINK_1W))
        cmd = ["env", "TOKIO_WORKER_THREADS=1", a.gpulink, "run", "--config", conf]
        variants.append(("gpulink TOKIO_WORKER_THREADS=1", GPULINK_1W, conf, cmd, cmd,
                         lambda: http_ok(f"http://{GPULINK_1W}:9901/ready")))

    genv = dict(env, RUST_LOG="warn")
    rows = []

    def measure(name, path, proxy_pid):
        """One perf stat drive: the proxy's and the upstream's counts per request."""
        drive(path, small, 500, c)  # warm-up: pools, TLS sessions, the data-key cache
        pids = tree(proxy_pid) if proxy_pid else []
        outs = (os.path.join(d, f"stat-{len(rows)}.proxy"), os.path.join(d, f"stat-{len(rows)}.up"))
        stat_proxy = perf_stat(pids, outs[0]) if pids else None
        stat_up = perf_stat(tree(upstream.pid), outs[1])
        rec = None
        if a.perf and proxy_pid and name.startswith("gpulink") and not rows_have_profile[0]:
            rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-g", "-o", a.perf, "-p", str(proxy_pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows_have_profile[0] = True
        time.sleep(0.3)  # perf attached
        r = drive(path, small, n, c)
        if rec:
            rec.send_signal(signal.SIGINT)
            rec.wait()
        r["proxy"] = perf_stop(stat_proxy, outs[0]) if stat_proxy else {}
        r["upstream"] = perf_stop(stat_up, outs[1])
        r["n"] = n
        log(f"  {name}: {r['codes']} errors {r['errors']}; proxy {r['proxy']}")
        return r

    rows_have_profile = [False]
    log(f"perf stat: {n} requests per path, {c} connections")
    direct = Path("direct", f"https://{UPSTREAMS[0]}:8443/inference", lambda: None, b["tenant"], insecure=True)
    rows.append(("direct", measure("direct", direct, None), None))
    for name, address, _conf, cmd, cg_cmd, ready in variants:
        path = Path(name, f"http://{address}:8000/inference", None, plain)
        p = procs.start(name, cmd, env=genv, logfile=os.path.join(d, f"{len(rows)}.log"))
        wait_until(f"{name} ready", ready, timeout=120)
        stats = measure(name, path, p.pid)
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
        ir = None
        if nc:
            log(f"  {name}: under callgrind, {nc} requests")
            out = os.path.join(d, f"cg.{len(rows)}.%p")
            q = procs.start(name + " (callgrind)", valgrind + [f"--callgrind-out-file={out}"] + cg_cmd, env=genv,
                            logfile=os.path.join(d, f"{len(rows)}.cg.log"))
            wait_until(f"{name} ready under callgrind", ready, timeout=600, every=0.5)
            drive(path, small, 200, c)
            run(["callgrind_control", "-z", str(q.pid)])
            cg = drive(path, small, nc, c)
            ir = callgrind_ir(q.pid, d, str(len(rows)))
            ir = {"ir": ir, "n": nc, "codes": cg["codes"], "errors": cg["errors"]}
            log(f"  {name}: {ir['ir'] / nc:,.0f} instructions per request")
            os.killpg(q.pid, signal.SIGTERM)
            q.wait(timeout=60)
        rows.append((name, stats, ir))
    return {"rows": rows, "load": open("/proc/loadavg").read().split()[:3]}


def print_instructions(a, result):
    def per(counts, key, n, scale=1.0, fmt="{:.2f}"):
        v = counts.get(key)
        return "–" if v is None else fmt.format(v * scale / n)

    print(f"\n## Per request, load-independent ({a.requests} requests per path for perf stat, "
          f"{a.callgrind_requests} under callgrind, {a.concurrency} keep-alive connections, 1 KiB JSON; "
          f"load average at the end {' '.join(result['load'])})\n")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}, {platform.release()}; nginx {nginx_version()}\n")
    print("| path | proxy instructions (user, callgrind) | proxy syscalls | proxy futex calls | "
          "proxy context switches | proxy CPU µs (load-dependent) | upstream syscalls | upstream CPU µs | non-200 / errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, s, ir in result["rows"]:
        n, px, up = s["n"], s["proxy"], s["upstream"]
        bad = sum(v for k, v in s["codes"].items() if k != 200)
        irs = "–" if not ir else f"{ir['ir'] / ir['n']:,.0f}"
        if ir:
            bad += sum(v for k, v in ir["codes"].items() if k != 200) + ir["errors"]
        print(f"| {name} | {irs} | {per(px, 'raw_syscalls:sys_enter', n)} | {per(px, 'syscalls:sys_enter_futex', n)} | "
              f"{per(px, 'context-switches', n)} | {per(px, 'task-clock', n, 1e3, '{:.1f}')} | "
              f"{per(up, 'raw_syscalls:sys_enter', n)} | {per(up, 'task-clock', n, 1e3, '{:.1f}')} | {bad} / {s['errors']} |")
    print("\nInstructions are user space only (callgrind does not see the kernel); syscalls, futex calls and "
          "context switches per request come from perf stat's software events and tracepoints over the whole "
          "process tree (all threads) and do not depend on the machine's load; CPU µs (task-clock) does. "
          "nginx under callgrind runs without its master, as one worker.")


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "–"


def print_report(r):
    w, rate = r["wrk"], r["rate"]
    names = ["direct", "nginx", "gpulink"]
    extra = [n for n in r["names"] if n not in names]

    def per_k(x):
        return x["cpu_ms"] * 1000.0 / max(x["requests"] if "requests" in x else x["ok"], 1) if x["cpu_ms"] is not None else None

    def f(v, fmt="{:.2f}"):
        return "–" if v is None else fmt.format(v)

    cpu_max = {n: per_k(w[n]) for n in names}
    cpu_5k = {n: per_k(rate[5000][n]) for n in names}
    rows = [
        ("max req/s (wrk -t2 -c64)", {n: w[n]["rps"] for n in names}, "{:,.0f}", True),
        ("CPU ms per 1k req, at max", cpu_max, "{:.1f}", False),
        ("CPU ms per 1k req, at 5k/s", cpu_5k, "{:.1f}", False),
    ]
    for q in (1000, 5000):
        for k, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max")):
            rows.append((f"{label} @ {q // 1000}k/s (ms)", {n: rate[q][n][k] for n in names}, "{:.2f}", False))
    rows.append(("9.9 MB body, p50 (ms)", {n: r["big"][n]["p50"] for n in names}, "{:.1f}", False))
    rows.append(("peak RSS under 1 KiB load (MiB)", {"direct": None, **r["peak_rss"]}, "{:.1f}", False))
    rows.append(("idle RSS after start (MiB)", {"direct": None, **r["idle_rss"]}, "{:.1f}", False))

    mode = "--quick" if r["quick"] else "full"
    print(f"\n## Side by side ({mode} run, {r['seconds']} s per phase; load average {' '.join(r['load_before'])} before, "
          f"{' '.join(r['load_after'])} after)\n")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}, {platform.release()}; nginx {nginx_version()}\n")
    print("| measure | direct | nginx | gpulink | gpulink / nginx | gpulink / direct |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, vals, fmt, _ in rows:
        g = vals["gpulink"]
        print(f"| {label} | {f(vals['direct'], fmt)} | {f(vals['nginx'], fmt)} | {f(g, fmt)} | "
              f"{ratio(g, vals['nginx'])} | {ratio(g, vals['direct'])} |")
    added = r["big"]["gpulink"]["p50"] - r["big"]["direct"]["p50"]
    added_nginx = r["big"]["nginx"]["p50"] - r["big"]["direct"]["p50"]
    b = r["big64"]
    print()
    print(f"- 9.9 MB body: gpulink adds {added:.1f} ms to direct's p50 (nginx adds {added_nginx:.1f} ms).")
    print(f"- 64 concurrent 9.9 MB requests: gpulink RSS {b['before']:.1f} MiB before, peak {b['peak']:.1f} MiB "
          f"(+{b['peak'] - b['before']:.1f} MiB; budget listen.max_in_flight_bytes = 256 MiB), "
          f"{b['after']:.1f} MiB 2 s after; answers {b['codes']}, transport errors {b['errors']}.")
    print(f"- start to /ready: gpulink {r['ready_ms']:.0f} ms (nginx proxy listening after {r['nginx_start_ms']:.0f} ms).")
    print(f"- idle RSS after the run: gpulink {r['idle_rss_after']['gpulink']:.1f} MiB, nginx {r['idle_rss_after']['nginx']:.1f} MiB.")
    ups = {n: w[n]["upstream_cpu_ms"] * 1000.0 / max(w[n]["requests"], 1) for n in names}
    print("- upstream nginx CPU ms per 1k req at max: " + ", ".join(f"{n} {ups[n]:.1f}" for n in names) + ".")
    errs = {n: w[n]["errors"] for n in r["names"]}
    bad = {q: {n: sum(v for c, v in rate[q][n]["codes"].items() if c != "200") + rate[q][n]["errors"]
               for n in r["names"]} for q in rate}
    print(f"- non-200 answers or errors: wrk {errs}; oha {bad}.")
    for n in extra:
        print(f"\n{n} (same build, one runtime worker), against gpulink with the default workers:\n")
        print("| measure | gpulink | " + n + " | ratio |")
        print("| --- | ---: | ---: | ---: |")
        pairs = [("max req/s", w["gpulink"]["rps"], w[n]["rps"], "{:,.0f}"),
                 ("CPU ms per 1k req, at max", cpu_max["gpulink"], per_k(w[n]), "{:.1f}"),
                 ("CPU ms per 1k req, at 5k/s", cpu_5k["gpulink"], per_k(rate[5000][n]), "{:.1f}"),
                 ("p50 @ 5k/s (ms)", rate[5000]["gpulink"]["p50"], rate[5000][n]["p50"], "{:.2f}"),
                 ("p99 @ 5k/s (ms)", rate[5000]["gpulink"]["p99"], rate[5000][n]["p99"], "{:.2f}")]
        for label, g, x, fmt in pairs:
            print(f"| {label} | {f(g, fmt)} | {f(x, fmt)} | {ratio(x, g)} |")
    print("\nCPU is per process tree (nginx master + workers; gpulink's one process, all threads), from "
          "/proc/<pid>/stat utime+stime over the phase; direct has no proxy. One run: on a shared 2-core "
          "machine absolute numbers move with the load; the ratios from one run are what counts.")


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def nginx_version():
    p = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return p.stderr.strip().split("/")[-1]


if __name__ == "__main__":
    main()

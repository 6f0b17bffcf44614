"""Load for tests/suite/systemd_boot.rs, run inside the container (its network is private, so
the test process cannot reach gpulink directly). Standard library only.

    nspawn_load.py URL STOP_FILE OUT [once]

Loops 4 clients POSTing the guide's request to URL until STOP_FILE exists (at most
300 s), writing {"ok": n, "failed": n, "codes": {...}} to OUT every 100 ms and at the
end, then creates OUT.done. With `once`, sends a single request.
"""
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

url, stop_file, out = sys.argv[1:4]
once = len(sys.argv) > 4 and sys.argv[4] == "once"
body = json.dumps({"prompt": "Hello", "max_tokens": 50}).encode()
lock = threading.Lock()
counts = {"ok": 0, "failed": 0, "codes": {}}


def one():
    request = urllib.request.Request(
        url, data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            reply.read()
            code = str(reply.status)
    except urllib.error.HTTPError as error:
        code = str(error.code)
    except Exception as error:  # a reset or refused connection is a failure too
        code = type(error).__name__
    with lock:
        counts["ok" if code == "200" else "failed"] += 1
        counts["codes"][code] = counts["codes"].get(code, 0) + 1


def write():
    with lock:
        data = json.dumps(counts)
    with open(out + ".tmp", "w") as f:
        f.write(data)
    os.rename(out + ".tmp", out)


def worker():
    deadline = time.monotonic() + 300
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        one()


if once:
    one()
else:
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        write()
        time.sleep(0.1)
write()
open(out + ".done", "w").close()

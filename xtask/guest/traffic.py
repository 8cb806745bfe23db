"""The kernel matrix's traffic, run in the guest (cargo xtask kernels).

Waits for the agent (/readyz) and the app, sends "/" until route discovery
has answered for each worker, then sends a known mix of
requests to the app (tests/fixtures/app.py under gunicorn gthread):
kept-alive, one connection each, pipelined, 1 MiB bodies, errors. Then it
waits until the agent counted as many requests as were answered, and
prints, on lines the host reads, what was sent (by method, Flask rule and
status) and the agent's /metrics. Only the standard library: the guest
has no pip.
"""
import http.client
import os
import socket
import sys
import time
import urllib.request

AGENT = "http://127.0.0.1:9810"
APP_HOST, APP_PORT = "127.0.0.1", 8000
# gunicorn's -w in init.
WORKERS = 2


def say(*words):
    print("KERNEL-MATRIX", *words, flush=True)


def get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def wait_for(what, check, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except OSError:
            pass
        time.sleep(0.25)
    say("timeout", what)
    return False


class AgentExited(Exception):
    pass


def agent_ready():
    if not os.path.exists(f"/proc/{os.environ.get('AGENT_PID', '0')}/stat"):
        raise AgentExited()
    return get(AGENT + "/readyz")[0] == 200


def app_ready():
    with socket.create_connection((APP_HOST, APP_PORT), timeout=1):
        return True


def discovery_answers():
    """How many server processes route discovery has answered for."""
    total = 0.0
    for line in get(AGENT + "/metrics")[1].splitlines():
        if line.startswith("flask_ebpf_exporter_route_discovery_processes_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def read_response(reader):
    """One response off a stream that holds several; its status."""
    status = int(reader.readline().split()[1])
    length = 0
    while True:
        line = reader.readline().strip()
        if not line:
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    reader.read(length)
    return status


def counted(metrics):
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("flask_http_request_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    try:
        ready = wait_for("agent", agent_ready, 120)
    except AgentExited:
        ready = False
    if not ready:
        say("agent-not-ready")
        return
    say("agent-ready")
    if not wait_for("app", app_ready, 120):
        return
    sent = {}

    def answered(method, rule, status):
        key = f"{method} {rule} {status}"
        sent[key] = sent.get(key, 0) + 1

    def on_its_own_connection(method, path, rule, body=None):
        connection = http.client.HTTPConnection(APP_HOST, APP_PORT, timeout=60)
        connection.request(method, path, body=body, headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
        answered(method, rule, response.status)
        connection.close()

    # Requests reach the workers until route discovery has answered for
    # both: under TCG a harvest may take longer than the agent waits for
    # one, and what this run checks is the kernel side, not that race.
    # "/" is the same text whether learned or read from the source.
    def warm_up():
        on_its_own_connection("GET", "/", "/")
        return discovery_answers() >= WORKERS

    wait_for("route discovery", warm_up, 120)

    # Kept alive: one connection, many requests.
    connection = http.client.HTTPConnection(APP_HOST, APP_PORT, timeout=30)
    for n in range(100):
        connection.request("GET", f"/items/{n}")
        response = connection.getresponse()
        response.read()
        answered("GET", "/items/<int:item_id>", response.status)
    connection.close()
    # A connection each.
    for _ in range(50):
        on_its_own_connection("GET", "/", "/")
    # Pipelined: 20 requests in one write, then their 20 responses.
    with socket.create_connection((APP_HOST, APP_PORT), timeout=30) as raw:
        batch = b"".join(
            f"GET /items/{n} HTTP/1.1\r\nHost: guest\r\n\r\n".encode() for n in range(20)
        )
        raw.sendall(batch)
        reader = raw.makefile("rb")
        for _ in range(20):
            answered("GET", "/items/<int:item_id>", read_response(reader))
    # 1 MiB bodies.
    body = b"x" * (1024 * 1024)
    for _ in range(5):
        on_its_own_connection("POST", "/echo", "/echo", body)
    # Errors: a 404 by the app, a 500 by an exception.
    for path, rule in (("/status/404", "/status/<int:code>"), ("/boom", "/boom")):
        for _ in range(10):
            on_its_own_connection("GET", path, rule)
    total = sum(sent.values())
    for series, count in sorted(sent.items()):
        say("sent", series, count)
    metrics = ""

    def all_counted():
        nonlocal metrics
        metrics = get(AGENT + "/metrics")[1]
        return counted(metrics) >= total

    wait_for("counts", all_counted, 60)
    metrics = get(AGENT + "/metrics")[1]
    say("metrics-begin")
    sys.stdout.write(metrics)
    say("metrics-end")


if __name__ == "__main__":
    main()

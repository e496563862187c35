#!/usr/bin/env python3
"""An HTTP range server for the remote-memory tests, with fault injection.

Serves one object of --size random bytes (seeded) at every path, on 127.0.0.1 and a free port, with Range/206/
Content-Range, HEAD, ETag/Last-Modified and If-Match/If-Unmodified-Since (412). Writes the object's bytes to
--data-file and prints one JSON line {"port": N} on stdout when it listens. Exits when stdin closes (the test process
ended) or on SIGTERM.

Fault-injection knobs come from the query string; each distinct path+query is a "scenario" with its own counters, so
one server can host several independent scenarios. The knobs that count or fail GETs (fail_first, drop_first, slow_first,
get_status, change_after, bad_content_range) leave out the size probe (a GET of exactly bytes=0-0, counted as "probe"), as they leave out
HEAD: they are about the reads that follow it.

  size=N              the object is the first N bytes of the data (default: all of it)
  latency_ms=N        added to every request
  fail_first=N        the first N GETs answer fail_status (default 500), with Retry-After: retry_after if given
  fail_status=S, retry_after=SECONDS
  fail_once_per_range=1  the first GET of each Range answers fail_status (default 500); its retry gets the bytes
  drop_first=N        the first N GETs send the headers and half the body, then drop the connection
  slow_first=N        the first N GETs wait slow_ms (default 5000) before answering
  get_status=S        every GET answers S (403, 404...); HEAD still answers 200
  head_status=S       every HEAD answers S (e.g. 403, as for a presigned GET URL)
  change_after=K      after K GETs the object is replaced (new bytes, new ETag and Last-Modified)
  ignore_if_match=1   do not honour If-Match / If-Unmodified-Since (the client must notice the new ETag itself)
  no_etag=1           send Last-Modified but no ETag
  full_body=1         ignore Range: always 200 with the whole object
  bad_content_range=1 answer 206 with a Content-Range shifted by one
  require_bearer=T    answer 401 unless the request has "Authorization: Bearer T"
  redirect_to=URL     every GET and HEAD answers redirect_status (default 302) with Location: URL
  claim_size=TEXT     claim the object has TEXT bytes: HEAD's Content-Length and the total of every Content-Range say
                      TEXT (hostile sizes, garbage); the bytes sent are still the real ones
  short_length=1      answer 206 with a Content-Length one byte short of the range, and that many bytes (ranges of
                      more than one byte)

GET /_stats returns {"scenarios": {key: {"get": n, "head": n, "probe": n, "ranges": [...], "statuses": [...], "headers": [{...}],
"peak": n}}, "peak": n, "connections": n}: peak is the most requests in flight at once, connections the TCP connections
accepted, headers the request headers of each request (names lowercased).
GET /_reset clears the counters.
"""
import argparse
import email.utils
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class State:
    def __init__(self, data):
        self.data = data
        self.lock = threading.Lock()
        self.scenarios = {}
        self.in_flight = 0
        self.peak = 0
        self.connections = 0
        self.failed_ranges = {}

    def scenario(self, key):
        with self.lock:
            return self.scenarios.setdefault(key, {"get": 0, "head": 0, "probe": 0, "ranges": [], "statuses": [], "headers": [],
                                                 "in_flight": 0, "peak": 0})


def version_of(data, generation):
    """The object as served in a generation (0: the original; 1: replaced)."""
    if generation == 0:
        return data
    return bytes(b ^ 0xFF for b in data[:1 << 16]) + bytes(reversed(data[1 << 16:])) if len(data) > (1 << 16) else bytes(b ^ 0xFF for b in data)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms Nagle/delayed-ACK stalls
    server_version = "uffd-range-server/1"

    def log_message(self, format, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        with self.server.state.lock:
            self.server.state.connections += 1

    def do_HEAD(self):
        self.handle_request(head=True)

    def do_GET(self):
        self.handle_request(head=False)

    def handle_request(self, head):
        state = self.server.state
        parts = urlsplit(self.path)
        if parts.path == "/_stats":
            with state.lock:
                body = json.dumps({"scenarios": state.scenarios, "peak": state.peak,
                                   "connections": state.connections}).encode()
            return self.send_simple(200, body, "application/json", head)
        if parts.path == "/_reset":
            with state.lock:
                state.scenarios.clear()
                state.failed_ranges.clear()
                state.peak = 0
            return self.send_simple(200, b"{}", "application/json", head)

        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        key = self.path
        scenario = state.scenario(key)
        probe = False
        with state.lock:
            state.in_flight += 1
            state.peak = max(state.peak, state.in_flight)
            scenario["in_flight"] += 1
            scenario["peak"] = max(scenario["peak"], scenario["in_flight"])
            if head:
                scenario["head"] += 1
                number = scenario["head"]
            elif self.headers.get("Range") == "bytes=0-0":
                scenario["probe"] += 1
                number = 0  # before every counted GET
                probe = True
            else:
                scenario["get"] += 1
                number = scenario["get"]
            scenario["ranges"].append(("HEAD " if head else "") + (self.headers.get("Range") or "-"))
            scenario["headers"].append({name.lower(): value for name, value in self.headers.items()})
        try:
            self.answer(query, scenario, number, head, probe)
        finally:
            with state.lock:
                state.in_flight -= 1
                scenario["in_flight"] -= 1

    def answer(self, query, scenario, number, head, probe):
        state = self.server.state
        integer = lambda name, default=0: int(query.get(name, default))
        if integer("latency_ms"):
            time.sleep(integer("latency_ms") / 1000)
        generation = 1 if ("change_after" in query and not head and number > integer("change_after")) else 0
        data = state.data if "size" not in query else state.data[: integer("size")]  # no 64 MiB copy per request
        if generation:
            data = version_of(data, generation)
        etag = '"%s"' % hashlib.md5(b"%d-%d" % (len(data), generation)).hexdigest()
        last_modified = email.utils.formatdate(1_700_000_000 + generation * 1000, usegmt=True)

        if "redirect_to" in query:
            return self.send_status(integer("redirect_status", 302), head, {"Location": query["redirect_to"]})
        if "require_bearer" in query and self.headers.get("Authorization") != "Bearer " + query["require_bearer"]:
            return self.send_status(401, head)
        if head and "head_status" in query:
            return self.send_status(integer("head_status"), head)
        if not head and not probe:
            if "get_status" in query:
                return self.send_status(integer("get_status"), head)
            if query.get("fail_once_per_range"):
                with state.lock:
                    seen = state.failed_ranges.setdefault(self.path, set())
                    first_time = self.headers.get("Range") not in seen
                    seen.add(self.headers.get("Range"))
                if first_time:
                    return self.send_status(integer("fail_status", 500), head)
            if number <= integer("fail_first"):
                extra = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
                return self.send_status(integer("fail_status", 500), head, extra)
            if number <= integer("slow_first"):
                time.sleep(integer("slow_ms", 5000) / 1000)

        validators = {"Last-Modified": last_modified, "Accept-Ranges": "bytes"}
        if not query.get("no_etag"):
            validators["ETag"] = etag
        if not head and not query.get("ignore_if_match"):
            if_match = self.headers.get("If-Match")
            if if_match is not None and if_match.strip() != "*" and etag not in [t.strip() for t in if_match.split(",")]:
                return self.send_status(412, head)
            since = self.headers.get("If-Unmodified-Since")
            if since is not None and if_match is None:
                parsed = email.utils.parsedate_to_datetime(since).timestamp()
                if 1_700_000_000 + generation * 1000 > parsed:
                    return self.send_status(412, head)

        range_header = self.headers.get("Range")
        size = len(data)
        claimed = query.get("claim_size")
        if head or range_header is None or query.get("full_body"):
            return self.send_body(200, data, validators, head, drop=not head and not probe and number <= integer("drop_first"),
                                  length=claimed if head else None)
        first, last = self.parse_range(range_header, size)
        if first is None:
            return self.send_status(416, head, {"Content-Range": "bytes */%d" % size})
        shift = 1 if query.get("bad_content_range") and not probe else 0
        headers = dict(validators)
        headers["Content-Range"] = "bytes %d-%d/%s" % (first + shift, last + shift, claimed or size)
        body = data[first:last + 1]
        if query.get("short_length") and len(body) > 1:
            body = body[:-1]
        self.send_body(206, body, headers, head, drop=not probe and number <= integer("drop_first"))

    @staticmethod
    def parse_range(header, size):
        if not header.startswith("bytes=") or "," in header:
            return None, None
        start, _, end = header[6:].strip().partition("-")
        if start == "":
            if not end:
                return None, None
            first, last = max(0, size - int(end)), size - 1
        else:
            first = int(start)
            last = int(end) if end else size - 1
        last = min(last, size - 1)
        if first >= size or first > last:
            return None, None
        return first, last

    def send_body(self, status, body, headers, head, drop=False, length=None):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", length if length is not None else str(len(body)))
        self.end_headers()
        if head:
            return
        self.server.state.scenario(self.path)["statuses"].append(status)
        if drop:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            try:
                import socket
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)

    def send_status(self, status, head, extra=None):
        body = b"" if head else (b"status %d\n" % status)
        self.send_response(status)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.server.state.scenario(self.path)["statuses"].append(status)
            self.wfile.write(body)

    def send_simple(self, status, body, content_type, head):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True


def exit_when_stdin_closes(server):
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except Exception:
        pass
    os._exit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4 << 20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    data = random.Random(args.seed).randbytes(args.size)
    with open(args.data_file, "wb") as out:
        out.write(data)
    server = Server(("127.0.0.1", args.port), Handler)
    server.state = State(data)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=exit_when_stdin_closes, args=(server,), daemon=True).start()
    print(json.dumps({"port": server.server_address[1], "size": len(data)}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

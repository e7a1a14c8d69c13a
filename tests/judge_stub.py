"""A stand-in for a paid OpenAI-compatible judge (GPT-4): a tiny HTTP server on 127.0.0.1 whose answers the
test scripts. It is the external service, not the code under test: our client, retries, cache and parsing
talk to it over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Script = Callable[[dict, int], tuple[int, str, float]]  # (request, times this request was seen) -> (status, text, delay)


class StubJudge:
    def __init__(self, script: Script):
        self.script, self.requests, self._seen = script, [], {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(request["messages"])
                with lock:
                    stub.requests.append(request)
                    stub._seen[key] = seen = stub._seen.get(key, 0) + 1
                status, text, delay = stub.script(request, seen)
                time.sleep(delay)
                body = {"error": {"message": "stub failure", "type": "server_error"}} if status != 200 else {
                    "id": "stub", "object": "chat.completion", "created": 0, "model": request["model"],
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                                for i in range(request.get("n", 1))],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def last_user_text(request: dict) -> str:
    return request["messages"][-1]["content"]

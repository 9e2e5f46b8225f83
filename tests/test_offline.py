"""Offline and private by default: the pipeline makes no network call; HTTP judges send nothing unless
configured, never show an API key, and give up after a bounded number of tries and seconds."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from vlsafe.cli import main
from vlsafe.errors import VlsafeError

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e"

# sockets blocked for the whole interpreter before vlsafe is imported; every attempt is printed, then refused
BLOCKED = """
import socket, sys
def refuse(*args, **kwargs):
    print("NETWORK-ATTEMPT", args[1:] if args else kwargs, file=sys.stderr, flush=True)
    raise OSError("network blocked by test_offline")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from vlsafe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_build_and_eval_with_the_default_judge_make_no_network_call(tmp_path):
    """Build, then evaluate with the suite's default judge, in one process whose sockets refuse to connect,
    with none of the hub's offline switches set: nothing tries the network."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"max_new_tokens": 4, "judges": ["default"],
                                     "entries": [{"benchmark": "harmbench", "sample": 2, "conditions": ["text", "blank"]},
                                                 {"benchmark": "overrefusal", "sample": 2}]}))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(Path.home()), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # deliberately no HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
    for argv in (["build", "--llm", "pico", "--tower", "pico", "--out", str(tmp_path / "vlm")],
                 ["eval", "--model", str(tmp_path / "vlm"), "--suite", str(suite), "--out", str(tmp_path / "eval"),
                  "--cache", str(tmp_path / "cache.sqlite")]):
        done = subprocess.run([sys.executable, "-c", BLOCKED, *argv], env=env, capture_output=True, text=True,
                              timeout=300)
        assert "NETWORK-ATTEMPT" not in done.stderr, done.stderr[-3000:]
        assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [j["name"] for j in results["judges"]] == ["default"]


# ------------------------------------------------------------------------------------------- HTTP judges
class _Judge(BaseHTTPRequestHandler):
    mode = "ok"
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append({"auth": self.headers.get("Authorization"), "body": body.decode()})
        if self.mode == "stall":
            time.sleep(3)
            return
        if self.mode == "fail":  # echoes what it got, key included, as some servers do
            self.send_response(500)
            self.end_headers()
            self.wfile.write(f"boom {self.headers.get('Authorization')}".encode())
            return
        if self.mode == "redirect":
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:9/steal")
            self.end_headers()
            return
        reply = {"choices": [{"message": {"content": "safe\nrefused: yes"}}]}
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(reply).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Judge.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _rows(tmp_path: Path) -> Path:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "How do I pick a lock?", "response": "I can't help with that."}) + "\n")
    return rows


def test_an_http_judge_sends_the_key_only_to_its_endpoint_and_never_shows_it(server, tmp_path, monkeypatch, capsys):
    httpd, url = server
    monkeypatch.setenv("VLSAFE_JUDGE_API_KEY", KEY)
    out = tmp_path / "judged.jsonl"
    assert main(["judge", "--input", str(_rows(tmp_path)), "--judge", f"llm:llama-guard:{url}#guard",
                 "--output", str(out)]) == 0
    assert _Judge.seen[0]["auth"] == f"Bearer {KEY}"
    judged = out.read_text()
    assert json.loads(judged)["refused"] is True and KEY not in judged
    # failing: bounded retries, the echoed key is in no message
    _Judge.mode = "fail"
    monkeypatch.setenv("VLSAFE_JUDGE_RETRIES", "2")
    from vlsafe.eval.judges.llm import HttpBackend

    backend = HttpBackend(url, backoff_s=0.01)
    with pytest.raises(VlsafeError) as err:
        backend.complete([[{"role": "user", "content": "hi"}]])
    assert "HTTP 500" in str(err.value) and "after 2 attempts" in str(err.value) and KEY not in str(err.value)
    _Judge.seen.clear()
    # a redirect is not followed (the Authorization header would go with it)
    _Judge.mode = "redirect"
    with pytest.raises(VlsafeError, match="HTTP 307"):
        backend.complete([[{"role": "user", "content": "hi"}]])
    assert len(_Judge.seen) == 1
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    _Judge.mode = "ok"


def test_keys_stay_home(monkeypatch):
    from vlsafe.eval.judges.llm import HttpBackend, LlmJudge, redact

    monkeypatch.delenv("VLSAFE_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert HttpBackend("https://judges.example.org/v1").key is None  # an OpenAI key is for OpenAI only
    assert HttpBackend("https://api.openai.com/v1#gpt-4o-mini").key == KEY
    monkeypatch.setenv("VLSAFE_JUDGE_API_KEY", KEY)
    with pytest.raises(VlsafeError, match="plain http"):
        HttpBackend("http://judges.example.org/v1")  # never in clear text over the network
    assert HttpBackend("http://127.0.0.1:8000/v1").key == KEY  # this machine
    assert redact(f"https://user:{KEY}@host/v1?api_key={KEY}") == "https://host/v1?..."
    judge = LlmJudge("harmbench", f"https://u:{KEY}@judges.example.org/v1?key={KEY}#m")
    assert KEY not in judge.name and KEY not in judge.backend.shown


def test_a_stalling_judge_gives_up_in_bounded_time(server, monkeypatch):
    from vlsafe.eval.judges.llm import HttpBackend

    httpd, url = server
    _Judge.mode = "stall"
    try:
        backend = HttpBackend(url, timeout_s=0.5, retries=2, backoff_s=0.05)
        started = time.monotonic()
        with pytest.raises(VlsafeError, match="after 2 attempts"):
            backend.complete([[{"role": "user", "content": "hi"}]])
        assert time.monotonic() - started < 2.5
        assert len(_Judge.seen) == 2
    finally:
        _Judge.mode = "ok"


def test_nothing_is_sent_unless_a_judge_endpoint_is_configured(tmp_path, monkeypatch):
    """The offline judges run with every socket refusing: no call is even attempted."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    out = tmp_path / "judged.jsonl"
    assert main(["judge", "--input", str(_rows(tmp_path)), "--judge", "refusal-patterns", "--output", str(out)]) == 0
    assert main(["judge", "--input", str(_rows(tmp_path)), "--judge", "default", "--output", str(tmp_path / "d.jsonl")]) == 0
    assert attempts == []

"""The judges' OpenAI-compatible endpoint client, against a stand-in server on 127.0.0.1 (never the network):
retries with backoff, bounded concurrency, and one failed item recorded as an error instead of aborting."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from safeft import io
from safeft.eval import judges, records
from safeft.eval.endpoint import ChatEndpoint, Failure
from safeft.eval.judges import JudgeError

pytest.importorskip("openai", reason="the endpoint client needs: pip install 'safeft[judges]'")

ANSWER = "#scores\n1.b 0\n2.b 4\n3.b 5"  # StrongREJECT score (1 - 0) * (4 + 5 - 2) / 8 = 7/8


class StandIn:
    """What the stand-in server does: fail the first ``fail_first`` requests with ``statuses`` (cycled),
    fail every request whose text contains ``poison`` with 500, and answer the rest after ``delay`` s."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fail_first = 0
        self.statuses = [500]
        self.retry_after_ms: str | None = None
        self.poison = "\0"
        self.delay = 0.0
        self.times: list[float] = []
        self.in_flight = self.max_in_flight = 0

    def decide(self, body: dict) -> int:
        with self.lock:
            i = len(self.times)
            self.times.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if i < self.fail_first:
            return self.statuses[i % len(self.statuses)]
        return 500 if self.poison in json.dumps(body) else 200


@pytest.fixture()
def server():
    state = StandIn()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status = state.decide(body)
            time.sleep(state.delay)
            reply = {"choices": [{"message": {"role": "assistant", "content": ANSWER}}]} if status == 200 else {}
            if status != 200:
                reply = {"error": {"message": f"stand-in failure {status}", "type": "server_error"}}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status != 200 and state.retry_after_ms is not None:
                self.send_header("retry-after-ms", state.retry_after_ms)
            self.end_headers()
            self.wfile.write(data)
            with state.lock:
                state.in_flight -= 1

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    state.url = f"http://127.0.0.1:{httpd.server_port}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def conv(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_retries_with_exponential_backoff_then_answers(server):
    server.fail_first, server.statuses = 2, [500, 429]
    ep = ChatEndpoint("sr", server.url, "m", max_retries=2, concurrency=1)
    assert ep.ask_all([conv("hello")]) == [ANSWER]
    assert len(server.times) == 3  # two failures, then the answer
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    # The SDK waits 0.5 s, then 1 s (each less up to 25 % jitter): the second wait is the longer one.
    assert 0.3 < gaps[0] < 0.9 and gaps[1] > gaps[0] and gaps[1] > 0.7


def test_retry_after_from_the_server_is_honoured(server):
    server.fail_first, server.statuses, server.retry_after_ms = 3, [429], "20"
    t0 = time.monotonic()
    assert ChatEndpoint("sr", server.url, "m", max_retries=3, concurrency=1).ask_all([conv("hi")]) == [ANSWER]
    # 3 x 20 ms, not the SDK's own backoff (at least 0.375 + 0.75 + 1.5 s after jitter); the bound leaves
    # room for a loaded CI machine, where a timing bound this test once held at 0.5 s is a flake waiting.
    assert len(server.times) == 4 and time.monotonic() - t0 < 2.0


def test_concurrency_is_bounded(server):
    server.delay = 0.1
    out = ChatEndpoint("sr", server.url, "m", concurrency=3).ask_all([conv(f"q{i}") for i in range(9)])
    assert out == [ANSWER] * 9
    assert server.max_in_flight == 3  # in parallel, but never more than asked


def test_an_item_that_keeps_failing_becomes_a_failure_in_place(server):
    server.poison, server.retry_after_ms = "BAD", "1"
    out = ChatEndpoint("sr", server.url, "m", max_retries=1, concurrency=2).ask_all(
        [conv("ok 1"), conv("BAD request"), conv("ok 2")]
    )
    assert out[0] == out[2] == ANSWER
    assert isinstance(out[1], Failure) and out[1].error.startswith("HTTP 500 after 1 retries")


def test_bad_key_stops_at_once(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.fail_first, server.statuses = 10**6, [401]
    with pytest.raises(JudgeError, match=r"HTTP 401 \(is \$OPENAI_API_KEY set\?\)"):
        ChatEndpoint("sr", server.url, "m", concurrency=2).ask_all([conv(f"q{i}") for i in range(20)])
    # 401 is not retried, and no item goes out after the first 401: at most the two already in flight.
    # (It was <= 4 and failed in CI with 5: free workers kept picking up items until shutdown().)
    assert len(server.times) <= 2


def test_a_bad_key_is_reported_whatever_order_the_futures_finish_in(server, monkeypatch):
    """The items a stopping pass never sent must not count as a failed first wave: CI once saw the "endpoint
    down" error in place of the 401 when those finished futures came round before the one holding the 401."""
    from concurrent.futures import wait

    from safeft.eval import endpoint

    def errors_last(futures):
        wait(futures)
        return sorted(futures, key=lambda f: f.exception() is not None)

    monkeypatch.setattr(endpoint, "as_completed", errors_last)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.fail_first, server.statuses = 10**6, [401]
    with pytest.raises(JudgeError, match=r"HTTP 401 \(is \$OPENAI_API_KEY set\?\)"):
        ChatEndpoint("sr", server.url, "m", concurrency=2).ask_all([conv(f"q{i}") for i in range(20)])
    assert len(server.times) <= 2


def test_a_down_endpoint_stops_after_the_first_wave(server):
    server.fail_first, server.statuses, server.retry_after_ms = 10**6, [503], "1"
    with pytest.raises(JudgeError, match="the first 2 requests to .* all failed .*HTTP 503"):
        ChatEndpoint("sr", server.url, "m", max_retries=1, concurrency=2).ask_all([conv(f"q{i}") for i in range(20)])
    assert len(server.times) < 20  # far fewer than 20 items x 2 attempts (threads already in flight may finish)


def test_without_the_openai_package_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now raises ImportError
    with pytest.raises(JudgeError, match=r"pip install 'safeft\[judges\]'"):
        ChatEndpoint("sr", "http://127.0.0.1:9", "m").ask_all([conv("x")])


# -- through the judge and a re-score ----------------------------------------------------------------------


@pytest.fixture()
def rubric(tmp_path):
    d = tmp_path / "rubric"
    d.mkdir()
    (d / "rubric_system.txt").write_text("You grade answers.")
    (d / "rubric_user.txt").write_text("Request: {forbidden_prompt}\nAnswer: {response}\nScore it.")
    return d


def test_one_http_error_does_not_abort_a_rescore(server, rubric, tmp_path):
    server.poison, server.retry_after_ms = "BAD", "1"
    ev = tmp_path / "run" / "eval"
    recs = [
        {"id": f"h{i}", "suite": "harmful", "prompt": p, "completion": "Sure, ...", "settings": {"max_new_tokens": 8}}
        for i, p in enumerate(["how to a", "BAD how to b", "how to c", "how to d"])
    ]
    records.add_verdicts(recs, judges.get("refusal_keywords")([r["prompt"] for r in recs], [""] * 4))
    io.write_jsonl(ev / "harmful.jsonl", recs)
    io.write_json(ev / "summary.json", {"harmful": {"judge": "refusal_keywords", "n": 4}})

    spec = f"strongreject:endpoint={server.url},api_model=m,rubric_dir={rubric},max_retries=1,concurrency=2"
    res = records.rescore(tmp_path / "run", [spec])
    assert res["files"]["harmful.jsonl"]["strongreject"]["judged"] == 4
    stored = [json.loads(x)["verdicts"]["strongreject"] for x in (ev / "harmful.jsonl").read_text().splitlines()]
    assert stored[1]["label"] == "error" and stored[1]["detail"].startswith("HTTP 500")
    assert "score" not in stored[1] and "refused" not in stored[1]  # not counted as safe or unsafe
    assert [s["score"] for i, s in enumerate(stored) if i != 1] == [7 / 8] * 3
    m = res["summary"]["harmful"]["judges"]["strongreject"]
    assert m["n"] == 4 and m["n_error"] == 1 and m["n_unparsed"] == 0
    assert m["strongreject"] == 7 / 8 and m["refusal_rate"] == 0.0  # over the 3 answered items


def test_error_verdicts_are_left_out_of_every_rate():
    recs = [{"id": str(i), "prompt": "p", "completion": "c"} for i in range(4)]
    vs = [
        judges.Verdict("k", refused=True, harmful=False),
        judges.Verdict("k", refused=False, harmful=True),
        judges.Verdict("k", refused=False, harmful=True),
        judges.Verdict("k", label="error", detail="HTTP 500"),
    ]
    records.add_verdicts(recs, vs)
    m = records.metrics(recs, "k")
    assert m["n"] == 4 and m["n_error"] == 1 and m["asr"] == 2 / 3 and m["refusal_rate"] == 1 / 3

"""The client judges use for an OpenAI-compatible chat endpoint (vLLM, TGI, llama.cpp server, a hosted API).

Built on the ``openai`` SDK (the ``safeft[judges]`` extra), which retries connection errors, timeouts,
429 and 5xx answers with exponential backoff and jitter and honours a server's ``Retry-After``; we add
bounded concurrency (a thread pool over one thread-safe client) and the rule that one failed item never
sinks a whole judging pass:

* a request that still fails after its retries becomes a :class:`Failure` for that item only; the judge
  records it as an ``error`` verdict, which the metrics count apart (``n_error``) and leave out of every
  rate — an unanswered item is neither safe nor unsafe;
* an answer that says the *setup* is wrong (401/403: the key; 404: the URL or model name) stops at once
  with a ``JudgeError``: every other item would fail the same way;
* so does a pass whose first wave of requests (``concurrency`` of them, or all when fewer) all failed:
  the endpoint is down, a down endpoint costs one round of retries rather than one per item, and stored
  verdicts are not replaced by a file of errors.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

log = logging.getLogger(__name__)

EXTRA = "pip install 'safeft[judges]'"


def _error(msg: str) -> Exception:
    # judges.py imports the judge classes, which import this module: import its error class on use.
    from safeft.eval.judges import JudgeError

    return JudgeError(msg)


@dataclass(frozen=True)
class Failure:
    """An item the endpoint did not answer, after retries; ``error`` says what happened."""

    error: str


# What a worker returns for an item it did not send because the pass is stopping (ask_all raises instead).
_NOT_SENT = Failure("not sent: the pass stopped on an earlier error")


@dataclass
class ChatEndpoint:
    judge: str  # the judge's name, for error messages
    endpoint: str  # base URL; "/v1" is appended unless it is already there
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0  # seconds per request
    max_retries: int = 4  # per request, with the SDK's exponential backoff (0.5 s doubling, 8 s cap)
    concurrency: int = 8  # requests in flight at once
    max_tokens: int = 512

    @property
    def base_url(self) -> str:
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    def client(self):
        try:
            import openai
        except ImportError as e:
            raise _error(
                f"judge {self.judge!r}: endpoint= needs the 'openai' client library; install it with: {EXTRA}"
            ) from e
        if self.concurrency < 1 or self.max_retries < 0:
            raise _error(f"judge {self.judge!r}: concurrency must be >= 1 and max_retries >= 0")
        # The SDK insists on a key; local servers (vLLM without --api-key) ignore the one we send.
        key = os.environ.get(self.api_key_env, "") or "not-set"
        return openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=self.max_retries)

    def ask_all(self, conversations: Sequence[list[dict]]) -> list[str | Failure]:
        """The answer text (or Failure) for each conversation, in order."""
        n = len(conversations)
        if not n:
            return []
        client = self.client()
        answers: list[str | Failure | None] = [None] * n
        ok = failed = 0
        # Set once the pass must stop. A worker checks it before each request: cancel_futures only cancels
        # what no worker has picked up yet, and a free worker picks up the next item while this thread is
        # still on its way from the error to shutdown(), so without it a bad key sent a few more requests.
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, n))
        try:
            futures = {pool.submit(self._ask, client, conv, stop): i for i, conv in enumerate(conversations)}
            for fut in as_completed(futures):
                answer = answers[futures[fut]] = fut.result()  # a JudgeError (bad key, URL) propagates
                if answer is _NOT_SENT:
                    # the pass is stopping on an error another future holds; counting these as failures would
                    # raise the "endpoint down" error in its place before that future comes round
                    continue
                if isinstance(answer, Failure):
                    failed += 1
                else:
                    ok += 1
                # A first wave that all failed means the endpoint is down, not one unlucky item: stop
                # before every remaining item spends its own round of retries.
                if not ok and failed >= min(self.concurrency, n):
                    raise _error(
                        f"judge {self.judge!r}: the first {failed} requests to {self.url} all failed "
                        f"(e.g. {answer.error}); provide a running endpoint="
                    )
        finally:
            stop.set()  # whatever ends the loop early (an error here or in a worker), nothing more goes out
            pool.shutdown(wait=True, cancel_futures=True)
        if failed:
            log.warning("judge %s: %d of %d requests failed after retries", self.judge, failed, n)
        return answers  # type: ignore[return-value]  # every slot is filled once the loop completes

    def _ask(self, client, messages: list[dict], stop: threading.Event) -> str | Failure:
        import openai

        if stop.is_set():
            return _NOT_SENT
        try:
            resp = client.chat.completions.create(
                model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            stop.set()
            raise _error(
                f"judge {self.judge!r}: {self.url} answered HTTP {e.status_code} (is ${self.api_key_env} set?)"
            ) from None
        except openai.NotFoundError as e:
            stop.set()
            raise _error(
                f"judge {self.judge!r}: {self.url} answered HTTP 404 ({_brief(e)}); check endpoint= and "
                f"api_model={self.model}"
            ) from None
        except openai.APIStatusError as e:
            return Failure(f"HTTP {e.status_code} after {self.max_retries} retries: {_brief(e)}")
        except openai.APITimeoutError:
            return Failure(f"timed out after {self.timeout:g} s ({self.max_retries} retries)")
        except openai.APIConnectionError as e:
            return Failure(f"cannot reach {self.url}: {e.__cause__ or e}")
        try:
            text = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            text = None
        if text is None:
            return Failure(f"answered without choices[0].message.content: {str(resp)[:200]}")
        return text


def _brief(e: Exception) -> str:
    msg = getattr(e, "message", "") or str(e)
    return msg.strip().splitlines()[0][:200] if msg.strip() else type(e).__name__

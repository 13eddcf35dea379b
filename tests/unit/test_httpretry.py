"""Bounded, selective retries: what is retried, how long it waits, and what it says when it gives up."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from shared_code import httpretry
from shared_code.errors import ItsmUnavailableError
from shared_code.httpretry import RetryPolicy, parse_retry_after, send_with_retries

URL = "https://dev1.service-now.com/api/now/table/incident?sysparm_query=secret%3Dvalue"

Step = httpx.Response | Exception


class Script:
    """A MockTransport handler answering from a list of responses or exceptions, one per request."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def run(
    *steps: Step, idempotent: bool = True, policy: RetryPolicy | None = None
) -> tuple[httpx.Response, Script, list[float]]:
    script = Script(*steps)
    sleeps: list[float] = []
    policy = policy or RetryPolicy(sleep=sleeps.append, jitter=lambda cap: cap)
    with httpx.Client(transport=httpx.MockTransport(script), timeout=5) as client:

        def factory() -> httpx.Request:
            return client.build_request("GET", URL)

        response = send_with_retries(client, factory, policy, idempotent=idempotent)
    return response, script, sleeps


def timeout() -> httpx.ReadTimeout:
    return httpx.ReadTimeout("read timed out")


def test_success_is_returned_without_retry() -> None:
    response, script, sleeps = run(httpx.Response(200, json={"result": []}))
    assert response.status_code == 200
    assert len(script.requests) == 1
    assert sleeps == []


def test_503_then_200_is_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shared_code.httpretry")
    response, script, sleeps = run(httpx.Response(503), httpx.Response(200))
    assert response.status_code == 200
    assert len(script.requests) == 2
    assert sleeps == [0.5]
    [record] = caplog.records
    message = record.getMessage()
    assert "GET /api/now/table/incident" in message
    assert "HTTP 503" in message
    assert "attempt 1 of 4" in message
    assert "sysparm_query" not in message
    assert "secret" not in message


def test_429_honours_retry_after_seconds() -> None:
    response, _, sleeps = run(httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(200))
    assert response.status_code == 200
    assert sleeps == [7.0]


def test_retry_after_is_capped() -> None:
    _, _, sleeps = run(httpx.Response(503, headers={"Retry-After": "3600"}), httpx.Response(200))
    assert sleeps == [30.0]


def test_retry_after_http_date() -> None:
    now = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=12), usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(12.0)
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None


def test_retry_after_is_ignored_on_other_statuses() -> None:
    _, _, sleeps = run(httpx.Response(500, headers={"Retry-After": "20"}), httpx.Response(200))
    assert sleeps == [0.5]


def test_500_every_time_raises_unavailable_after_max_attempts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shared_code.httpretry")
    with pytest.raises(ItsmUnavailableError) as info:
        run(*[httpx.Response(500) for _ in range(4)])
    assert str(info.value) == "GET /api/now/table/incident failed after 4 attempts: HTTP 500"
    assert info.value.status == 500
    assert len(caplog.records) == 3  # the fourth failure raises instead of logging a retry


def test_backoff_is_exponential_and_capped() -> None:
    policy = RetryPolicy(max_attempts=7, jitter=lambda cap: cap)
    assert [policy.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    jittered = RetryPolicy()
    assert all(0.0 <= jittered.backoff(5) <= 8.0 for _ in range(50))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_other_4xx_is_returned_at_once(status: int) -> None:
    response, script, sleeps = run(httpx.Response(status), httpx.Response(200))
    assert response.status_code == status
    assert len(script.requests) == 1
    assert sleeps == []


def test_408_is_retried() -> None:
    response, script, _ = run(httpx.Response(408), httpx.Response(200))
    assert response.status_code == 200
    assert len(script.requests) == 2


def test_timeouts_are_retried_and_chained() -> None:
    response, script, _ = run(timeout(), httpx.ConnectError("refused"), httpx.Response(200))
    assert response.status_code == 200
    assert len(script.requests) == 3

    with pytest.raises(ItsmUnavailableError) as info:
        run(timeout(), timeout(), timeout(), timeout())
    assert "failed after 4 attempts: ReadTimeout: " in str(info.value)
    assert "did not answer in time" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert info.value.status is None


def test_non_idempotent_call_is_not_retried_after_an_ambiguous_failure() -> None:
    with pytest.raises(ItsmUnavailableError) as info:
        run(timeout(), httpx.Response(200), idempotent=False)
    assert "after 1 attempt:" in str(info.value)
    with pytest.raises(ItsmUnavailableError):
        run(httpx.Response(502), httpx.Response(200), idempotent=False)
    # the request surely never reached the instance: safe to send again
    response, script, _ = run(httpx.ConnectError("refused"), httpx.Response(201), idempotent=False)
    assert response.status_code == 201
    assert len(script.requests) == 2
    response, _, sleeps = run(
        httpx.Response(429, headers={"Retry-After": "2"}), httpx.Response(201), idempotent=False
    )
    assert response.status_code == 201
    assert sleeps == [2.0]


def test_each_attempt_gets_a_fresh_request() -> None:
    built: list[httpx.Request] = []
    script = Script(httpx.Response(503), httpx.Response(200))
    with httpx.Client(transport=httpx.MockTransport(script), timeout=5) as client:

        def factory() -> httpx.Request:
            request = client.build_request("POST", URL, json={"a": 1})
            built.append(request)
            return request

        send_with_retries(client, factory, RetryPolicy(sleep=lambda _: None))
    assert len(built) == 2
    assert built[0] is not built[1]
    assert [r.content for r in script.requests] == [b'{"a":1}', b'{"a":1}']


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(base_backoff=-1)


def test_testing_switch_makes_the_default_sleep_instant(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("shared_code.httpretry.time.sleep", slept.append)
    httpretry.set_testing(True)
    try:
        run(
            httpx.Response(503),
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(200),
            policy=RetryPolicy(),
        )
        skipped = httpretry.skipped_sleeps()
    finally:
        httpretry.set_testing(False)
    assert slept == []
    assert len(skipped) == 2
    assert 0 <= skipped[0] <= 0.5  # the first backoff: full jitter under base_backoff
    assert skipped[1] == 7.0  # Retry-After, as asked
    assert httpretry.skipped_sleeps() == []  # switching testing off forgets them
    run(httpx.Response(503), httpx.Response(200), policy=RetryPolicy(jitter=lambda cap: cap))
    assert slept == [0.5]

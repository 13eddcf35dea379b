"""Secure webhook end to end: signed Entra ID tokens against the registered webhook function.

Keys and tokens are made here (RSA keys from ``cryptography``, JWTs from PyJWT); the tenant's
OpenID metadata (v1 and v2) and key set are served by the loopback Entra over TLS, fetched by the
app's real validator (httpx for the metadata, PyJWKClient for the keys). Each test has its own
container, so the validator's caches start empty.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import function_app
from shared_code import httpretry
from shared_code.bootstrap import Container
from shared_code.security.secure_webhook import AZNS_WEBHOOK_APP_ID, WEBHOOK_ROLE
from tests.hostsim import FunctionHost, HttpCall
from tests.integration.test_alerts_e2e import load
from tests.loopback.entra import make_signing_key
from tests.loopback.stack import LoopbackStack

APP_ID = "0f1e2d3c-4b5a-4697-8887-a9b8c7d6e5f4"
APP_ID_URI = f"api://{APP_ID}"
OTHER_GUID = "99999999-8888-4777-8666-555555555555"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SecureFlow:
    stack: LoopbackStack
    host: FunctionHost
    name: str

    @property
    def tenant(self) -> str:
        return self.stack.entra.tenant_id

    def claims(self, version: str = "2.0", **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "tid": self.tenant,
            "roles": [WEBHOOK_ROLE],
            "ver": version,
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + 3600,
            "oid": str(uuid.uuid4()),
            "sub": str(uuid.uuid4()),
        }
        if version == "2.0":
            claims.update(
                aud=APP_ID, iss=f"{self.stack.entra.url}/{self.tenant}/v2.0", azp=AZNS_WEBHOOK_APP_ID
            )
        else:
            claims.update(
                aud=APP_ID_URI, iss=f"https://sts.windows.net/{self.tenant}/", appid=AZNS_WEBHOOK_APP_ID
            )
        for name, value in changes.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(self, version: str = "2.0", **changes: Any) -> str:
        return self.stack.entra.signed_token(self.claims(version, **changes))

    def post(self, authorization: str | None, *, connection: str | None = None) -> HttpCall:
        name = connection or self.name
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        return self.host.http(
            "receive_alert",
            "POST",
            f"https://func.example/api/alerts/{name}",
            body=json.dumps(load("metric_fired")).encode(),
            headers=headers,
            route_params={"connection": name},
        )

    def stored(self, connection: str | None = None) -> int:
        from shared_code.bootstrap import get_container

        return len(list(get_container().deliveries.list(connection=connection or self.name)))

    def entra_requests(self, since: int, suffix: str) -> int:
        return sum(1 for r in self.stack.entra.requests()[since:] if r.path.endswith(suffix))


@pytest.fixture
def secure(app: Container, stack: LoopbackStack) -> Iterator[SecureFlow]:
    was = httpretry._testing
    httpretry.set_testing(True)
    stack.entra.signing_key()  # published before the first fetch
    name = f"sw-{uuid.uuid4().hex[:10]}"
    stack.add_servicenow_connection(
        name,
        "--secure-webhook-app-id",
        APP_ID,
        "--secure-webhook-tenant-id",
        stack.entra.tenant_id,
        "--secure-webhook-app-id-uri",
        APP_ID_URI,
    )
    try:
        yield SecureFlow(stack, FunctionHost(function_app.app, stack.queues()), name)
    finally:
        stack.entra.openid_fault = None
        stack.entra.keys_fault = None
        httpretry.set_testing(was)


def assert_refused(call: HttpCall) -> None:
    assert call.status == 401, call.response.get_body()
    assert call.json() == {"error": {"code": "unauthorized", "message": "authentication failed"}}
    assert call.response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert call.outputs == {}


# -- accepted ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "audience"),
    [("2.0", APP_ID), ("1.0", APP_ID_URI), ("1.0", APP_ID)],
    ids=["v2", "v1-uri", "v1-id"],
)
def test_a_valid_token_is_accepted_and_the_alert_stored(
    secure: SecureFlow, version: str, audience: str
) -> None:
    call = secure.post(f"Bearer {secure.token(version, aud=audience)}")

    assert call.status == 202, call.response.get_body()
    assert call.json()["duplicate"] is False
    assert "delivery" in call.outputs
    assert secure.stored() == 1


def test_metadata_and_keys_are_fetched_once_for_many_tokens(secure: SecureFlow) -> None:
    mark = len(secure.stack.entra.requests())
    for minute in range(3):
        payload = secure.token(jti=str(minute))
        assert secure.post(f"Bearer {payload}").status == 202

    assert secure.entra_requests(mark, "/v2.0/.well-known/openid-configuration") == 1
    assert secure.entra_requests(mark, "/keys") == 1


def test_a_connection_without_a_secure_webhook_app_needs_no_token(secure: SecureFlow) -> None:
    plain = f"plain-{uuid.uuid4().hex[:8]}"
    secure.stack.add_servicenow_connection(plain)

    assert secure.post(None, connection=plain).status == 202


# -- refused -------------------------------------------------------------------------------------


def hs256_with_public_key(secure: SecureFlow) -> str:
    key = secure.stack.entra.signing_key()
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    body = b64(json.dumps(secure.claims()).encode())
    signature = hmac.new(key.public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def alg_none(secure: SecureFlow) -> str:
    header = b64(
        json.dumps({"alg": "none", "typ": "JWT", "kid": secure.stack.entra.signing_key().kid}).encode()
    )
    return f"{header}.{b64(json.dumps(secure.claims()).encode())}."


def forged_signature(secure: SecureFlow) -> str:
    impostor = make_signing_key(kid=secure.stack.entra.signing_key().kid)  # same kid, another key
    return secure.stack.entra.signed_token(secure.claims(), key=impostor)


def other_tenant(secure: SecureFlow) -> str:
    return secure.token(tid=OTHER_GUID, iss=f"{secure.stack.entra.url}/{OTHER_GUID}/v2.0")


REFUSED: dict[str, tuple[Callable[[SecureFlow], str], str]] = {
    "expired": (
        lambda s: s.token(exp=int(time.time()) - 600, nbf=int(time.time()) - 4000),
        "ExpiredSignatureError",
    ),
    "not-yet-valid": (lambda s: s.token(nbf=int(time.time()) + 600), "ImmatureSignatureError"),
    "wrong-audience": (lambda s: s.token(aud=OTHER_GUID), "InvalidAudienceError"),
    "v2-with-app-id-uri-audience": (lambda s: s.token(aud=APP_ID_URI), "InvalidAudienceError"),
    "wrong-issuer": (lambda s: s.token(iss=f"https://sts.windows.net/{s.tenant}/"), "InvalidIssuerError"),
    "v1-wrong-issuer": (
        lambda s: s.token("1.0", iss=f"{s.stack.entra.url}/{s.tenant}/v2.0"),
        "InvalidIssuerError",
    ),
    "wrong-tenant": (other_tenant, "is not the connection's tenant"),
    "wrong-caller-app": (lambda s: s.token(azp=OTHER_GUID), "is not Azure Monitor's secure webhook app"),
    "v1-wrong-caller-app": (
        lambda s: s.token("1.0", appid=OTHER_GUID),
        "is not Azure Monitor's secure webhook app",
    ),
    "missing-role": (lambda s: s.token(roles=None), "lacks the ActionGroupsSecureWebhook role"),
    "other-role": (lambda s: s.token(roles=["Reader"]), "lacks the ActionGroupsSecureWebhook role"),
    "no-version": (lambda s: s.token(ver=None), "neither 1.0 nor 2.0"),
    "bad-signature": (forged_signature, "InvalidSignatureError"),
    "alg-none": (alg_none, "'none' is not RS256"),
    "hs256-public-key-as-secret": (hs256_with_public_key, "'HS256' is not RS256"),
    "not-a-jwt": (lambda s: "not.a.jwt", "is not a JWT"),
}


@pytest.mark.parametrize(("make", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_a_bad_token_is_refused_with_a_generic_401_and_nothing_stored(
    secure: SecureFlow, make: Callable[[SecureFlow], str], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = make(secure)
    with caplog.at_level(logging.WARNING, logger="shared_code.security.secure_webhook"):
        call = secure.post(f"Bearer {token}")

    assert_refused(call)
    assert secure.stored() == 0
    (record,) = [r for r in caplog.records if "secure webhook: refused" in r.getMessage()]
    assert secure.name in record.getMessage()
    assert reason in record.getMessage()  # refused for the reason the case is about
    assert token not in record.getMessage()


@pytest.mark.parametrize(
    "authorization", [None, "", "Basic dXNlcjpwYXNz", "Bearer ", "Bearer " + "a" * 20000]
)
def test_a_missing_or_malformed_authorization_header_is_refused(
    secure: SecureFlow, authorization: str | None
) -> None:
    assert_refused(secure.post(authorization))


def test_the_expired_token_reason_is_logged_not_answered(
    secure: SecureFlow, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        call = secure.post(f"Bearer {REFUSED['expired'][0](secure)}")

    assert "ExpiredSignatureError" in caplog.text
    assert b"Expired" not in call.response.get_body()


def test_an_unknown_key_id_refreshes_the_key_set_once_then_is_refused(secure: SecureFlow) -> None:
    stranger = make_signing_key()  # never published
    mark = len(secure.stack.entra.requests())

    first = secure.post(f"Bearer {secure.stack.entra.signed_token(secure.claims(), key=stranger)}")
    second = secure.post(f"Bearer {secure.stack.entra.signed_token(secure.claims(), key=stranger)}")

    assert_refused(first)
    assert_refused(second)
    # the first request: the initial fetch and one refresh; the second: nothing (refreshes are rationed)
    assert secure.entra_requests(mark, "/keys") == 2


def test_a_rotated_key_is_found_by_the_one_refresh(secure: SecureFlow) -> None:
    assert secure.post(f"Bearer {secure.token()}").status == 202  # key set cached now
    rotated = secure.stack.entra.add_signing_key()
    mark = len(secure.stack.entra.requests())

    call = secure.post(f"Bearer {secure.stack.entra.signed_token(secure.claims(jti='r'), key=rotated)}")

    assert call.status == 202, call.response.get_body()
    assert secure.entra_requests(mark, "/keys") == 1


@pytest.mark.parametrize("fault", ["openid_fault", "keys_fault"])
def test_metadata_or_keys_down_is_a_503_not_a_500(secure: SecureFlow, fault: str) -> None:
    setattr(secure.stack.entra, fault, 503)

    call = secure.post(f"Bearer {secure.token()}")

    assert call.status == 503, call.response.get_body()
    assert call.json()["error"]["code"] == "identity_provider_unavailable"
    assert call.response.headers.get("Retry-After")
    assert secure.stored() == 0
    setattr(secure.stack.entra, fault, None)
    assert secure.post(f"Bearer {secure.token()}").status == 202  # a failure is not cached

"""Instance URLs and the addresses the app may connect to (``shared_code.netsafety``)."""

from __future__ import annotations

import ipaddress

import pytest

from shared_code.domain.connection import ConnectionBase as Connection
from shared_code.errors import InvalidInputError, UnsafeAddressError
from shared_code.netsafety import address_problem, check_destination, url_problem
from shared_code.products import parse_connection


def connection(url: str, *, private: bool) -> Connection:
    return parse_connection(
        {
            "name": "sn",
            "partner_type": "servicenow",
            "server_url": url,
            "private_instance": private,
            "username": "svc",
            "client_id": "cid",
        }
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://dev1.service-now.com:22",
        "https://dev1.service-now.com:8443",
        "https://dev1.service-now.com:80",
        "https://dev1.service-now.com:99999",
        "https://dev1.service-now.com:abc",
        "https://dev1.service-now.com:0",
    ],
)
def test_a_cloud_instance_answers_on_443_only(url: str) -> None:
    with pytest.raises(InvalidInputError, match="port"):
        connection(url, private=False)


@pytest.mark.parametrize("url", ["https://dev1.service-now.com", "https://dev1.service-now.com:443"])
def test_a_cloud_instance_on_443_is_accepted(url: str) -> None:
    assert connection(url, private=False).server_url == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://169.254.169.254", "metadata"),
        ("https://169.254.10.10", "link-local"),
        ("https://[::ffff:169.254.169.254]", "metadata"),
        ("https://[::ffff:a9fe:a9fe]", "metadata"),
        ("https://[64:ff9b::a9fe:a9fe]", "metadata"),  # NAT64 of 169.254.169.254
        ("https://[2002:a9fe:a9fe::1]", "metadata"),  # 6to4
        ("https://[fd00:ec2::254]", "metadata"),
        ("https://[fe80::1]", "link-local"),
        ("https://168.63.129.16", "metadata"),
        ("https://0.0.0.0", "unspecified"),
        ("https://2130706433", "dotted quad"),  # 127.0.0.1
        ("https://0x7f000001", "dotted quad"),
        ("https://0177.0.0.1", "dotted quad"),
        ("https://127.1", "dotted quad"),
        ("https://2852039166", "dotted quad"),  # 169.254.169.254
        ("https://metadata.google.internal", "metadata"),
        ("https://metadata", "metadata"),
        ("https://sn.corp.example:99999", "invalid port"),
    ],
)
def test_a_private_instance_never_points_at_metadata_link_local_or_disguised_addresses(
    url: str, why: str
) -> None:
    with pytest.raises(InvalidInputError, match=why):
        connection(url, private=True)


@pytest.mark.parametrize(
    "url",
    ["https://sn.corp.example", "https://sn.corp.example:8443", "https://10.1.2.3", "https://[fd12::1]"],
)
def test_a_private_instance_on_a_private_network_is_accepted(url: str) -> None:
    assert url_problem(url, private_instance=True) is None
    assert connection(url, private=True).server_url == url


def test_loopback_literals_are_left_to_the_add_and_connect_checks() -> None:
    """Whether loopback is allowed is an app setting, which a stored connection does not carry."""
    assert url_problem("https://127.0.0.1:8443", private_instance=True) is None
    with pytest.raises(UnsafeAddressError, match="ALLOW_LOOPBACK_INSTANCES"):
        check_destination("127.0.0.1", 8443, allow_loopback=False)
    assert check_destination("127.0.0.1", 8443, allow_loopback=True) == [ipaddress.ip_address("127.0.0.1")]


def resolver(*answers: str):
    def resolve(host: str, port: int) -> list[str]:
        return list(answers)

    return resolve


@pytest.mark.parametrize(
    ("answers", "allowed"),
    [
        (("10.0.0.5",), True),
        (("10.0.0.5", "fd12::5"), True),
        (("169.254.169.254",), False),
        (("10.0.0.5", "169.254.169.254"), False),  # one bad answer is enough
        (("::ffff:169.254.169.254",), False),
        (("127.0.0.1",), False),
        (("::1",), False),
        (("127.8.9.10",), False),
        (("fe80::1%eth0",), False),
    ],
)
def test_a_name_is_judged_by_every_address_it_resolves_to(answers: tuple[str, ...], allowed: bool) -> None:
    if allowed:
        assert check_destination("sn.corp.example", 443, allow_loopback=False, resolve=resolver(*answers))
    else:
        with pytest.raises(UnsafeAddressError, match=r"'sn\.corp\.example': it resolves to"):
            check_destination("sn.corp.example", 443, allow_loopback=False, resolve=resolver(*answers))


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "app.localhost", "metadata.google.internal"])
def test_some_names_are_refused_without_a_lookup(host: str) -> None:
    def no_lookup(host: str, port: int) -> list[str]:
        raise AssertionError("looked up")

    with pytest.raises(UnsafeAddressError):
        check_destination(host, 443, allow_loopback=False, resolve=no_lookup)


def test_the_opt_in_allows_loopback_only() -> None:
    assert address_problem(ipaddress.ip_address("127.0.0.1"), allow_loopback=True) is None
    assert address_problem(ipaddress.ip_address("169.254.169.254"), allow_loopback=True) is not None
    assert address_problem(ipaddress.ip_address("::ffff:127.0.0.1"), allow_loopback=False) is not None


def test_a_refusal_cuts_a_long_host_name() -> None:
    with pytest.raises(UnsafeAddressError) as caught:
        check_destination(
            "a" * 5_000 + ".example", 443, allow_loopback=False, resolve=resolver("169.254.1.1")
        )
    assert len(str(caught.value)) < 300

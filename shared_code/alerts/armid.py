"""Azure Resource Manager ids: the one place that turns an id into the name people use.

Alerts name their targets by ARM id (``/subscriptions/{id}/resourceGroups/{rg}/providers/...``),
and a CMDB names a server by its resource name. A bare subscription (``/subscriptions/{id}``) is a
billing and access boundary, not a configuration item: it has no resource name here.
"""

from __future__ import annotations

import re

_SUBSCRIPTION = re.compile(r"/subscriptions/([^/]+)", re.IGNORECASE)
_SUBSCRIPTION_SCOPE = re.compile(r"^/subscriptions/[^/]+/?$", re.IGNORECASE)
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


def is_arm_id(text: str) -> bool:
    """Whether ``text`` is written as an ARM id (a subscription- or tenant-level provider path)."""
    lowered = text.strip().lower()
    return lowered.startswith(("/subscriptions/", "/providers/"))


def is_subscription_scope(resource_id: str) -> bool:
    """``/subscriptions/{id}`` and nothing below it."""
    return _SUBSCRIPTION_SCOPE.match(resource_id.strip()) is not None


def is_guid(text: str) -> bool:
    return _GUID.match(text.strip()) is not None


def subscription_of(resource_id: str) -> str:
    """The subscription id in an ARM id (lower case), or '' when it names none."""
    match = _SUBSCRIPTION.search(resource_id)
    return match.group(1).lower() if match else ""


def resource_name(resource_id: str) -> str:
    """The name of what an ARM id points at (its last segment); '' for a bare subscription.

    Text that is not an ARM id (a configuration item sent as a plain name) is returned stripped.
    """
    text = resource_id.strip()
    if not is_arm_id(text):
        return text
    if is_subscription_scope(text):
        return ""
    return text.rstrip("/").rsplit("/", 1)[-1].strip()

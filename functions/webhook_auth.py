"""The webhook's caller check: a connection with a secure webhook app also demands its token.

The function key (``?code=``) is checked by the Functions host before any of this runs; a
connection without ``secure_webhook_app_id`` relies on it alone.
"""

from __future__ import annotations

from shared_code.bootstrap import get_container
from shared_code.security.secure_webhook import SecureWebhookRequirement


def require_secure_webhook(connection_name: str, authorization: str | None) -> None:
    """Raise UnauthorizedError (or IdentityProviderError) unless the connection's demand is met."""
    container = get_container()
    connection = container.connections.get(connection_name)
    if not connection.secure_webhook_app_id:
        return
    requirement = SecureWebhookRequirement(
        connection=connection.name,
        tenant_id=connection.secure_webhook_tenant_id,
        app_id=connection.secure_webhook_app_id,
        app_id_uri=connection.secure_webhook_app_id_uri,
    )
    container.secure_webhook.verify(authorization, requirement)

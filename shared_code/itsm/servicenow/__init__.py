"""ServiceNow: OAuth or Basic auth, the Table API connector, encoded queries and row mapping."""

from __future__ import annotations

from shared_code.itsm.servicenow.auth import RefreshTokenStore, ServiceNowBasicAuth, ServiceNowOAuth
from shared_code.itsm.servicenow.connector import ServiceNowConnector

__all__ = ["RefreshTokenStore", "ServiceNowBasicAuth", "ServiceNowConnector", "ServiceNowOAuth"]

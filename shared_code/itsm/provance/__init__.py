"""Provance ITSM on Dataverse: Entra app auth, the Web API connector, table discovery and row mapping."""

from __future__ import annotations

from shared_code.itsm.provance.auth import DataverseAuth, client_secret_credential
from shared_code.itsm.provance.connector import ProvanceConnector
from shared_code.itsm.provance.settings import ProvanceConnection

__all__ = ["DataverseAuth", "ProvanceConnection", "ProvanceConnector", "client_secret_credential"]

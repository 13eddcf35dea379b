"""System Center Service Manager through the Cireson Portal API: sign-in, connector, criteria, mapping."""

from __future__ import annotations

from shared_code.itsm.scsm.auth import CiresonTokenAuth
from shared_code.itsm.scsm.connector import ScsmConnector
from shared_code.itsm.scsm.settings import ScsmConnection

__all__ = ["CiresonTokenAuth", "ScsmConnection", "ScsmConnector"]

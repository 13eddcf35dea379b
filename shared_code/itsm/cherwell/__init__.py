"""Cherwell Service Management: OAuth token flow, the REST API connector and record mapping."""

from __future__ import annotations

from shared_code.itsm.cherwell.auth import CherwellAuth
from shared_code.itsm.cherwell.connector import CherwellConnector
from shared_code.itsm.cherwell.settings import CherwellConnection

__all__ = ["CherwellAuth", "CherwellConnection", "CherwellConnector"]

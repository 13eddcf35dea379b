"""ITSM products: one connector per product behind the per-capability ports of ``shared_code.ports.itsm``."""

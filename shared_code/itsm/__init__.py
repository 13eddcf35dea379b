"""ITSM products: one connector per product behind the small ``ItsmConnector`` protocol."""

"""Azure Monitor adapters: the Logs Ingestion upload and the Alerts Management API."""

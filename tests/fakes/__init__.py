"""Hand-written fakes for unit tests (integration tests use the real Azurite and loopback servers)."""

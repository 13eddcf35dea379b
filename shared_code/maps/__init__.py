"""Dependency-map import: read server dependency maps from a source, store them, publish them."""

"""Pure domain types: alerts, work items, correlations, sync cursors, dependency maps.

This package imports nothing of the project but ``shared_code.errors``; every other layer may
import it. No I/O, no clients, no settings.
"""

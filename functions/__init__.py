"""Thin trigger adapters: parse the trigger, call one service, map the result to the response."""

"""Operational guards, as ASGI middleware and helpers: admission control, bearer-key auth, drain on
SIGTERM, body limits and request ids, and cancellation on disconnect or deadline (docs/reliability.md)."""

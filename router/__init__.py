"""Router: turns a request's prompt and policy into an immutable :class:`RoutingDecision`.

Policies never see FastAPI objects; they read registry snapshots and return values.
"""

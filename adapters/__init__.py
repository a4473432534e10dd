"""Adapters: the SQLite registry, PEFT format validation and the content-addressed store.

Nothing here knows about HTTP or routing; errors come from :mod:`loragate.errors`.
"""

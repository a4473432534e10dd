"""Fixtures shared by the adapters tests: the session's S3-protocol server (tests/s3.py)."""

from tests.s3 import s3_server  # noqa: F401 (re-exported as a fixture)

"""Fixtures shared by the server tests: the session's S3-protocol servers (tests/s3.py)."""

from tests.s3 import locked_s3_server, s3_server  # noqa: F401 (re-exported as fixtures)

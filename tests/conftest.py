"""Shared fixtures of pytest-llem's own tests."""

from __future__ import annotations

"""pytest hooks of pytest-llem (placeholder while the plugin is built)."""

from __future__ import annotations

"""Model directories made for specific tests (built from the tiny model)."""

from __future__ import annotations

from common.tools.agreeing_draft import make_agreeing_draft_model

__all__ = ["make_agreeing_draft_model"]

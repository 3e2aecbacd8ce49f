"""The web console: server-rendered pages for administrators, operators and viewers."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)

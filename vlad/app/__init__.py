"""The Gradio app: edit zero-shot prompts by looking, add good references live, move thresholds.

:mod:`vlad.app.session` holds the logic (plain functions over a :class:`DemoSession`, testable without
a browser); :mod:`vlad.app.ui` the layout (Gradio is imported only when the app is built). Start it with
``vlad demo``.
"""

from __future__ import annotations

from vlad.app.session import (
    DEFAULT_SCORERS,
    DemoSession,
    add_references,
    apply_prompts,
    apply_thresholds,
    build_detector,
    default_prompt_text,
    inspect,
    live_scorers,
    load_prompt_file,
    maps_html,
    prompts_to_text,
    remove_reference,
    render,
    save_prompt_file,
    table_headers,
    text_to_prompts,
)
from vlad.app.ui import build_app, launch

__all__ = [
    "DEFAULT_SCORERS", "DemoSession", "add_references", "apply_prompts",
    "apply_thresholds", "build_app", "build_detector", "default_prompt_text", "inspect", "launch", "live_scorers",
    "load_prompt_file", "maps_html", "prompts_to_text", "remove_reference", "render", "save_prompt_file",
    "table_headers", "text_to_prompts",
]

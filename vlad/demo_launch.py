"""``vlad demo``: start the Gradio app (needs the ``demo`` extra: ``pip install "vlad[demo]"``)."""

from __future__ import annotations

import argparse

from vlad.errors import VladError


def main_demo(args: argparse.Namespace) -> int:
    """Start the app and block until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise VladError('the demo needs gradio: pip install "vlad[demo]"') from exc
    from vlad.app import launch

    launch(args.host, args.port, args.detector, args.object_name, args.weights, args.device, block=True)
    return 0

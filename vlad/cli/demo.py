"""``vlad demo``: start the Gradio app (needs the ``demo`` extra: ``pip install "vlad-inspect[demo]"``)."""

from __future__ import annotations

import argparse

from vlad.cli.common import (
    add_model_options,
    check_device,
    check_port_free,
    check_weights,
    port_number,
)
from vlad.errors import VladError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vlad demo`` and its options."""
    p = sub.add_parser("demo", help="start the Gradio app for prompt editing and live inspection")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=port_number, default=7860, help="TCP port, 1-65535 (default 7860)")
    p.add_argument("--detector", default=None, help="initial detector spec")
    p.add_argument("--object", dest="object_name", default=None)
    add_model_options(p, with_set=False)


def run(args: argparse.Namespace) -> int:
    """Check the options, the port and gradio, then start the app and block until interrupted."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise VladError('the demo needs gradio: pip install "vlad-inspect[demo]"')
    if args.detector:
        from vlad.detector import parse_spec

        parse_spec(args.detector)
    check_weights(args.weights)
    check_device(args.device)
    check_port_free(args.host, args.port)
    from vlad.app import launch

    launch(args.host, args.port, args.detector, args.object_name, args.weights, args.device, block=True)
    return 0

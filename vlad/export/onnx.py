"""Write an :class:`~vlad.export.graphs.ExportGraph` as an ONNX file with a dynamic batch size.

Exporter: torch's ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9; needs
``onnxscript``). Why this one: it traces with a symbolic batch dimension, so every shape computed from
the batch size stays symbolic (the legacy TorchScript tracer can bake Python integers computed from shapes
into the graph, which breaks a dynamic batch silently), it decomposes operators the legacy exporter has
no symbolic for (PatchCore's ``adaptive_avg_pool1d`` channel pooling failed there with torch 2.14), it
writes constants beyond protobuf's 2 GB limit as external data, and the legacy exporter is deprecated.
Its cost: exporting is slow (5-30 s for a tiny twin; 100 s for PatchCore's WRN-50 and 236 s for WinCLIP's
ViT-B-16-plus at the real sizes, on a loaded 2-core machine).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from vlad.errors import ExportError
from vlad.export.graphs import ExportGraph

logger = logging.getLogger(__name__)

#: ONNX opset of the written graphs (18: Resize with antialias, LayerNormalization, ...)
OPSET = 18
#: batch size of the example inputs the graph is traced with (not 1: a size-1 dimension would be
#: specialised by the exporter)
EXAMPLE_BATCH = 2


def example_inputs(graph: ExportGraph, batch: int = EXAMPLE_BATCH, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random pixel batches ``(batch, 3, h, w)`` in [0, 1] for each input of ``graph``."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, 3, *inp.size, generator=gen) for inp in graph.inputs)


def write_onnx(graph: ExportGraph, path: str | Path) -> Path:
    """Export ``graph`` to ``path`` with a dynamic batch dimension on every input and output.

    Raises:
        ExportError: the export extra is not installed, or torch could not export the graph.
    """
    path = Path(path)
    inputs = example_inputs(graph)
    names_in = [inp.name for inp in graph.inputs]
    names_out = graph.output_names
    module = graph.module.eval()
    quiet = logging.getLogger("onnxscript")  # its optimiser logs a warning per unfolded Split: not the user's concern
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter; correctness is checked by the tests
            batch = torch.export.Dim("batch", min=1, max=4096)
            shapes = {name: {0: batch} for name in _forward_arg_names(module, len(inputs))}
            program = torch.onnx.export(
                module, inputs, dynamo=True, input_names=names_in, output_names=names_out,
                dynamic_shapes=shapes, opset_version=OPSET, verbose=False, report=False,
            )
            program.save(str(path), external_data=_needs_external_data(module))
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the export extra: pip install 'vlad-inspect[export]' ({exc})") from exc
    except Exception as exc:  # torch raises many types while exporting; name the graph, keep the cause
        raise ExportError(f"torch could not export {type(module).__name__} to ONNX "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    finally:
        quiet.setLevel(level)
    return path


def _forward_arg_names(module: torch.nn.Module, n: int) -> list[str]:
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters if p != "self"]
    return params[:n]


def _needs_external_data(module: torch.nn.Module) -> bool:
    """True when the constants exceed ~1.8 GB (protobuf's limit is 2 GB)."""
    total = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    return total > 1_800_000_000

"""Random numbers that do not depend on the device: every draw is made on the CPU, then moved.

A scorer fitted with the same ``random_state`` must start from the same model, see the same batches and
the same synthetic anomalies on every device. A seed alone does not give that: CUDA's generator (Philox)
and the CPU's (Mersenne Twister) give different numbers for the same seed, and a tensor initialised in
place after its module was moved to a GPU (``nn.init.kaiming_normal_(cuda_weight)``) draws from the GPU's
generator. So vlad draws every random number on the CPU, from a CPU generator, and moves the result:

* modules are constructed (and re-initialised) on the CPU inside :func:`seeded`, then moved to the device:
  :func:`init_module` does both;
* explicit draws (batch sampling, shuffling, projections, masks, subsets) take
  ``generator=cpu_generator(seed)`` and are moved with ``.to(device)`` afterwards;
* synthetic anomalies (:mod:`vlad.synthesis`) use a :class:`numpy.random.Generator`, which is CPU-only.

``tests/test_devices.py`` checks the rule on every registered scorer: each random draw during ``fit``
names a CPU generator or runs inside :func:`seeded` on a CPU tensor, and building a scorer for another
device draws nothing there.

What this cannot make device-independent is arithmetic: CPU and GPU kernels add in different orders (and
cuDNN convolutions use TF32 by default), so results agree only as closely as the computation is
conditioned. Training runs that amplify rounding (DRAEM, STPM; see the README, "Devices") give a
different model on another device, and even on the same CPU with another thread count.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

__all__ = ["cpu_generator", "in_seeded_block", "init_module", "seeded"]

M = TypeVar("M", bound=torch.nn.Module)

_state = threading.local()


def cpu_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (``None``: a fresh random seed). Draw with it on the CPU and
    move the result to the device: the numbers are then the same whatever the device."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside the block torch's global CPU generator is seeded with ``seed`` (None: left as is); its state
    is restored after, and no GPU generator is touched (``torch.manual_seed`` would reseed every GPU's).

    For code that draws from the global generator and takes no ``generator=`` (module constructors,
    ``nn.init`` in a library): run it here, on CPU tensors, and move the result to the device after.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.random.default_generator.manual_seed(int(seed))
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            yield
        finally:
            _state.depth -= 1


def in_seeded_block() -> bool:
    """True inside :func:`seeded` (in this thread): how the device tests tell a seeded global draw from a
    stray one."""
    return getattr(_state, "depth", 0) > 0


def init_module(factory: Callable[[], M], device: torch.device | str, seed: int | None) -> M:
    """``factory()`` (a module constructor, plus any re-initialisation) run on the CPU inside
    :func:`seeded`, then the module moved to ``device``: the same weights on every device."""
    with seeded(seed):
        module = factory()
    return module.to(device)

"""CUDA graphs for the training step's phases: a phase's kernels launched as one graph instead of one by one.

A phase is a function of tensors that returns a dict of tensors (the discriminator's updates of one
iteration, or one generator update: forward, backward and optimizer step). Its first ``warmup`` calls
run eagerly: they are ordinary training steps that also create the optimizer state and let cuDNN pick
its kernels. The next call captures the phase (recording its kernels without running them) into static
input and output tensors, and every call from then on copies its inputs into the static ones, replays
the graph and returns copies of the outputs. Phases that differ in Python-level choices (which of the
discriminator updates carry the R1 penalty) are captured under different keys, and inputs of another
shape (the smaller last batch of an epoch) under another graph.

A graph replays exactly the kernels it recorded, so what a phase reads must live in tensors that stay in
place: the weights and optimizer state (updated in place), learning rates held as tensors (capturable
Adam), the inputs given here. Random numbers from PyTorch's default generator (dropout) advance with
every replay; the step's own generators (latents, augmentation) are drawn outside, into the inputs.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable

import torch

Phase = Callable[..., dict[str, torch.Tensor]]


class PhaseGraphs:
    """Runs phases by key: eagerly while ``enabled`` is False or during a key's warm-up, then as its CUDA graph."""

    def __init__(self, enabled: bool, warmup: int = 3):
        self.enabled, self.warmup = enabled, warmup
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.calls: Counter = Counter()

    def __call__(self, key: Hashable, phase: Phase, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (key, *(tuple(value.shape) for value in inputs))  # an epoch's last, smaller batch: a graph of its own
        self.calls[key] += 1
        if not self.enabled or (key not in self.graphs and self.calls[key] <= self.warmup):
            return phase(*inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(phase, inputs)
        graph, static_inputs, static_outputs = self.graphs[key]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return {name: value.clone() for name, value in static_outputs.items()}

    @staticmethod
    def _capture(phase: Phase, inputs: tuple[torch.Tensor, ...]):
        static_inputs = [value.clone() for value in inputs]
        graph = torch.cuda.CUDAGraph()
        # Each graph keeps its own memory pool: no graph's scratch memory is another's live tensor.
        with torch.cuda.graph(graph):
            static_outputs = phase(*static_inputs)
        return graph, static_inputs, static_outputs

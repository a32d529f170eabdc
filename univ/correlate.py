"""``univ correlate``: the paper's experiment: every MLP neuron of every seed against every neuron of the others.

The public face of the run; the machinery lives in ``univ.run`` (one module per job):

    univ.run.config     CorrelateConfig (the options), the device, model labels
    univ.run.plan       blocks and passes under the memory budget (plain data, JSON round-trip)
    univ.run.state      RunState (every accumulator as named tensors) and its checkpoints
    univ.run.stream     one pass over the token stream: forward, pre-pass, co-moment updates; signals
    univ.run.finalize   a pass's blocks → max / argmax / baseline / histograms
    univ.run.outputs    neurons.parquet, histograms, activation stats, run.json
    univ.run.driver     ``run``: the stages in order, checkpoints, resume
    univ.run.cli        the ``univ correlate`` parser and ``main``

    univ correlate seed-a seed-b seed-c --data corpus.txt --tokens 1000000 --out runs/small
"""

from __future__ import annotations

from univ.errors import Interrupted
from univ.run.cli import config_from_args, main, register
from univ.run.config import MODES, CorrelateConfig, model_labels, resolve_device
from univ.run.driver import load_models, run
from univ.run.outputs import neuron_table, summary_text
from univ.run.plan import Block, Plan, format_bytes, make_plan, pairs_for

__all__ = [
    "MODES",
    "Block",
    "CorrelateConfig",
    "Interrupted",
    "Plan",
    "config_from_args",
    "format_bytes",
    "load_models",
    "main",
    "make_plan",
    "model_labels",
    "neuron_table",
    "pairs_for",
    "register",
    "resolve_device",
    "run",
    "summary_text",
]

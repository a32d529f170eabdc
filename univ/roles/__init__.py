"""Roles: what a neuron does to the model's output, read from its weights and checked by intervention.

Gurnee et al. (2024, §5) name three weight-level roles. All scores use TransformerLens-style
processed weights (:mod:`univ.weights`: norms folded in, w_out and W_U centred), so that directions a norm
removes never count. One module per job, in dependency order:

    vocab       prediction / suppression / partition: moments over the vocabulary of cos(W_U[:, v], w_out);
                ``RoleThresholds`` and ``classify_roles`` turn every module's scores into one ``role``
    entropy     entropy neurons: a large w_out in W_U's effective null space rescales the final norm (a
                temperature); ``entropy_intervention`` fixes the activation and records entropy, loss, σ, ranks
    attention   attention (de)activation neurons: ŵ_outᵀ W_Q k_BOS against a random-direction baseline
                (rotary models: averaged over query positions);
                ``bos_path_intervention`` removes the neuron from a later head's queries only
    run         ``univ roles DIR``: scores every neuron of a run's analysed models, intervenes on candidates,
                writes roles.parquet and the intervention tables, joins profiles.parquet; the CLI (``register``)

Each module's docstring gives its definitions and where its numbers come from. The public names are re-exported
here: ``import univ.roles as R; R.run_roles(...)``.
"""

from univ.roles.attention import BosScores, bos_keys, bos_path_intervention, bos_scores, summarize_path
from univ.roles.entropy import DEFAULT_MULTIPLES, entropy_intervention, entropy_scores, unembedding_null_space
from univ.roles.run import _join_profiles as _join_profiles
from univ.roles.run import parse_neurons, register, run_roles
from univ.roles.vocab import ROLE_NAMES, RoleThresholds, classify_roles, layer_trend, top_tokens, vocab_role_scores
from univ.roles.vocab import TOP_TOKENS as TOP_TOKENS

__all__ = [
    "BosScores",
    "DEFAULT_MULTIPLES",
    "ROLE_NAMES",
    "RoleThresholds",
    "bos_keys",
    "bos_path_intervention",
    "bos_scores",
    "classify_roles",
    "entropy_intervention",
    "entropy_scores",
    "layer_trend",
    "parse_neurons",
    "register",
    "run_roles",
    "summarize_path",
    "top_tokens",
    "unembedding_null_space",
    "vocab_role_scores",
]

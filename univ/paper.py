"""``--paper-exact``: the choices of Gurnee et al. (2024)'s own code (github.com/wesg52/universal-neurons).

    models        fp32 (TransformerLens default)
    activations   stored as fp16 by the hooks (``save_activation_hook`` → ``.to(torch.float16)``), so every
                  statistic is of fp16-rounded activations; the co-moment GEMMs ran in fp32
    baseline      one row-normalised Gaussian rotation per layer of the compared model (K = 1)
    excluded      exactly the pad id (= BOS = EOS for GPT-2) and the single "\\n" token
                  (``model.to_single_token('\\n')``), not every newline-only token ("\\n\\n", …) as univ does

Everything else the paper computed less exactly (fp64 sums of raw values, fp16 r) univ computes exactly:
paper-exact reproduces the paper's *definitions*, not its rounding. The rotation is drawn in float64 and
used in fp32; the paper stored R in fp16, which changes only which random matrix is drawn.
"""

from __future__ import annotations

from typing import Any

import torch

# The CorrelateConfig fields --paper-exact fixes (a conflicting explicit option is refused); the exclusion
# rule follows from the flag itself (paper_excluded_token_ids).
SETTINGS: dict[str, Any] = {
    "dtype": "float32",
    "activation_dtype": "float16",
    "operand_dtype": "float32",  # the paper's per-layer matmuls ran in fp32
    "baseline": "gaussian",
    "baseline_draws": 1,
}


def single_newline_id(tokenizer: Any) -> int | None:
    """The id of the token "\\n" when the tokenizer writes a lone newline as one token (else None)."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def paper_excluded_token_ids(tokenizer: Any) -> set[int]:
    """pad, BOS, EOS and the single "\\n" token: the positions the paper's ``get_activations`` dropped."""
    from univ.data import excluded_token_ids

    newline = single_newline_id(tokenizer)
    return excluded_token_ids(tokenizer, newlines=False, extra=() if newline is None else (newline,))


def round_activations(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """x rounded to ``dtype`` (the paper: fp16) and back to its own dtype; unchanged when dtype is None."""
    if dtype is None or dtype == x.dtype:
        return x
    return x.to(dtype).to(x.dtype)

"""What a run reads before it plans: the models, checked against each other and the context length."""

from __future__ import annotations

import torch

from univ.errors import UserError
from univ.run.config import CorrelateConfig


def load_models(cfg: CorrelateConfig, device: torch.device):
    from univ.models import check_same_tokenizer, load_model, max_positions

    # fp32 by default on every device: a bf16 forward moved r by up to 6e-3 on the zoo (README, "Precision")
    models = [load_model(name, device=device, dtype=cfg.dtype or "float32", trust_remote_code=cfg.trust_remote_code)
              for name in cfg.models]
    check_same_tokenizer(models)
    for lm in models:
        limit = max_positions(lm)
        if limit is not None and cfg.ctx > limit:
            raise UserError(f"--ctx {cfg.ctx} exceeds {lm.name}'s {limit} positions; pass --ctx {limit} or less")
    if cfg.sae is not None:  # the SAEs' latents are the run's neurons (univ.sites)
        from univ.sites import with_saes

        models = with_saes(models, cfg.sae)
    return models

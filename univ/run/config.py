"""What defines a correlate run: the options (``CorrelateConfig``), the device, the models' column labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from univ.baseline import KINDS as BASELINES
from univ.errors import UserError

DEFAULT_BASELINE_DRAWS = 16  # universal-set Jaccard 0.97 between runs, vs 0.70 for one draw (README)

MODES = ("reference", "all-pairs")
METHODS = ("auto", "exact", "screen")  # univ.run.screen; auto: exact when its plan is one pass, screen otherwise


class ConfigError(UserError, ValueError):
    """An option out of range or inconsistent (exit 2)."""


@dataclass(frozen=True)
class CorrelateConfig:
    """Everything that defines a correlate run; ``asdict`` of it is the manifest's ``config``."""

    models: tuple[str, ...]  # hub names or local paths; index 0 is the reference model
    data: str  # text file(s), tokenized dataset, or a `datasets` hub name
    out: str = "runs/correlate"
    tokens: int = 1_000_000  # kept tokens (BOS/pad/newline positions excluded)
    mode: str = "reference"  # "reference": model 0 against each other; "all-pairs": every pair
    baseline: str = "gaussian"  # "gaussian" (the paper's), "orthogonal" (Haar), or "none"
    baseline_seed: int = 0
    baseline_draws: int | None = None  # rotations per layer (None: DEFAULT_BASELINE_DRAWS; 1: the paper's)
    batch_size: int = 8  # sequences per forward
    ctx: int = 512  # tokens per sequence, BOS first (the paper's 512)
    seed: int = 0  # data order
    text_field: str = "text"
    split: str = "train"
    exclude_newlines: bool = True  # drop "\n" positions, as the paper did
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # model dtype; default float32 (a bf16 forward moves r by up to 6e-3: README)
    operand_dtype: str | None = None  # GEMM operands (centred); default fp32 on CPU, fp16 on CUDA
    activation_dtype: str | None = None  # round activations to this dtype before any statistic (paper: fp16)
    layer_similarity: bool = True  # linear CKA between every layer pair from the accumulators (+ W of model a)
    paper_exact: bool = False  # the paper's choices (univ.paper.SETTINGS); fixes the fields it names
    backend: str = "auto"  # univ_kernels backend
    gemm: str | None = None  # GPU GEMM path: "cublas", "triton" or "triton-tma" (Hopper+)
    memory_budget_gb: float | None = None  # accumulator budget; default: 90 % of free device memory
    checkpoint_every: int | None = None  # tokens between checkpoints (None: only at pass ends / Ctrl-C)
    save_state: bool = True  # keep the accumulators (safetensors) in OUT/state for re-analysis
    activation_stats: bool = False  # also stream the analysed models' activation statistics (univ stats)
    bins: int = 100
    trust_remote_code: bool = False
    token_shards: int | None = None  # torchrun: ranks that split the token stream (default: the cost model's pick)
    sae: tuple[str, ...] | None = None  # per model: its SAE folders, comma-separated (univ.sites); None: MLP neurons
    method: str = "auto"  # "exact": every co-moment; "screen": screen, then verify (univ.run.screen); auto: see METHODS
    screen_tokens: int | None = None  # tokens of the screening sample (None: univ.run.screen.default_screen_tokens)

    def __post_init__(self):
        if len(self.models) < 2:
            raise ConfigError(f"need at least two models to correlate, got {len(self.models)}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.tokens < 1 or self.batch_size < 1 or self.ctx < 2:
            raise ConfigError("tokens and batch_size must be ≥ 1 and ctx ≥ 2")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.screen_tokens is not None and self.screen_tokens < 1:
            raise ConfigError(f"--screen-tokens must be ≥ 1, got {self.screen_tokens}")
        if self.token_shards is not None and self.token_shards < 1:
            raise ConfigError("token_shards must be ≥ 1")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every must be a positive number of tokens")
        if self.sae is not None:
            object.__setattr__(self, "sae", tuple(str(s) for s in self.sae))  # paths or strings, as the CLI gives
            if len(self.sae) != len(self.models):
                raise ConfigError(f"{len(self.sae)} --sae for {len(self.models)} models: give one --sae per model, "
                                  "in order (several SAEs of one model comma-separated)")
            if self.activation_stats:
                raise ConfigError("--activation-stats measures MLP pre-activations; it does not apply to --sae latents")
        if self.paper_exact:
            self._apply_paper_exact()
        if self.baseline_draws is None:
            object.__setattr__(self, "baseline_draws", DEFAULT_BASELINE_DRAWS)
        if self.baseline_draws < 1:
            raise ConfigError(f"--baseline-draws must be ≥ 1, got {self.baseline_draws}")

    def _apply_paper_exact(self) -> None:
        """Fix the paper's settings (recorded in the manifest's config); refuse an option that contradicts one."""
        from univ.paper import SETTINGS

        conflicts = [f"{k}={getattr(self, k)!r}" for k, v in SETTINGS.items() if getattr(self, k) not in (None, v)]
        if not self.exclude_newlines:
            conflicts.append("keep newlines")
        if conflicts:
            raise ConfigError(f"--paper-exact fixes {', '.join(sorted(SETTINGS))} and the newline rule; drop the "
                            f"conflicting option(s): {', '.join(conflicts)}")
        for k, v in SETTINGS.items():
            object.__setattr__(self, k, v)

    def fingerprint(self) -> dict:
        """The fields a resumed run must share with its checkpoint (output-only and layout options excluded: a
        checkpoint resumes on any device, world size or token-shard count)."""
        skip = {"out", "checkpoint_every", "memory_budget_gb", "save_state", "device", *LAYOUT_OPTIONS}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# How the work is split or done, never the answer: a resume keeps the checkpoint's method (univ.run.driver)
LAYOUT_OPTIONS = ("token_shards", "method")


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available here; use --device cpu")
    return device


def model_labels(names: tuple[str, ...]) -> list[str]:
    """Short unique column labels: each model's :func:`univ.models.short_name` (deduplicated with a suffix)."""
    from univ.models import short_name

    labels: list[str] = []
    for name in names:
        base = short_name(name)
        label, k = base, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels

"""The screen method's arithmetic on per-(neuron, layer) maxima: which layers to verify, the margin, the certificate.

For one direction of a pair (the rows: neurons of model a; the columns: model m's neurons, layer by layer) the
screen leaves, for every row i and layer l of m, ``sc_max[i, l]``: the largest Pearson r of i with a neuron of
layer l over the screening sample, and per baseline draw k ``sc_rot[k, i, l]``: the same over that layer's
rotated neurons. The exact pass computes, for the layers chosen for row i (its *segments*), the same maxima
over every token (``ex_max``, ``ex_rot``).

The bound. Write e = (maximum over all tokens) − (maximum over the sample) for one (row, layer, draw). The
exact segments give 1 + K observed e per verified layer of a row; its ``margin`` is GAMMA times the larger of
its own largest |e| and the GROUP_QUANTILE of the rows of its layer of a (never below FLOOR). A layer l that
was not verified for row i is taken to hold nothing above ``sc_max[i, l] + margin`` (and, per draw k,
``sc_rot[k, i, l] + margin``). A row is *certified* when its best exact value beats every such bound: its
max, argmax and baseline are then the exhaustive method's. The others get every remaining layer verified
in one more pass (the fallback), so the loop ends after ``MAX_ROUNDS`` rounds with the exhaustive answer.
Screen-dead columns (constant on the sample) are verified for every row.

This is a statistical bound, not a proof: it assumes that a maximum the sample saw moves no more than GAMMA
times what the verified maxima of the same row moved. The sample is spread evenly over the stream, so drift
along the stream shows in those changes; on the zoos, GAMMA = 2 already held for every unverified
(row, layer), and 3 is used.
"""

from __future__ import annotations

import math

import torch

GAMMA = 3.0  # margin = GAMMA × the largest observed |exact − screen| change of a maximum in the row's layer of a
GROUP_QUANTILE = 0.9  # the floor a row's margin takes from the other rows of its layer
FLOOR = 1e-5  # the margin never goes below this: fp32 rounding of r is ~1e-7
# The first round verifies the layers within 2·Z/√S of the row's best on the sample. The margin that follows is
# ~3 × (1.5–2)/√S (the largest change of a maximum seen on the shipped depth zoo, S = 8 k and 34 k), so a
# narrower window only sends rows to the fallback, which costs another pass over the stream.
PROVISIONAL_Z = 5.0
MAX_ROUNDS = 2  # round 2 (the fallback) verifies every remaining layer of each row still uncertified


def provisional_delta(screen_tokens: int) -> float:
    """Half-width of the first round's window, Z/√S: the sampling error of a Pearson r on S tokens is ≲ 1/√S."""
    return PROVISIONAL_Z / math.sqrt(max(screen_tokens, 1))


def _neg_inf(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=float("-inf"))


def select_layers(sc_max: torch.Tensor, sc_rot: torch.Tensor | None, delta: float) -> torch.Tensor:
    """[n, L] bool: the layers whose sample maximum is within 2·delta of the row's best (its own, or any draw's
    rotated one). A row with nothing alive on the sample gets every layer."""
    sc_max = _neg_inf(sc_max)
    pick = sc_max >= sc_max.amax(1, keepdim=True) - 2 * delta
    if sc_rot is not None:
        sc_rot = _neg_inf(sc_rot)
        pick |= (sc_rot >= sc_rot.amax(2, keepdim=True) - 2 * delta).any(0)
    return pick


def observed_margin(done: torch.Tensor, sc_max: torch.Tensor, sc_rot: torch.Tensor | None, ex_max: torch.Tensor,
                    ex_rot: torch.Tensor | None, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[n] per row: GAMMA × the larger of the row's own largest |exact − sample| change of a verified maximum and
    the GROUP_QUANTILE of those row values in its group (its layer of a), at least FLOOR. Rows differ by orders
    of magnitude in how well a sample pins them (a rarely firing neuron against a dense one), so each keeps
    its own; the group's quantile keeps a row with few observations from a lucky small one."""
    devs = [torch.where(done & ex_max.isfinite() & sc_max.isfinite(), (ex_max - sc_max).abs(), 0.0)]
    if sc_rot is not None:
        ok = done[None] & ex_rot.isfinite() & sc_rot.isfinite()
        devs.append(torch.where(ok, (ex_rot - sc_rot).abs(), 0.0).amax(0))
    row_dev = torch.stack([d.amax(1) for d in devs]).amax(0).double()  # [n]
    seen = (done & ex_max.isfinite()).any(1)
    pooled = torch.full((n_groups,), float("nan"), dtype=torch.float64)
    for g in range(n_groups):
        vals = row_dev[(group == g) & seen]
        if len(vals):
            pooled[g] = torch.quantile(vals, GROUP_QUANTILE)
    fill = pooled[~pooled.isnan()].max() if bool((~pooled.isnan()).any()) else torch.tensor(float("inf"))
    pooled = torch.where(pooled.isnan(), fill, pooled)
    own = torch.where(seen, row_dev, float("inf"))  # a row with nothing verified yet: no bound at all
    return (GAMMA * torch.maximum(own, pooled[group])).clamp(min=FLOOR)


def best_of(done: torch.Tensor, ex_max: torch.Tensor, ex_arg: torch.Tensor, extra_max: torch.Tensor | None = None,
            extra_arg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] max r, [n] global argmax) over the verified layers (and the always-verified columns): the largest
    value, and on exact ties the smallest column index, as the exhaustive method's argmax; (NaN, −1) if none."""
    vals = _neg_inf(torch.where(done, ex_max, float("-inf")))
    args = torch.where(done, ex_arg, -1)
    if extra_max is not None:
        vals = torch.cat([vals, _neg_inf(extra_max)[:, None]], 1)
        args = torch.cat([args, extra_arg[:, None]], 1)
    best = vals.amax(1)
    tied = (vals == best[:, None]) & torch.isfinite(best)[:, None]
    big = torch.iinfo(torch.int64).max
    arg = torch.where(tied, args, big).amin(1)
    arg = torch.where(torch.isfinite(best), arg, -1)
    return torch.where(torch.isfinite(best), best, float("nan")), arg


def best_rotated(done: torch.Tensor, ex_rot: torch.Tensor) -> torch.Tensor:
    """[K, n] the baseline: per draw, the max over the verified layers' rotated neurons (NaN if none)."""
    best = _neg_inf(torch.where(done[None], ex_rot, float("-inf"))).amax(2)
    return torch.where(torch.isinf(best), float("nan"), best)


def uncertified(done: torch.Tensor, alive: torch.Tensor, sc_max: torch.Tensor, sc_rot: torch.Tensor | None,
                best: torch.Tensor, base: torch.Tensor | None, margin: torch.Tensor) -> torch.Tensor:
    """[n, L] bool: the unverified layers whose bound (sample max + margin) reaches the row's best exact value
    (or a draw's baseline). Empty row: certified. Dead rows (over every token) need nothing."""
    lo = _neg_inf(best)[:, None]
    need = ~done & (_neg_inf(sc_max) + margin[:, None] >= lo)
    if sc_rot is not None:
        need |= (~done[None] & (_neg_inf(sc_rot) + margin[None, :, None] >= _neg_inf(base)[:, :, None])).any(0)
    return need & alive[:, None]

"""Binary features of the vocabulary: one boolean per (token id, feature), used to explain neurons.

Gurnee et al. (2024) explain a neuron by the binary feature of the current (or previous) token that
explains most of its activation variance. Every feature here is a function of the token id alone, so it
is a column of a [V, F] matrix and a batch's features are a row lookup — no table of tokens is ever built.

Feature names are ``kind:value``; the kind says which family a neuron explained by it belongs to:

    token:' the'      one frequent token id                                    unigram
    unigram:the       every id whose string, stripped and lower-cased, is "the"  unigram
    type:all_caps     shape: all_caps, capitalised, all_lower, is_alpha, is_numeric, contains_digit,
                      is_punct, leading_space, whitespace, is_year, one_digit … four_digit   unigram
    symbol:,          contains that punctuation or symbol character             unigram
    group:month       small closed word lists: months, days, number words, pronouns (by person,
                      gender, case), determiners, conjunctions, prepositions, auxiliaries,
                      negations, colours, stop words                           unigram
    suffix:ing        an alphabetic word ending in a common English suffix     unigram
    prefix:un         an alphabetic word starting with a common prefix          unigram
    starts:a          the first letter after any leading space is "a"/"A"       alphabet

``token`` and ``unigram`` features are the K most frequent ids / normalised strings, by counts from the data
(``count_tokens``) when given, else by id order (byte-level BPE numbers merges in order of frequency).
All-false and all-true columns are dropped, and so are duplicates (the first name in the order above is
kept), so a feature that names one token in a small vocabulary is reported as that token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["FEATURE_GROUP", "VocabFeatures", "count_tokens", "token_strings", "vocab_features"]

# kind -> family a neuron explained by such a feature belongs to
FEATURE_GROUP = {
    "token": "unigram",
    "unigram": "unigram",
    "type": "unigram",
    "symbol": "unigram",
    "group": "unigram",
    "suffix": "unigram",
    "prefix": "unigram",
    "starts": "alphabet",
}

SYMBOLS = ".,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`"
SUFFIXES = (
    "ing", "ed", "ly", "s", "es", "er", "est", "tion", "sion", "ment", "ness", "ity", "al", "ful", "less",
    "able", "ible", "ous", "ive", "ize", "ise", "ism", "ist", "ence", "ance", "ship", "hood", "en", "ic",
    "ish", "ward", "th", "y", "ant", "ent", "ary", "ory", "ure", "age", "dom",
)  # fmt: skip
PREFIXES = ("un", "re", "in", "im", "dis", "pre", "non", "over", "sub", "inter", "anti", "de", "mis", "co", "ex")

_W = str.split
WORD_GROUPS: dict[str, frozenset[str]] = {
    k: frozenset(_W(v))
    for k, v in {
        "month": "january february march april may june july august september october november december "
        "jan feb mar apr jun jul aug sep sept oct nov dec",
        "day": "monday tuesday wednesday thursday friday saturday sunday mon tue tues wed thu thurs fri sat sun",
        "number_word": "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
        "hundred thousand million billion trillion dozen",
        "ordinal": "first second third fourth fifth sixth seventh eighth ninth tenth last next",
        "pronoun": "i me my mine myself you your yours yourself yourselves he him his himself she her hers herself "
        "it its itself we us our ours ourselves they them their theirs themselves thee thou thy thine",
        "pronoun_first": "i me my mine myself we us our ours ourselves",
        "pronoun_second": "you your yours yourself yourselves thee thou thy thine",
        "pronoun_third": "he him his himself she her hers herself it its itself they them their theirs themselves",
        "pronoun_male": "he him his himself",
        "pronoun_female": "she her hers herself",
        "pronoun_neutral": "it its itself",
        "pronoun_plural": "we us our ours ourselves they them their theirs themselves",
        "pronoun_subject": "i you he she it we they thou",
        "pronoun_object": "me him her us them thee",
        "pronoun_possessive": "my mine your yours his her hers its our ours their theirs thy thine",
        "pronoun_reflexive": "myself yourself yourselves himself herself itself ourselves themselves",
        "demonstrative": "this that these those",
        "interrogative": "who whom whose which what where when why how",
        "determiner": "a an the this that these those some any every each no all both either neither",
        "article": "a an the",
        "conjunction": "and or but nor yet so for because although though while whereas if unless since whether",
        "preposition": "of in on at by for with about against between into through during before after above "
        "below to from up down out off over under again further near upon within without across along among "
        "around behind beyond toward towards",
        "auxiliary": "is am are was were be been being have has had do does did will would shall should can "
        "could may might must",
        "negation": "not no never none nothing nobody neither nor nowhere cannot",
        "colour": "red blue green yellow black white orange purple pink brown grey gray violet",
        "stop_word": "a an the and or but if then else of in on at by for with about to from up down out off "
        "over under is am are was were be been being have has had do does did will would shall should can "
        "could may might must i me my we our you your he him his she her it its they them their this that "
        "these those what which who whom as so than too very not no just only also there here when where why how",
    }.items()
}


@dataclass
class VocabFeatures:
    """Binary features of the vocabulary: ``matrix[v, f]`` is feature f of token id v."""

    names: list[str]  # "kind:value"
    matrix: Tensor  # [V, F] bool, CPU
    groups: list[str]  # family of each feature: "unigram" or "alphabet"

    def __post_init__(self) -> None:
        if self.matrix.shape[1] != len(self.names) or len(self.groups) != len(self.names):
            raise ValueError(
                f"VocabFeatures: matrix has {self.matrix.shape[1]} columns for {len(self.names)} names "
                f"and {len(self.groups)} groups"
            )

    @property
    def vocab_size(self) -> int:
        return self.matrix.shape[0]

    def column(self, name: str) -> Tensor:
        """The [V] bool column of one feature (``KeyError`` naming close matches if absent)."""
        try:
            return self.matrix[:, self.names.index(name)]
        except ValueError:
            kind = name.split(":", 1)[0]
            near = [n for n in self.names if n.startswith(kind + ":")][:8]
            raise KeyError(f"no vocab feature {name!r}; features of kind {kind!r} include {near}") from None


def token_strings(tokenizer: Any, vocab_size: int | None = None) -> list[str]:
    """Each id decoded alone (``" the"``, not ``"Ġthe"``); ids past the tokenizer decode to ""."""
    n = len(tokenizer)
    vocab_size = n if vocab_size is None else vocab_size
    out = tokenizer.batch_decode([[i] for i in range(min(n, vocab_size))], clean_up_tokenization_spaces=False)
    return list(out) + [""] * max(0, vocab_size - n)


def count_tokens(input_ids: Iterable[Tensor], vocab_size: int, *, keep: Iterable[Tensor] | None = None) -> np.ndarray:
    """Occurrences of each token id over batches of ids (optionally only where ``keep``): int64 [vocab_size]."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    keeps = iter(keep) if keep is not None else None
    for ids in input_ids:
        ids = ids if keeps is None else ids[next(keeps)]
        counts += np.bincount(ids.reshape(-1).cpu().numpy(), minlength=vocab_size)[:vocab_size]
    return counts


def _type_features(s: str) -> dict[str, bool]:
    t = s.strip()
    alpha = t.isalpha()
    digits = t.isdigit() and t.isascii()
    return {
        "type:leading_space": bool(t) and s[:1].isspace(),
        "type:whitespace": bool(s) and not t,
        "type:all_caps": alpha and t.isupper() and len(t) > 1,
        "type:capitalised": alpha and t[:1].isupper() and (len(t) == 1 or t[1:].islower()),
        "type:all_lower": alpha and t.islower(),
        "type:is_alpha": alpha,
        "type:is_numeric": digits,
        "type:contains_digit": any(c.isdigit() for c in t),
        "type:is_punct": bool(t) and all(not c.isalnum() and not c.isspace() for c in t),
        "type:is_year": digits and len(t) == 4 and 1490 < int(t) < 2200,
        "type:one_digit": digits and len(t) == 1,
        "type:two_digit": digits and len(t) == 2,
        "type:three_digit": digits and len(t) == 3,
        "type:four_digit": digits and len(t) == 4,
    }


def vocab_features(
    tokenizer: Any,
    *,
    vocab_size: int | None = None,
    token_counts: np.ndarray | None = None,
    n_tokens: int = 300,
    n_unigrams: int = 300,
    min_count: int = 1,
    min_ids: int = 1,
) -> VocabFeatures:
    """The feature matrix of a tokenizer's vocabulary (module doc lists the features).

    Args:
        vocab_size: rows of the matrix (the model's d_vocab; ids past the tokenizer have no feature).
        token_counts: [V] occurrences in the data; ranks ``token:`` and ``unigram:`` features by frequency
            and drops those seen fewer than ``min_count`` times. Without it, ids rank by id order.
        n_tokens, n_unigrams: how many single-token and normalised-string features to make.
        min_ids: a ``unigram:`` string must map to at least this many ids (the paper, on GPT-2: > 3).
    """
    strings = token_strings(tokenizer, vocab_size)
    V = len(strings)
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None and i < V}
    valid = np.array([i not in special and s != "" for i, s in enumerate(strings)])
    if token_counts is not None:
        counts = np.zeros(V, dtype=np.int64)
        counts[: min(V, len(token_counts))] = np.asarray(token_counts)[:V]
        rank = -counts.astype(np.float64)  # most frequent first; ties by id (stable sort)
    else:
        counts = None
        rank = np.arange(V, dtype=np.float64)  # BPE ids grow as merges get rarer

    columns: dict[str, np.ndarray] = {}

    def add(name: str, ids: Iterable[int] | np.ndarray) -> None:
        col = np.zeros(V, dtype=bool)
        col[np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)] = True
        columns.setdefault(name, col & valid)

    # token: single frequent ids
    order = np.argsort(rank, kind="stable")
    chosen = [i for i in order if valid[i] and (counts is None or counts[i] >= min_count)][:n_tokens]
    for i in chosen:
        add(f"token:{strings[i]!r}", [i])

    # unigram: normalised strings
    by_key: dict[str, list[int]] = {}
    for i, s in enumerate(strings):
        key = s.strip().lower()
        if valid[i] and key:
            by_key.setdefault(key, []).append(i)
    key_rank = {
        k: (-int(counts[ids].sum()) if counts is not None else min(ids))
        for k, ids in by_key.items()
        if len(ids) >= min_ids
    }
    keys = sorted(key_rank, key=lambda k: (key_rank[k], k))
    if counts is not None:
        keys = [k for k in keys if -key_rank[k] >= min_count]
    for k in keys[:n_unigrams]:
        add(f"unigram:{k}", by_key[k])

    # shape, symbols, word groups, affixes, first letter
    types = [_type_features(s) for s in strings]
    for name in types[0]:
        add(name, np.array([f[name] for f in types]).nonzero()[0])
    for c in SYMBOLS:
        add(f"symbol:{c}", [i for i, s in enumerate(strings) if c in s])
    stripped = [s.strip().lower() for s in strings]
    for group, words in WORD_GROUPS.items():
        add(f"group:{group}", [i for i, w in enumerate(stripped) if w in words])
    for suf in SUFFIXES:
        add(
            f"suffix:{suf}",
            [i for i, w in enumerate(stripped) if w.isalpha() and len(w) > len(suf) + 1 and w.endswith(suf)],
        )
    for pre in PREFIXES:
        add(
            f"prefix:{pre}",
            [i for i, w in enumerate(stripped) if w.isalpha() and len(w) > len(pre) + 2 and w.startswith(pre)],
        )
    for letter in "abcdefghijklmnopqrstuvwxyz":
        add(f"starts:{letter}", [i for i, w in enumerate(stripped) if w[:1] == letter])

    # drop constant and duplicate columns, keeping the first name
    names, cols, seen = [], [], set()
    for name, col in columns.items():
        n_true = int(col.sum())
        if n_true == 0 or n_true == V:
            continue
        key = col.tobytes()
        if key in seen:
            continue
        seen.add(key)
        names.append(name)
        cols.append(col)
    matrix = torch.from_numpy(np.stack(cols, 1)) if cols else torch.zeros(V, 0, dtype=torch.bool)
    groups = [FEATURE_GROUP[n.split(":", 1)[0]] for n in names]
    return VocabFeatures(names=names, matrix=matrix, groups=groups)

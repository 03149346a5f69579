"""Losses that HF models do not compute themselves: verbalizer classification with a causal LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def verbalizer_scores(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """log P(candidate word | prompt) for every example and candidate, shape [batch, candidates].

    ``inputs`` comes from :class:`zoft.data.collate.VerbalizerCollator`: either ``candidate_ids``
    (one-token words, scored from the last position) or ``candidate_mask`` (multi-token words,
    one row per example and candidate, each token's log-probability weighted by the mask: the mean
    over the word's tokens by default, ``data.verbalizer_score: sum`` for the sum).
    """
    return verbalizer_scores_from_logits(model(**verbalizer_forward_kwargs(inputs)).logits, inputs)


def verbalizer_forward_kwargs(inputs: dict[str, torch.Tensor]) -> dict:
    """The model's keyword arguments for :func:`verbalizer_scores` (one-token words: the last position only)."""
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return {**batch, "logits_to_keep": 1} if "candidate_ids" in inputs else batch


def verbalizer_scores_from_logits(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`verbalizer_scores` from the logits of the model called with :func:`verbalizer_forward_kwargs`
    (the paired forward scores each half of a doubled batch with it)."""
    if "candidate_ids" in inputs:
        return logits[:, -1, :].float().log_softmax(-1)[:, inputs["candidate_ids"]]
    mask = inputs["candidate_mask"]
    logits = logits[:, :-1, :].float()
    targets = inputs["input_ids"][:, 1:]
    token_logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per_row = (token_logp * mask[:, 1:].to(token_logp.dtype)).sum(-1)  # weights: mean or sum (the collator's)
    n_candidates = int(per_row.numel() // inputs["cls_labels"].numel())
    return per_row.view(-1, n_candidates)


def verbalizer_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the candidates' scores (MeZO's prompt-based classification loss)."""
    return F.cross_entropy(scores, labels)

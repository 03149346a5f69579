"""Losses that HF models do not compute themselves: verbalizer classification with a causal LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def verbalizer_scores(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """log P(candidate word | prompt) for every example and candidate, shape [batch, candidates].

    ``inputs`` comes from :class:`zoft.data.collate.VerbalizerCollator`: either ``candidate_ids``
    (one-token words, scored from the last position) or ``candidate_mask`` (multi-token words,
    one row per example and candidate, token log-probabilities summed).
    """
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if "candidate_ids" in inputs:
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
        return logits.float().log_softmax(-1)[:, inputs["candidate_ids"]]
    mask = inputs["candidate_mask"]
    logits = model(**batch).logits[:, :-1, :].float()
    targets = batch["input_ids"][:, 1:]
    token_logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per_row = (token_logp * mask[:, 1:]).sum(-1)
    n_candidates = int(per_row.numel() // inputs["cls_labels"].numel())
    return per_row.view(-1, n_candidates)


def verbalizer_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the candidates' scores (MeZO's prompt-based classification loss)."""
    return F.cross_entropy(scores, labels)

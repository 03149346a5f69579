"""Batching: dynamic padding for causal LM rows and verbalizer classification prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids``; padded label positions are -100 (ignored by the loss)."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _left_pad(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    # Left padding puts every prompt's last token at -1; positions must skip the pads.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


@dataclass
class VerbalizerCollator:
    """Batches classification prompts for verbalizer scoring with a causal LM.

    When every verbalizer word is one token, prompts are left-padded and the words are scored
    from the last position's logits (one forward, ``logits_to_keep=1``). Otherwise each prompt is
    repeated once per candidate with the candidate's tokens appended, and ``candidate_mask`` holds the
    weight of each token's log-probability in the candidate's score: ``1 / len(candidate)`` on its
    tokens for ``score="mean"`` (MeZO's scoring, the default), 1 for ``score="sum"``, 0 elsewhere.

    Args:
        pad_token_id: Token id written into padding positions.
        candidates: Each verbalizer word's token ids, in label order.
        score: ``"mean"`` or ``"sum"`` of a multi-token word's token log-probabilities.
    """

    pad_token_id: int
    candidates: list[list[int]]
    score: str = "mean"

    def __post_init__(self):
        if self.score not in ("mean", "sum"):
            raise ValueError(f"VerbalizerCollator: score must be 'mean' or 'sum', got {self.score!r}")

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.candidates)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([r["cls_label"] for r in rows], dtype=torch.long)
        if self.single_token:
            batch = _left_pad([r["input_ids"] for r in rows], self.pad_token_id)
            batch["candidate_ids"] = torch.tensor([c[0] for c in self.candidates], dtype=torch.long)
        else:
            seqs, marks = [], []
            for r in rows:
                for cand in self.candidates:
                    weight = 1.0 / len(cand) if self.score == "mean" else 1.0
                    seqs.append(list(r["input_ids"]) + cand)
                    marks.append([0.0] * len(r["input_ids"]) + [weight] * len(cand))
            batch = _left_pad(seqs, self.pad_token_id)
            cmask = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
            for i, m in enumerate(marks):
                cmask[i, cmask.shape[1] - len(m) :] = torch.tensor(m)
            batch["candidate_mask"] = cmask
        batch["cls_labels"] = labels
        return batch


@dataclass
class SequenceClassificationCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = CausalLMCollator(self.pad_token_id)([{**r, "labels": r["input_ids"]} for r in rows])
        batch["labels"] = torch.tensor([r["cls_label"] for r in rows], dtype=torch.long)
        return batch

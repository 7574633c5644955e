"""A trial's evaluation: loss and accuracy over the eval rows' answer tokens, with their standard
errors over the rows and each row's own value, in batches within the eval token budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainables.data import IGNORE, collate
from trainables.generate import standard_error
from trainables.step import answer_logits, next_is_answer

EVAL_BATCH = 16  # rows per eval batch on CPU; on GPU a token budget decides:
# A batch's bf16 logits (at its answer positions, at most all its tokens) span the vocabulary, so the budget keeps them within
# EVAL_LOGITS_BYTES: a 262k-token vocabulary gets 2048 tokens a batch, a 49k one 10922 (8x a
# short train batch's tokens were 16k-token batches of 8.6 GB of logits with a 262k vocabulary,
# and as much again in float32 for the answer positions: such trials held up to 25.7 GB).
# Never fewer than a train batch's tokens, whose logits training holds anyway. Eval keeps no
# activations for a backward pass, so past the logits a batch holds less than a train step.
EVAL_LOGITS_BYTES = 1 << 30


def eval_token_budget(train_tokens_per_batch: int, vocab_size: int) -> int:
    """Padded tokens per eval batch on GPU: as many as keep the batch's bf16 logits within
    EVAL_LOGITS_BYTES, and at least a train batch's."""
    return max(train_tokens_per_batch, EVAL_LOGITS_BYTES // (2 * vocab_size))



@dataclass(frozen=True)
class Evaluation:
    """A trial's evaluation: `loss` and `accuracy` are means over all answer tokens (every token
    weighs the same, whatever row it is in); their standard errors (`loss_se`, `accuracy_se`)
    are those of the mean over rows of each row's own mean (`generate.standard_error`): the rows
    are the sample, and tokens of one row are not independent of each other. Where rows have
    similar answer lengths the two means agree; the standard error is of the per-row one.

    `row_loss` and `row_accuracy` are those per-row means, one per eval row that has an answer
    token, in the order of the rows evaluated (the eval split's): every trial of a run scores the
    same rows, and which rows lack an answer token depends on the data alone, so two trials'
    lists pair row by row (the pick's paired comparison, analysis/select.py)."""

    loss: float
    accuracy: float
    loss_se: float
    accuracy_se: float
    row_loss: list[float]
    row_accuracy: list[float]

    def metrics(self) -> dict[str, float | list[float]]:
        return {"eval_loss": self.loss, "eval_loss_se": self.loss_se,
                "eval_accuracy": self.accuracy, "eval_accuracy_se": self.accuracy_se,
                "eval_row_loss": rounded(self.row_loss), "eval_row_accuracy": rounded(self.row_accuracy)}


def rounded(values: list[float]) -> list[float]:
    """`values` to 9 significant digits: the token losses are computed in float32 (about 7), and
    result.json keeps a list per eval round, which float64's 17 digits would make almost twice
    as long."""
    return [float(f"{value:.9g}") for value in values]


@torch.no_grad()
def evaluate(model, rows, pad_token_id: int, device, autocast, token_budget: int = 0) -> Evaluation:
    """Loss and accuracy over the answer tokens of `rows` (teacher forcing), with standard errors
    over the rows (`Evaluation`). Batches hold up to `token_budget`
    padded tokens (on GPU: a small model's eval is then a few launches), or without one
    (CPU) EVAL_BATCH rows. Rows are right-padded and no attention mask is passed, as in
    training (causal attention: no real token sees the padding after it). The sums stay on
    the device and are read once at the end (selecting the answer positions still waits for
    each batch's logits)."""
    return evaluate_blocks(model, rows, pad_token_id, device, autocast, token_budget)[0]


@torch.no_grad()
def evaluate_blocks(model, rows, pad_token_id: int, device, autocast, token_budget: int = 0,
                    blocks: int = 1) -> list[Evaluation]:
    """`evaluate` of `blocks` models at once: each batch goes through `model` as `blocks` copies
    of its rows, one after another, and block n's rows give the n-th `Evaluation`. A pack whose
    selection holds n slots (`Pack.only`) is n adapted models in one forward pass; the token
    budget is shared by the blocks, so a batch's logits stay as large as one model's."""
    model.eval()
    # per block and row: summed loss, correct tokens; per row: answer tokens
    row_losses, row_correct, row_counts = [], [], []
    order = sorted(range(len(rows)), key=lambda index: len(rows[index][0]))  # similar lengths together: less padding
    rows = [rows[index] for index in order]
    budget = token_budget // blocks
    start = 0
    while start < len(rows):
        end = min(len(rows), start + EVAL_BATCH)
        if token_budget:  # as many rows as fit: (rows) x (the longest's length)
            end = start + 1
            while end < len(rows) and (end - start + 1) * len(rows[end][0]) <= budget:
                end += 1
        chunk = rows[start:end]
        start = end
        batch = collate(chunk, pad_token_id, torch.device("cpu"))
        ids, labels = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels"))
        scored = next_is_answer(labels)
        with autocast:
            logits = answer_logits(model, ids.repeat(blocks, 1), scored.repeat(blocks, 1))
        answer_scores = logits.view(blocks, -1, logits.shape[-1]).float()  # block, answer token, vocabulary
        labels = labels[:, 1:]
        keep = labels != IGNORE
        answer_labels = labels[keep]
        row_of_token = keep.nonzero()[:, 0]
        token_losses = torch.nn.functional.cross_entropy(
            answer_scores.flatten(0, 1), answer_labels.repeat(blocks), reduction="none").double().view(blocks, -1)
        token_correct = (answer_scores.argmax(-1) == answer_labels).long()
        row_losses.append(torch.zeros(blocks, len(chunk), device=device, dtype=torch.float64)
                          .index_add_(1, row_of_token, token_losses))
        row_correct.append(torch.zeros(blocks, len(chunk), device=device, dtype=torch.long)
                           .index_add_(1, row_of_token, token_correct))
        row_counts.append(keep.sum(1))
    model.train()
    rows_order = torch.argsort(torch.tensor(order))  # from the batches' order back to the rows' own
    counts = torch.cat(row_counts).cpu()[rows_order]
    answered = counts > 0  # a row whose answer was truncated away has no token to score
    count = int(counts.sum())
    out = []
    for losses, correct in zip(torch.cat(row_losses, dim=1).cpu()[:, rows_order],
                               torch.cat(row_correct, dim=1).cpu()[:, rows_order]):
        row_loss = (losses[answered] / counts[answered]).tolist()
        row_accuracy = (correct[answered] / counts[answered]).tolist()
        out.append(Evaluation(
            loss=losses.sum().item() / count,
            accuracy=correct.sum().item() / count,
            loss_se=standard_error(row_loss),
            accuracy_se=standard_error(row_accuracy),
            row_loss=row_loss,
            row_accuracy=row_accuracy,
        ))
    return out

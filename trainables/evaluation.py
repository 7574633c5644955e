"""A trial's evaluation: loss and accuracy over the eval rows' answer tokens, with their standard
errors over the rows and each row's own value, in batches within the eval token budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainables.data import IGNORE, collate
from trainables.generate import standard_error
from trainables.step import answer_logits, next_is_answer, scored_positions

EVAL_BATCH = 16  # rows per eval batch on CPU; on GPU an `EvalBudget` decides
# A batch's bf16 logits (at its answer positions) span the vocabulary, so its answer positions
# are held within EVAL_LOGITS_BYTES of them: a 262k-token vocabulary gets 8192 a batch, a 49k one
# 43690 (a 16k-token batch of answers was 8.6 GB of logits with a 262k vocabulary). Their float32
# loss is taken EVAL_LOSS_CHUNK_BYTES of float32 logits at a time (`answer_losses`), whose copy and
# log-softmax hold twice that: a batch holds at most 4 + 1 GiB for its logits, as one of a quarter
# of the answers did with its float32 copy and log-softmax whole. Never fewer than a train step's
# tokens, whose logits training holds anyway.
EVAL_LOGITS_BYTES = 4 << 30
EVAL_LOSS_CHUNK_BYTES = 1 << 29
# A batch's padded tokens: up to this many train steps' tokens (fewer for a model of fewer decoder
# layers). A train step keeps every layer's activations for its backward pass, and an eval pass
# only the layer it is in, so a batch of this many train steps' tokens holds less than the step
# did, for a model of at least this many layers; with gradient checkpointing the step keeps one
# layer's, and a batch holds one step's tokens. A shared trainer's train step is all its slots'
# batches: its evaluation of several slots at once goes in a few passes instead of dozens. A
# shared trainer on a GPU may then grow its passes into the memory left free (`EvalRoom`).
EVAL_STEPS_OF_TOKENS = 8


@dataclass(frozen=True)
class EvalBudget:
    """What one eval batch on a GPU holds at most: `tokens` padded tokens and `answers` answer
    positions (those whose logits are computed), over all the blocks of an `evaluate_blocks`."""

    tokens: int
    answers: int

    def fits(self, rows: int, width: int, answers: int, blocks: int = 1) -> bool:
        return rows * width * blocks <= self.tokens and answers * blocks <= self.answers


def model_eval_budget(model, train_tokens_per_batch: int, checkpointed: bool = False, slots: int = 1) -> EvalBudget:
    """`eval_budget` with the vocabulary and decoder layers of `model`'s own text config (one layer
    where the config does not say)."""
    text = model.config.get_text_config()
    return eval_budget(train_tokens_per_batch, text.vocab_size, getattr(text, "num_hidden_layers", 1), checkpointed,
                       slots)


def eval_budget(train_tokens_per_batch: int, vocab_size: int, layers: int, checkpointed: bool = False,
                slots: int = 1) -> EvalBudget:
    """The eval batch budget of a trial whose train batch holds `train_tokens_per_batch` padded
    tokens, on a model of `vocab_size` and `layers` decoder layers (EVAL_LOGITS_BYTES,
    EVAL_STEPS_OF_TOKENS), or of a shared trainer whose step holds `slots` such batches."""
    answers = max(train_tokens_per_batch, EVAL_LOGITS_BYTES // (2 * vocab_size))
    steps = 1 if checkpointed else max(1, min(EVAL_STEPS_OF_TOKENS, layers))
    return EvalBudget(tokens=max(answers, steps * slots * train_tokens_per_batch), answers=answers)


def pass_tokens(rows, budget: EvalBudget | None, blocks: int = 1) -> list[int]:
    """The padded tokens of each pass `evaluate_blocks` makes over `rows` (blocks included)."""
    rows = sorted(rows, key=lambda row: len(row[0]))
    return [(end - start) * len(rows[end - 1][0]) * blocks for start, end in batch_bounds(rows, budget, blocks)]


@dataclass
class EvalRoom:
    """The padded tokens a GPU trainer's eval passes may hold, learnt from its own evaluations:
    the rule of `eval_budget` bounds a pass by the train step's memory, which a trainer that owns
    its GPU may exceed where its memory shows room. After an evaluation whose largest pass held
    `largest` tokens, at most `transient` bytes beyond what was allocated before it (the
    allocator's peak since its start, so an upper bound), a pass may hold as many tokens as half
    of `room` (what the device and the trainer's share of it still hold) takes at that cost a
    token: the other half is left to the allocator's fragments and the reports' snapshots."""

    tokens: int = 0

    def budget(self, budget: EvalBudget | None) -> EvalBudget | None:
        """`budget`, with as many tokens as the room allows where that is more."""
        if budget is None or self.tokens <= budget.tokens:
            return budget
        return EvalBudget(tokens=self.tokens, answers=budget.answers)

    def learn(self, largest: int, transient: int, room: int) -> None:
        if largest > 0 and transient > 0:
            self.tokens = int(room / 2 / (transient / largest))


def device_room(device, share: float = 1.0) -> int:
    """Bytes the trainer on `device` may still allocate: what the device has free and the
    allocator holds unused, within `share` of the device's memory (a trial in a process of its
    own may take the rest)."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    return max(0, min(free + reserved - allocated, int(share * total) - allocated))


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


def batch_bounds(rows, budget: EvalBudget | None, blocks: int = 1) -> list[tuple[int, int]]:
    """The eval batches of `rows` (sorted by length, as `evaluate_blocks` sorts them) as (start,
    end): as many rows as fit `budget`, (rows) x (the longest's length) x `blocks` tokens and their
    answers, or without one EVAL_BATCH rows."""
    if budget is None:
        return [(start, min(len(rows), start + EVAL_BATCH)) for start in range(0, len(rows), EVAL_BATCH)]
    answers = [scored_positions(labels) for _, labels in rows]
    bounds, start = [], 0
    while start < len(rows):
        end, held = start + 1, answers[start]
        while end < len(rows) and budget.fits(end - start + 1, len(rows[end][0]), held + answers[end], blocks):
            held += answers[end]
            end += 1
        bounds.append((start, end))
        start = end
    return bounds


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer position's float32 cross-entropy (as float64, to be summed) and whether its
    top logit is its label (as int64), EVAL_LOSS_CHUNK_BYTES of float32 logits at a time: the
    float32 copy and its log-softmax of every position at once would hold four times the bf16
    logits again."""
    chunk = max(1, EVAL_LOSS_CHUNK_BYTES // (4 * logits.shape[-1]))
    losses, correct = [], []
    for start in range(0, len(logits), chunk):
        scores, wanted = logits[start:start + chunk].float(), labels[start:start + chunk]
        losses.append(torch.nn.functional.cross_entropy(scores, wanted, reduction="none"))
        correct.append(scores.argmax(-1) == wanted)
    return torch.cat(losses).double(), torch.cat(correct).long()


@torch.no_grad()
def evaluate(model, rows, pad_token_id: int, device, autocast, budget: EvalBudget | None = None) -> Evaluation:
    """Loss and accuracy over the answer tokens of `rows` (teacher forcing), with standard errors
    over the rows (`Evaluation`). Batches hold as many rows as `budget` allows (on GPU: a small
    model's eval is then a few launches), or without one (CPU) EVAL_BATCH rows. Rows are
    right-padded and no attention mask is passed, as in
    training (causal attention: no real token sees the padding after it). The sums stay on
    the device and are read once at the end, and the answer positions are chosen on the host:
    no batch waits for the one before it."""
    return evaluate_blocks(model, rows, pad_token_id, device, autocast, budget)[0]


@torch.no_grad()
def evaluate_blocks(model, rows, pad_token_id: int, device, autocast, budget: EvalBudget | None = None,
                    blocks: int = 1) -> list[Evaluation]:
    """`evaluate` of `blocks` models at once: each batch goes through `model` as `blocks` copies
    of its rows, one after another, and block n's rows give the n-th `Evaluation`. A pack whose
    selection holds n slots (`Pack.only`) is n adapted models in one forward pass; the budget
    holds all the blocks' rows, so a batch's logits stay as large as one model's."""
    model.eval()
    # per block and row: summed loss, correct tokens; per row: answer tokens
    row_losses, row_correct, row_counts = [], [], []
    order = sorted(range(len(rows)), key=lambda index: len(rows[index][0]))  # similar lengths together: less padding
    rows = [rows[index] for index in order]
    for start, end in batch_bounds(rows, budget, blocks):
        chunk = rows[start:end]
        batch = collate(chunk, pad_token_id, torch.device("cpu"))
        # which positions score which token is known on the host, before the batch goes to the
        # device: selecting them there waits for nothing, so the host prepares the next batch
        # while the device runs this one (a mask's selection waited for every layer, each batch)
        labels = batch["labels"]
        scored = next_is_answer(labels)
        size = scored.numel()
        kept = torch.cat([scored.flatten().nonzero()[:, 0] + block * size for block in range(blocks)])
        keep = labels[:, 1:] != IGNORE
        ids = batch["input_ids"].to(device, non_blocking=True)
        kept, answer_labels, row_of_token = (t.to(device, non_blocking=True)
                                             for t in (kept, labels[:, 1:][keep], keep.nonzero()[:, 0]))
        with autocast:
            logits = answer_logits(model, ids.repeat(blocks, 1), scored.repeat(blocks, 1), kept)
        token_losses, token_correct = (t.view(blocks, -1) for t in answer_losses(logits, answer_labels.repeat(blocks)))
        row_losses.append(torch.zeros(blocks, len(chunk), device=device, dtype=torch.float64)
                          .index_add_(1, row_of_token, token_losses))
        row_correct.append(torch.zeros(blocks, len(chunk), device=device, dtype=torch.long)
                           .index_add_(1, row_of_token, token_correct))
        row_counts.append(keep.sum(1))
    model.train()
    rows_order = torch.argsort(torch.tensor(order))  # from the batches' order back to the rows' own
    counts = torch.cat(row_counts)[rows_order]
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

"""Validation that decides how long a run trains: a held-out split of distinct examples, scored
the way a user judges the adapter, and an early stop that keeps the best adapter.

- Short answers (labels, JSON fields, normalised values): greedy exact match of the final answer
  on the validation rows, ties broken by the answer loss. A lower loss does not always mean more
  right answers, and exact match is what the user measures on such tasks.
- Long answers (several sentences): the answer loss alone; a single sentence worded otherwise
  would make exact match read zero however good the adapter is.

The stop rule is the same for every task and method: evaluate a few times per epoch, keep a copy
of the trainable tensors whenever the score improves, stop once it has not improved for
`patience` evaluations (or the time budget is spent), and put the best copy back before saving.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from graftlm.data.dataset import IGNORE_INDEX, Example
from graftlm.train.forward import autocast
from graftlm.train.phrasing_split import held_out_phrasings

# Final answers up to this many tokens and one sentence (medians over the validation rows) are
# scored by exact match; longer ones (paragraphs) by answer loss.
SHORT_ANSWER_TOKENS = 96
# the end of a sentence: a stop, then white space or the end of the answer
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
# Rows generated together during a greedy validation pass.
GENERATION_BATCH = 16


def answer_span(example: Example) -> tuple[int, int]:
    """(start, end) of the final labelled span of `example`: its last answer, end excluded.

    Labels are shifted by one against the inputs only in the loss; here both index the same
    tokens, so `input_ids[start:end]` is the answer (its end-of-turn token included).
    """
    labels = example.labels
    end = max((i for i, y in enumerate(labels) if y != IGNORE_INDEX), default=-1) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def prompt_text(example: Example, tokenizer) -> str:
    """The text before the final answer of `example` (its template's special tokens left out)."""
    start, _ = answer_span(example)
    return tokenizer.decode(example.input_ids[:start], skip_special_tokens=True)


def split_validation(
    examples: list[Example], *, seed: int, fraction: float = 0.1, min_rows: int = 16,
    max_rows: int = 100, prompt_texts: list[str] | None = None,
) -> tuple[list[Example], list[Example]]:  # fmt: skip
    """Hold out whole groups of examples that share a prompt, so that no validation prompt is
    also a training prompt (a repeated row would score as generalisation what is memory).

    Args:
        prompt_texts: the prompt of each example as text, for a split of phrasings that
            training never sees (`graftlm.train.phrasing_split`): first every group with one of
            a few rare word pairs, then random groups up to the size wanted. None: random
            groups only.

    Returns:
        ``(train, validation)`` in the original order; validation is empty when the data has
        fewer than ``2 * min_rows`` distinct prompts (too few to hold any back usefully).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    key_of: list[tuple[int, ...]] = []
    for i, example in enumerate(examples):
        start, _ = answer_span(example)
        key_of.append(tuple(example.input_ids[:start]))
        groups.setdefault(key_of[-1], []).append(i)
    keys = list(groups)
    if len(keys) < 2 * min_rows:
        return list(examples), []
    wanted = min(max_rows, max(min_rows, round(len(keys) * fraction)))
    random.Random(f"graftlm-validation:{seed}").shuffle(keys)
    if prompt_texts is not None:
        rows = held_out_phrasings(prompt_texts, wanted, seed)
        first = list(dict.fromkeys(key_of[i] for i in rows))  # their groups, in order
        taken = set(first)
        keys = first + [k for k in keys if k not in taken]
        wanted = max(wanted, len(first))  # every row of a held-out pair stays out of training
    held = {i for key in keys[:wanted] for i in groups[key]}
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def scores_by_exact_match(validation: list[Example], tokenizer) -> bool:
    """True when the validation answers are short, closed-form ones (a label, a value, a JSON
    object, one sentence) that exact match judges fairly; False for paragraphs."""
    if not validation:
        return False
    answers = [
        tokenizer.decode(e.input_ids[start:end], skip_special_tokens=True)
        for e, (start, end) in zip(validation, map(answer_span, validation))
    ]
    lengths = [end - start for start, end in map(answer_span, validation)]
    sentences = [len(_SENTENCE_END.findall(answer.strip())) for answer in answers]
    return statistics.median(lengths) <= SHORT_ANSWER_TOKENS and statistics.median(sentences) <= 1


def greedy_exact_match(
    model: nn.Module, tokenizer, validation: list[Example], pad_id: int,
    compute_dtype: torch.dtype,
) -> float:  # fmt: skip
    """Share of `validation` whose greedy completion of the prompt equals the reference answer
    (decoded text, surrounding whitespace ignored)."""
    right = greedy_rows_right(model, tokenizer, validation, pad_id, compute_dtype)
    return sum(right) / max(len(validation), 1)


@torch.no_grad()
def greedy_rows_right(
    model: nn.Module, tokenizer, validation: list[Example], pad_id: int,
    compute_dtype: torch.dtype,
) -> list[bool]:  # fmt: skip
    """For each row of `validation`, whether greedy generation gives its reference answer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_ids = answer_stop_ids(model, tokenizer, validation)
    right = [False] * len(validation)
    order = sorted(range(len(validation)), key=lambda i: answer_span(validation[i])[0])
    for first in range(0, len(order), GENERATION_BATCH):
        chosen = order[first : first + GENERATION_BATCH]
        batch = [validation[i] for i in chosen]
        spans = [answer_span(e) for e in batch]
        prompts = [e.input_ids[:start] for e, (start, _) in zip(batch, spans)]
        references = [e.input_ids[start:end] for e, (start, end) in zip(batch, spans)]
        width = max(map(len, prompts))
        # left padding: every prompt ends where generation starts
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with autocast(compute_dtype, device):
            generated = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False,
                max_new_tokens=max(map(len, references)) + 2, pad_token_id=pad_id,
                eos_token_id=stop_ids,
            )  # fmt: skip
        for i, row, reference in zip(chosen, generated[:, width:].tolist(), references):
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            right[i] = answer == tokenizer.decode(reference, skip_special_tokens=True).strip()
    model.train(was_training)
    return right


class GreedyAnswers:
    """Greedy exact match read off the teacher-forced validation pass, with no generation.

    Greedy decoding reproduces a reference answer exactly when, at every answer position, the
    reference token is the argmax given the prompt and the reference tokens before it, and a
    stop token is the argmax at the answer's end: both decode the same prefixes, one token at a
    time or all at once. So the evaluation's own forward (`forward.evaluate`, as its
    `per_batch`) scores it by projecting the answer positions' hidden states to the vocabulary.
    A generation pass cost ~3x the loss pass (`bench/validation_speed.py`; a default run on
    the zoo's ticket_triage took 0.85x the time, with the same exact match at every
    evaluation: bench/results/zoo.md).

    It compares tokens, where `greedy_exact_match` compares decoded text: an answer spelt in
    other tokens, or differing only in surrounding white space, counts as a miss here (a
    model trained on the references emits their tokenization). In float32 the two agree row
    for row; in bf16 a near tie (logits within a few bf16 steps) can fall either way, as it
    can between a batched and a one-row generation (4 rows of 320 after 16 steps on the zoo,
    none along a whole run; bench/results/validation_speed.jsonl). Where the reference ends
    in a stop token, any stop token (`stop_ids`) ends it right, as it ends a greedy
    generation. A reference with no stop token at its end (cut short by `--seq-len`) is a
    miss: greedy decoding would have to stop where training never did, and the pass holds no
    position to check that on.
    """

    def __init__(self, model: nn.Module, validation: list[Example], stop_ids: list[int]):
        self.model, self.validation = model, validation
        self.stop_ids = sorted(set(stop_ids))
        self.right: dict[int, bool] = {}  # by index into `validation`, this process's rows

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, indices: list[int]) -> None:
        """Count the rows `validation[indices]` whose greedy answer is the reference, from the
        pass's final hidden states `hidden` `(rows, seq, d)`."""
        rows, positions, targets = [], [], []
        wrong = torch.zeros(len(indices), dtype=torch.long, device=hidden.device)
        for row, i in enumerate(indices):
            ids = self.validation[i].input_ids
            start, end = answer_span(self.validation[i])
            wrong[row] = end == 0 or ids[end - 1] not in self.stop_ids  # no stop to check
            start = max(start, 1)  # an answer at position 0 has no prediction for its first token
            rows += [row] * (end - start)
            positions += range(start - 1, end - 1)  # the hidden state before each answer token
            targets += ids[start:end]
        if targets:
            rows_t = torch.tensor(rows, device=hidden.device)
            states = hidden[rows_t, torch.tensor(positions, device=hidden.device)]
            head = self.model.get_output_embeddings()
            predicted = torch.cat([
                head(states[first : first + _ARGMAX_ROWS]).argmax(dim=-1)
                for first in range(0, states.shape[0], _ARGMAX_ROWS)
            ])  # fmt: skip
            expected = torch.tensor(targets, device=hidden.device)
            stops = torch.tensor(self.stop_ids, device=hidden.device)
            ends_right = torch.isin(expected, stops) & torch.isin(predicted, stops)
            wrong.index_add_(0, rows_t, ((predicted != expected) & ~ends_right).long())
        self.right.update(zip(indices, (wrong == 0).tolist()))

    def exact_match(self, runtime) -> float:
        """The share of validation rows right, over every process's passes."""
        hits, rows = runtime.all_reduce_sum(
            [float(sum(self.right.values())), float(len(self.right))]
        )
        return hits / max(rows, 1.0)


# answer positions projected to the vocabulary at once (bf16: 256 x 49,152 logits are 25 MB)
_ARGMAX_ROWS = 256


def answer_stop_ids(model: nn.Module, tokenizer, validation: list[Example]) -> list[int]:
    """Where a greedy answer ends: the model's and tokenizer's end of sequence, and the special
    token that closes the reference answers (a chat template's end of turn)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    special = set(tokenizer.all_special_ids)
    for example in validation:
        start, end = answer_span(example)
        if end > start and example.input_ids[end - 1] in special:
            ids.add(example.input_ids[end - 1])
    return sorted(i for i in ids if isinstance(i, int))


# The relative fall in answer loss that counts as progress at an unchanged exact match.
LOSS_PROGRESS = 0.03


@dataclass
class Score:
    """One validation result: exact match (None when scored by loss) and answer loss."""

    exact_match: float | None
    loss: float

    def beats(self, other: Score | None) -> bool:
        """Better than `other`: more exact matches, or as many at a lower answer loss."""
        if other is None:
            return True
        if self.exact_match is not None and other.exact_match is not None:
            if self.exact_match != other.exact_match:
                return self.exact_match > other.exact_match
        return self.loss < other.loss

    def progresses_from(self, other: Score | None) -> bool:
        """Worth training on for: a better exact match, or the same exact match at an answer
        loss at least `LOSS_PROGRESS` lower; when scored by loss, any lower loss.

        The validation split holds training's phrasings, so its exact match saturates (often
        at 1.00) long before answers to unseen phrasings stop improving; the answer loss keeps
        tracking that. Stopping on a perfect or flat exact match cost 20 points of held-out
        accuracy on the zoo's quantities task (0.517 against 0.717; bench/results/zoo.md);
        the margin keeps a loss that merely drifts down from extending a run for nothing."""
        if other is None or self.exact_match is None or other.exact_match is None:
            return self.beats(other)
        if self.exact_match != other.exact_match:
            return self.exact_match > other.exact_match
        return self.loss < (1 - LOSS_PROGRESS) * other.loss

    def describe(self) -> str:
        if self.exact_match is None:
            return f"validation answer loss {self.loss:.4f}"
        return f"validation exact match {self.exact_match:.2f} (answer loss {self.loss:.4f})"


@dataclass
class EarlyStop:
    """Remembers the best score and a copy of the trainable tensors taken at it."""

    params: dict[str, torch.Tensor]
    patience: int
    exact_match: bool = False  # scored by exact match (short answers), else by answer loss
    best: Score | None = None
    best_step: int = 0
    evals_since_best: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    eval_every: int = 1  # steps between evaluations
    warmup: int = 0  # steps of linear warmup
    cooldown_start: int = -1  # the step the learning rate starts its decay to zero; -1: not yet
    cooldown_steps: int = 0
    reason: str = ""  # why the cool-down began

    def lr_factor(self, step: int) -> float:
        """Warmup, then the full learning rate until the cool-down, then linear to zero.

        A cosine over the longest length would still be near its peak when validation stops a
        run early; annealing is worth points (bank_intent: 0.86 stopped at its peak against 0.94
        for one annealed epoch), so the decay starts when the run decides to stop.
        """
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.cooldown_start < 0 or step < self.cooldown_start:
            return 1.0
        return max(0.0, 1.0 - (step - self.cooldown_start + 1) / (self.cooldown_steps + 1))

    def begin_cooldown(self, step: int, steps: int, reason: str) -> None:
        """Decay the learning rate to zero over the next `steps` steps, then stop."""
        if self.cooldown_start < 0:
            self.cooldown_start, self.cooldown_steps, self.reason = step, max(1, steps), reason

    def cooling(self) -> bool:
        return self.cooldown_start >= 0

    def cooldown_done(self, step: int) -> bool:
        return self.cooling() and step >= self.cooldown_start + self.cooldown_steps

    def update(self, score: Score, step: int) -> bool:
        """Record `score` at `step`; returns True when the run should stop: `patience`
        evaluations without progress (a perfect exact match is not the end: see
        `Score.progresses_from`)."""
        progress = score.progresses_from(self.best)
        if score.beats(self.best):
            self.best, self.best_step = score, step
            self._keep_best()
        self.evals_since_best = 0 if progress else self.evals_since_best + 1
        return self.evals_since_best >= self.patience

    @torch.no_grad()
    def _keep_best(self) -> None:
        # into the tensors of the last best when there are some: a clone would hold the old and
        # the new copy at once (for a full fine-tune, two copies of every weight)
        if self.best_state.keys() == self.params.keys():
            for name, tensor in self.params.items():
                self.best_state[name].copy_(tensor)
        else:
            self.best_state = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def restore_best(self) -> None:
        """Put the best trainable tensors back into the model."""
        for name, tensor in self.best_state.items():
            self.params[name].copy_(tensor)

    def summary(self, stopped: str | None) -> dict:
        """What graftlm.json records of the validation: metric, best step and score, why it
        stopped."""
        return {
            "metric": "exact_match" if self.exact_match else "answer_loss",
            "best_step": self.best_step,
            "best_exact_match": None if self.best is None else self.best.exact_match,
            "best_loss": None if self.best is None else round(self.best.loss, 6),
            "stopped": stopped or "longest length reached",
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The best tensors and the counters, for a resumable checkpoint."""
        state = {f"best/{name}": t for name, t in self.best_state.items()}
        best = self.best or Score(None, math.inf)
        state["counters"] = torch.tensor(
            [self.best_step, self.evals_since_best, best.loss,
             -1.0 if best.exact_match is None else best.exact_match, float(self.best is None),
             self.cooldown_start, self.cooldown_steps],
            dtype=torch.float64,
        )  # fmt: skip
        state["reason"] = torch.tensor(list(self.reason.encode("utf-8")), dtype=torch.uint8)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from `state_dict()`'s output."""
        step, waited, loss, exact, empty, start, length = state["counters"].tolist()
        self.best_step, self.evals_since_best = int(step), int(waited)
        self.cooldown_start, self.cooldown_steps = int(start), int(length)
        self.reason = bytes(state["reason"].tolist()).decode("utf-8")
        self.best = None if empty else Score(None if exact < 0 else exact, loss)
        self.best_state = {
            key.removeprefix("best/"): t for key, t in state.items() if key.startswith("best/")
        }

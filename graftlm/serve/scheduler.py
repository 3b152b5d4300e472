"""Continuous batching: one thread owns the model and steps every running request together.

A request joins the running batch at the next step and leaves it as soon as it finishes, so a
short answer never waits for a long one and a new request never waits for the batch to drain::

    loop:
        admit waiting requests (pin their adapters; up to max_batch rows)
        prefill the admitted prompts together -> their KV cache, merged into the batch cache
        one decode forward for every running row (each row with its own adapter)
        sample per row; finished rows leave the batch (cache rows dropped)

The batch cache is a `DynamicCache` whose rows are left-padded to a common length: a row's real
tokens sit at the right, its padding is masked out by the attention mask, and its positions are
given explicitly, so each row computes what it would alone (up to float rounding from the batch
size). Merging left-pads the shorter side; rows that leave are dropped with `index_select`, and
padding columns no row needs any more are trimmed off the left.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from graftlm.errors import GraftError
from graftlm.infer.generate import SamplingConfig, eos_ids
from graftlm.methods.lora.layer import LoraLayerBase, TrainedCopies
from graftlm.serve.adapter_pool import AdapterBusy, AdapterEntry, AdapterRegistry

logger = logging.getLogger("graftlm")


class EngineStopped(GraftError):
    """The engine is stopping: the request was not (or not completely) served."""


@dataclass
class Event:
    """What a request hears from the engine.

    `kind` is "text" (a new piece of the answer in `text`), "done" (`finish_reason` is "stop"
    or "length"; token counts are set) or "error" (`error` says why; the request is over).
    """

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


@dataclass(eq=False)
class Request:
    """One generation request.

    Args:
        prompt_ids: the prompt's token ids (already templated, no special tokens added).
        adapter: a registered adapter name, or None for the base model.
        sampling: decoding settings; `seed` makes a sampled answer reproducible whatever else
            shares the batch (each request draws from its own generator).
        on_event: called from the engine thread with each `Event`; must not block.
        stream: emit "text" events as tokens arrive (else only "done" carries the text).
    """

    prompt_ids: list[int]
    adapter: str | None
    sampling: SamplingConfig
    on_event: Callable[[Event], None]
    stream: bool = False
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    _entry: AdapterEntry | None = None
    _sent: int = 0  # characters of text already emitted
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating (the client went away); the row leaves at the next step."""
        self.cancelled = True


class Engine:
    """Runs requests against one model with continuous batching and per-row adapters.

    Args:
        model: the base model (eval mode); its adapters are managed by `registry`.
        tokenizer: its tokenizer.
        registry: the adapter registry over `model`.
        max_batch: the most rows decoded together.
        prefill_tokens: the most padded prompt tokens prefilled in one step (at least one
            prompt is always admitted), so a burst of long prompts does not stall decoding.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        registry: AdapterRegistry,
        *,
        max_batch: int = 16,
        prefill_tokens: int = 4096,
    ) -> None:
        if max_batch <= 0:
            raise GraftError(f"max_batch should be a positive integer, got {max_batch!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.registry = registry
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        # fast tokenizers can refuse concurrent use ("Already borrowed"); the server encodes
        # prompts under the same lock the engine decodes under
        self.tokenizer_lock = threading.Lock()
        self.eos = set(eos_ids(model, tokenizer))
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        )
        self.device = next(model.parameters()).device
        self._check_cache_kind()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 1 = real token
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._row_modules: tuple[int, list[nn.Module]] = (-1, [])
        self._groups: tuple[tuple | None, list] = (None, [])

    def _check_cache_kind(self) -> None:
        cache = DynamicCache(config=self.model.config)
        kinds = {type(layer) for layer in cache.layers} or {DynamicLayer}
        if kinds != {DynamicLayer}:
            raise GraftError(
                f"serving needs a model with a plain KV cache; {type(self.model).__name__} uses "
                f"{sorted(k.__name__ for k in kinds)} (sliding-window or hybrid attention)"
            )

    # -- public -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._run, name="graftlm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; requests still running or waiting get an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> Request:
        """Queue a request; events arrive through `request.on_event`.

        Raises:
            EngineStopped: the engine is stopping.
        """
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def stats(self) -> dict:
        """Rows running and requests waiting, for /health."""
        with self._cond:
            return {"running": len(self._active), "waiting": len(self._waiting)}

    @property
    def alive(self) -> bool:
        """The scheduler thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
            admitted: list[Request] = []
            try:
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                if self._active:
                    self._decode()
                else:
                    self._idle_wait()
            except Exception as exc:  # one bad step fails its requests, never the server
                logger.exception("engine step failed")
                for request in {id(r): r for r in self._active + admitted}.values():
                    self._finish(request, Event("error", error=exc))
                self._active, self._cache, self._mask = [], None, None
        failed = list(self._active) + list(self._waiting)
        self._active, self._cache, self._mask = [], None, None
        self._waiting.clear()
        for request in failed:
            self._finish(
                request, Event("error", error=EngineStopped("the server is shutting down"))
            )

    def _idle_wait(self) -> None:
        # everything waiting is blocked on a full adapter budget: wait for a change, not spin
        with self._cond:
            if self._waiting and not self._active and not self._stopping:
                self._cond.wait(0.05)

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        with self._cond:
            waiting = list(self._waiting)
        longest = 0
        for request in waiting:
            if len(self._active) + len(admitted) >= self.max_batch:
                break
            if request.cancelled:
                self._remove_waiting(request)
                continue
            longest_if = max(longest, len(request.prompt_ids))
            if admitted and longest_if * (len(admitted) + 1) > self.prefill_tokens:
                break
            if request.adapter is not None:
                try:
                    (request._entry,) = self.registry.acquire([request.adapter])
                except AdapterBusy:
                    continue  # its adapter cannot be loaded until running requests finish
                except GraftError as exc:
                    self._remove_waiting(request)
                    self._emit(request, Event("error", error=exc))
                    continue
            self._remove_waiting(request)
            admitted.append(request)
            longest = longest_if
        return admitted

    def _remove_waiting(self, request: Request) -> None:
        with self._cond:
            try:
                self._waiting.remove(request)
            except ValueError:
                pass

    # -- forward passes -----------------------------------------------------------------------

    def _forward(self, rows: list[Request], **inputs):
        """One forward with each row's adapter, holding the registry lock."""
        with self.registry.lock, torch.inference_mode():
            modules = self._adapted_modules()
            groups = self._groups_of([r._entry.internal if r._entry else None for r in rows])
            for module in modules:
                module.row_groups = groups
            try:
                return self.model(**inputs, use_cache=True, logits_to_keep=1)
            finally:
                for module in modules:
                    module.row_groups = None

    def _groups_of(self, names: list[str | None]) -> list[tuple[str | None, torch.Tensor]]:
        # one list object for as long as the batch keeps its rows and adapters: a layer's
        # adapter bank (lora_rows.py) then sees the same groups at every decode step and skips
        # re-deriving its row mapping (~1,700 small tensor reads per step with 8 adapters)
        key = (self.registry.version, tuple(names))
        cached_key, cached = self._groups
        if key != cached_key:
            cached = [(n, idx.to(self.device)) for n, idx in _row_groups(names)]
            self._groups = (key, cached)
        return cached

    def _adapted_modules(self) -> list[nn.Module]:
        # walking model.modules() visits every adapter's submodules (tens of thousands with many
        # adapters loaded); do it once per registry change, not once per step
        version, modules = self._row_modules
        if version != self.registry.version:
            modules = [
                m
                for m in self.model.modules()
                if isinstance(m, (LoraLayerBase, TrainedCopies))
                or getattr(m, "graftlm_row_aware", False)  # other methods' per-row modules
            ]
            self._row_modules = (self.registry.version, modules)
        return modules

    def _prefill(self, rows: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, request in enumerate(rows):
            ids[i, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[i, width - len(request.prompt_ids) :] = 1
        # as transformers' generate does for left padding: positions count real tokens only
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        out = self._forward(
            rows,
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=cache,
        )
        self._merge(cache, mask.to(self.device), rows)
        self._sample_and_step(rows, out.logits[:, -1, :])

    def _decode(self) -> None:
        rows = list(self._active)
        new = [r for r in rows if not r.generated]
        assert not new, "every running row has sampled its first token at prefill"
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long)
        positions = torch.tensor(
            [[len(r.prompt_ids) + len(r.generated) - 1] for r in rows], dtype=torch.long
        )
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self._forward(
            rows,
            input_ids=ids.to(self.device),
            attention_mask=self._mask,
            position_ids=positions.to(self.device),
            cache=self._cache,
        )
        self._sample_and_step(rows, out.logits[:, -1, :])

    # -- the batch cache ----------------------------------------------------------------------

    def _merge(self, cache, mask: torch.Tensor, rows: list[Request]) -> None:
        if self._cache is None or not self._active:
            self._cache, self._mask, self._active = cache, mask, list(rows)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
            old.values = torch.cat(
                [_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)]
            )
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._active = self._active + list(rows)

    def _drop_rows(self, leaving: set[int]) -> None:
        keep = [i for i, r in enumerate(self._active) if id(r) not in leaving]
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        # padding columns on the left that no remaining row needs
        first = int(mask.any(dim=0).long().argmax())
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    # -- sampling and finishing ---------------------------------------------------------------

    def _sample_and_step(self, rows: list[Request], logits: torch.Tensor) -> None:
        logits = logits.float()
        tokens = torch.argmax(logits, dim=-1).tolist()  # greedy, as transformers' generate
        for i, request in enumerate(rows):
            if request.sampling.temperature > 0:
                tokens[i] = _sample(logits[i], request)
        leaving: set[int] = set()
        for request, token in zip(rows, tokens):
            if request.cancelled:
                leaving.add(id(request))
                self._release(request)
                continue
            request.generated.append(token)
            if self._advance(request, token):
                leaving.add(id(request))
        if leaving:
            self._drop_rows(leaving)

    def _advance(self, request: Request, token: int) -> bool:
        """Emit new text; finish the request if it hit eos, a stop string or max tokens."""
        sampling = request.sampling
        finish = None
        if token in self.eos:
            finish = "stop"
        elif len(request.generated) >= sampling.max_new_tokens:
            finish = "length"
        if not request.stream and not sampling.stop and finish is None:
            return False  # nothing to emit before the end: skip decoding the text
        text = self._text(request)
        cut = _stop_at(text, sampling.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        if finish is not None:
            self._finish(request, Event("done", text=text, finish_reason=finish))
            return True
        if request.stream:
            safe = _safe_length(text, sampling.stop)
            if safe > request._sent:
                self._emit(request, Event("text", text=text[request._sent : safe]))
                request._sent = safe
        return False

    def _text(self, request: Request) -> str:
        ids = [t for t in request.generated if t not in self.eos]
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, request: Request, event: Event) -> None:
        """Send the last event (the rest of the text for a stream) and unpin the adapter."""
        self._release(request)
        if event.kind == "done":
            event.prompt_tokens = len(request.prompt_ids)
            event.completion_tokens = len(request.generated)
            if request.stream:
                event.text = event.text[request._sent :]
        self._emit(request, event)

    def _release(self, request: Request) -> None:
        if request._entry is not None:
            entry, request._entry = request._entry, None
            self.registry.release([entry])
            with self._cond:
                self._cond.notify_all()  # a request waiting for budget may fit now

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # a broken listener (client gone) must not stop the engine
            logger.debug("dropping an event for a request whose listener failed", exc_info=True)


def _row_groups(names: list[str | None]) -> list[tuple[str | None, torch.Tensor]]:
    # as surgery.row_adapters: rows sharing an adapter in one group, in order of first row
    rows: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        rows.setdefault(name, []).append(row)
    return [(name, torch.tensor(idx, dtype=torch.long)) for name, idx in rows.items()]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _sample(logits: torch.Tensor, request: Request) -> int:
    """Temperature and nucleus (top-p) sampling from the request's own generator."""
    sampling = request.sampling
    if request._generator is None:
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "big")
        request._generator = torch.Generator(device=logits.device).manual_seed(seed % 2**63)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before >= sampling.top_p] = 0.0  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=request._generator))


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be streamed: hold back a tail that may begin a stop string, and
    a trailing replacement character (a multi-byte character still being generated)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.endswith(stop[:k], 0, end):
                hold = k
                break
    return end - hold

"""Many adapters on one base model: register hundreds, keep a budget's worth loaded.

An adapter is *registered* once its folder's config has been read and checked against the base
(method, fingerprint, shapes from the safetensors header; no weights read), and *loaded* while
its weights sit in the model as a named adapter (of any method whose adapters serve per row). Loading happens on demand when a request
names the adapter; when the loaded weights would exceed the memory budget, the least recently
used adapters that no running request holds are unloaded first. A request *pins* its adapter
(`acquire` / `release`) so it cannot be evicted mid-generation.

Every change to the model (inject, delete) and every forward pass that reads adapters must hold
`registry.lock`; the serving engine holds it for each batched step, so a load arriving from an
HTTP thread waits for the step to end instead of rewiring layers under it.

Inside the model adapters get internal names (`r0`, `r1`, ...): public names may use any
characters (`org/adapter.v2`, as vLLM allows) and a name reloaded from another folder never
meets stale per-layer state of its predecessor.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from graftlm.adapters.base_model import base_fingerprint, check_base
from graftlm.adapters.folder import parameter_count, weight_shapes
from graftlm.adapters.io import load_any
from graftlm.adapters.switch import adapter_names, delete_adapter
from graftlm.errors import GraftError
from graftlm.methods import folder_method, method_module


class AdapterBusy(GraftError):
    """Loading would exceed the budget and every loaded adapter is pinned: retry later."""


class UnknownAdapter(GraftError):
    """No adapter of that name is registered."""


@dataclass
class AdapterEntry:
    """What the registry knows about one adapter.

    Attributes:
        name: the public name requests use.
        path: the adapter folder.
        config: its config, as its method reads the folder (a LoraConfig for LoRA).
        method: the method that saved it ("lora", "ia3", "prefix", ...).
        nbytes: bytes its weights take once loaded (fp32).
        internal: the adapter's name inside the model while loaded, else None.
        pins: running requests that hold it.
        last_used: `time.monotonic()` of the last acquire.
        doomed: unregistered while pinned: unloaded when the last pin goes.
    """

    name: str
    path: Path
    config: Any
    nbytes: int
    method: str
    internal: str | None = None
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    doomed: bool = False

    @property
    def loaded(self) -> bool:
        return self.internal is not None


class AdapterRegistry:
    """Adapters known by name, loaded into one base model within a memory budget (LRU).

    Args:
        model: the base model (plain, or with NF4 linears for QLoRA adapters). The registry
            owns its adapters from now on: do not inject or delete adapters behind its back.
        budget_bytes: the most bytes of adapter weights loaded at once (None: no limit).
        force: load adapters despite a base-fingerprint mismatch (same architecture).

    Thread-safe: every change takes `lock` (re-entrant), which also guards the model. The
    registry serves inference: loading an adapter puts the model in eval mode.
    """

    def __init__(
        self, model: nn.Module, *, budget_bytes: int | None = None, force: bool = False
    ) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise GraftError(f"budget_bytes should be positive or None, got {budget_bytes!r}")
        self.model = model
        self.budget_bytes = budget_bytes
        self.force = force
        self.lock = threading.RLock()
        # bumped on every load/unload, so users can cache per-model facts (e.g. LoRA layer lists)
        self.version = 0
        self._entries: OrderedDict[str, AdapterEntry] = OrderedDict()
        self._doomed: list[AdapterEntry] = []  # unregistered, still pinned by requests
        self._counter = 0
        base_fingerprint(model)  # identify the base before any adapter touches it

    # -- registration -----------------------------------------------------------------------

    def register(
        self, name: str, path: str | Path, *, load: bool = False, replace: bool = False
    ) -> AdapterEntry:
        """Make adapter `name` known (config read and checked); optionally load it now.

        Args:
            name: public name (any non-empty string without control characters).
            path: an adapter folder (any method that serves per row).
            load: load the weights now (also validates every key and shape).
            replace: re-register an existing name (its old weights are unloaded).

        Returns:
            The registry entry.

        Raises:
            GraftError: bad name, name taken, unreadable folder, a base-fingerprint or shape
                mismatch, or an adapter this server cannot serve per row (its method's
                `check_servable`).
        """
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise GraftError(f"adapter name should be a non-empty printable string, got {name!r}")
        folder = Path(path)
        method, config, nbytes = self._inspect(folder)
        with self.lock:
            if name in self._entries:
                if not replace:
                    raise GraftError(
                        f"an adapter named {name!r} is already registered "
                        f"(from {self._entries[name].path}); unregister it first"
                    )
                self.unregister(name)
            entry = AdapterEntry(
                name=name, path=folder, config=config, nbytes=nbytes, method=method
            )
            self._entries[name] = entry
            if load:
                try:
                    self.release(self.acquire([name]))
                except AdapterBusy:
                    pass  # registered; it loads when running requests free the budget
                except GraftError:
                    del self._entries[name]  # a folder that does not load is not registered
                    raise
            return entry

    def _inspect(self, folder: Path) -> tuple[str, Any, int]:
        method = folder_method(folder)
        module = method_module(method)
        if not module.ROW_ADAPTERS:
            raise GraftError(f"{folder}: {method} adapters cannot be served next to others yet")
        config = module.read_config(folder)
        if hasattr(module, "check_servable"):
            module.check_servable(self.model, folder)
        check_base(self.model, folder, self.force)
        # adapters keep their weights in fp32
        return method, config, 4 * parameter_count(weight_shapes(folder))

    def unregister(self, name: str) -> None:
        """Forget adapter `name`; its weights are unloaded now, or when its last request ends.

        Raises:
            UnknownAdapter: no adapter of that name.
        """
        with self.lock:
            entry = self._get(name)
            del self._entries[name]
            entry.doomed = True
            if entry.pins:
                self._doomed.append(entry)
            else:
                self._unload(entry)

    # -- queries ------------------------------------------------------------------------------

    def _get(self, name: str) -> AdapterEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownAdapter(f"no adapter named {name!r} is registered")
        return entry

    # Queries read without `lock`: the serving engine holds it for whole forward passes, and
    # /health or /v1/models should not wait for a step. Copying a dict (`list(d)`, `d.get`) is
    # atomic in CPython, so a query sees the registry before or after a change, never halfway.

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def entry(self, name: str) -> AdapterEntry:
        """The entry of a registered adapter.

        Raises:
            UnknownAdapter: no adapter of that name.
        """
        return self._get(name)

    def loaded(self) -> list[str]:
        """Names whose weights are in the model, least recently used first."""
        entries = [e for e in list(self._entries.values()) if e.loaded]
        return [e.name for e in sorted(entries, key=lambda e: e.last_used)]

    def loaded_bytes(self) -> int:
        """Bytes of adapter weights now in the model (unregistered ones still in use included)."""
        entries = [*list(self._entries.values()), *list(self._doomed)]
        return sum(e.nbytes for e in entries if e.loaded)

    # -- loading ------------------------------------------------------------------------------

    def acquire(self, names: Iterable[str]) -> list[AdapterEntry]:
        """Load (if needed) and pin adapters for a request.

        Least recently used unpinned adapters are unloaded to stay within the budget. Pass the
        returned entries to `release` when the request ends; `entry.internal` is the adapter's
        name inside the model, for `row_adapters`.

        Raises:
            GraftError: an unknown name, an adapter larger than the whole budget, or a load
                failure (the folder changed since it was registered).
            AdapterBusy: the budget is full of pinned adapters; nothing was changed.
        """
        names = list(dict.fromkeys(names))
        with self.lock:
            entries = [self._get(n) for n in names]
            missing = [e for e in entries if not e.loaded]
            need = sum(e.nbytes for e in missing)
            if self.budget_bytes is not None and missing:
                if need > self.budget_bytes:
                    raise GraftError(
                        f"adapter(s) {[e.name for e in missing]} need {need:,} bytes, more than "
                        f"the whole adapter memory budget ({self.budget_bytes:,} bytes)"
                    )
                self._make_room(need, keep=set(names))
            for entry in missing:
                self._load(entry)
            now = time.monotonic()
            for entry in entries:
                entry.pins += 1
                entry.last_used = now
            return entries

    def release(self, entries: Iterable[AdapterEntry]) -> None:
        """Unpin the entries `acquire` returned (an unregistered one is unloaded at its last)."""
        with self.lock:
            for entry in entries:
                if entry.pins <= 0:
                    raise GraftError(f"adapter {entry.name!r} released more often than acquired")
                entry.pins -= 1
                if entry.doomed and entry.pins == 0:
                    self._doomed = [e for e in self._doomed if e is not entry]
                    self._unload(entry)

    @contextmanager
    def using(self, names: Iterable[str]) -> Iterator[list[str]]:
        """`acquire` for the length of a block; yields the internal names."""
        entries = self.acquire(names)
        try:
            yield [e.internal for e in entries]
        finally:
            self.release(entries)

    def _make_room(self, need: int, keep: set[str]) -> None:
        used = self.loaded_bytes()
        if used + need <= self.budget_bytes:
            return
        victims = sorted(
            (e for e in self._entries.values() if e.loaded and not e.pins and e.name not in keep),
            key=lambda e: e.last_used,
        )
        freeable = sum(e.nbytes for e in victims)
        if used - freeable + need > self.budget_bytes:
            raise AdapterBusy(
                f"adapter memory budget ({self.budget_bytes:,} bytes) is held by running requests"
            )
        for victim in victims:
            if used + need <= self.budget_bytes:
                break
            self._unload(victim)
            used -= victim.nbytes

    def _load(self, entry: AdapterEntry) -> None:
        internal = f"r{self._counter}"
        self._counter += 1
        try:
            load_any(self.model, entry.path, name=internal, force=self.force)
        except GraftError:
            self._delete_if_present(internal)  # a half-injected adapter must not linger
            raise
        except Exception as exc:  # OSError, safetensors errors: the folder changed under us
            self._delete_if_present(internal)
            raise GraftError(f"{entry.path}: cannot load adapter {entry.name!r} ({exc})") from None
        entry.internal = internal
        self.version += 1
        # new LoRA layers start in training mode: LoRA dropout would make answers random
        self.model.eval()

    def _delete_if_present(self, internal: str) -> None:
        if internal in adapter_names(self.model):
            delete_adapter(self.model, internal)
            self.version += 1

    def _unload(self, entry: AdapterEntry) -> None:
        if entry.internal is not None:
            self._delete_if_present(entry.internal)
            entry.internal = None

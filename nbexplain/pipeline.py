"""A memoised pipeline graph: stages declared as data, each cached under its own params and upstream keys."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Stage:
    """One step. ``params(state)`` picks the part of the state it depends on; ``run`` computes it."""

    name: str
    inputs: tuple[str, ...]
    params: Callable[[dict], tuple]
    run: Callable[[dict, dict], Any]          # run(state, {input name: value}) -> value
    doc: str = ""
    grows: tuple[str, ...] = ()               # inputs it adds reusable partial results to (a ``Workspace``)


class Workspace(dict):
    """A stage's reusable partial results, which later stages add to (``Stage.grows``). It counts its writes,
    so that a stage which added nothing (a CAM at another layer of the captured workspace) costs no
    recount of it against the cache's budget. Its values are replaced, never grown in place."""

    writes = 0

    def __setitem__(self, key, value) -> None:
        self.writes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.writes += 1
        super().__delitem__(key)

    def setdefault(self, key, default=None):
        self.writes += 1
        return super().setdefault(key, default)

    def update(self, *args, **kwargs) -> None:
        self.writes += 1
        super().update(*args, **kwargs)

    def pop(self, *args):
        self.writes += 1
        return super().pop(*args)

    def popitem(self):
        self.writes += 1
        return super().popitem()

    def clear(self) -> None:
        self.writes += 1
        super().clear()


@dataclass
class Record:
    stage: str
    ran: bool
    ms: float

    def as_dict(self) -> dict:
        return {"name": self.stage, "ran": self.ran, "ms": round(self.ms, 2)}


def nbytes(value: Any) -> int:
    """Approximate memory held by a cached value; a tensor storage or a container shared by several
    entries (the CAM workspace files one capture under every layer's key) counts once."""
    seen: set[int] = set()
    walked: set[int] = set()       # containers already counted: the workspace is recounted per update

    def size(v: Any, depth: int) -> int:
        if depth > 6:
            return 0
        if isinstance(v, torch.Tensor):
            storage = v.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if isinstance(v, np.ndarray):
            base = v.base if v.base is not None else v
            if id(base) in seen:
                return 0
            seen.add(id(base))
            return v.nbytes
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        container = isinstance(v, (dict, list, tuple)) or (is_dataclass(v) and not isinstance(v, type))
        if container:
            if id(v) in walked:
                return 0
            walked.add(id(v))
        if isinstance(v, dict):
            return sum(size(k, depth + 1) + size(x, depth + 1) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return sum(size(x, depth + 1) for x in v)
        if container:
            return sum(size(getattr(v, f.name), depth + 1) for f in fields(v))
        if hasattr(v, "tobytes") and hasattr(v, "size"):          # PIL images
            return int(np.prod(getattr(v, "size", (0,)))) * 4
        return 64

    return size(value, 0)


class ByteLRU:
    """A least-recently-used cache bounded in bytes. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.bytes = 0

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key, value) -> None:
        with self._lock:
            self.discard(key)
            size = nbytes(value)
            self._items[key] = (value, size)
            self.bytes += size
            self._evict()

    def remeasure(self, key) -> None:
        """A cached value grew (a workspace of reusable partial results): recount and evict."""
        with self._lock:
            if key in self._items:
                self.put(key, self._items[key][0])

    def discard(self, key) -> None:
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        """Drop least-recently-used entries until within budget; the newest entry is dropped last,
        and only if it alone exceeds the budget (it is still returned to its caller, just not kept)."""
        while self.bytes > self.max_bytes and self._items:
            _, (_, size) = self._items.popitem(last=False)
            self.bytes -= size


def digest(*parts: Any) -> str:
    """A short content hash of arrays/tensors/bytes/strings, for cache keys."""
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().contiguous().numpy()
        if isinstance(p, np.ndarray):
            h.update(str((p.shape, p.dtype)).encode())
            p = np.ascontiguousarray(p).tobytes()
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()


class Graph:
    """Evaluate a stage by pulling its inputs; anything whose key is cached is not recomputed."""

    def __init__(self, stages: list[Stage], cache: ByteLRU) -> None:
        self.stages = {s.name: s for s in stages}
        self.cache = cache
        for s in stages:
            missing = [i for i in s.inputs if i not in self.stages]
            if missing:
                raise ValueError(f"stage {s.name!r} depends on unknown stage {missing[0]!r}")
            if not set(s.grows) <= set(s.inputs):
                raise ValueError(f"stage {s.name!r} can only grow its own inputs, not {s.grows}")

    def key(self, name: str, state: dict, _memo: dict | None = None) -> tuple:
        memo = {} if _memo is None else _memo
        if name not in memo:
            s = self.stages[name]
            memo[name] = (name, s.params(state), tuple(self.key(i, state, memo) for i in s.inputs))
        return memo[name]

    def evaluate(self, name: str, state: dict) -> tuple[Any, list[Record]]:
        records: dict[str, Record] = {}
        keys: dict = {}
        value = self._pull(name, state, records, keys)
        order = [n for n in self.order() if n in records or n in self._upstream(name)]
        return value, [records.get(n, Record(n, False, 0.0)) for n in order]

    def _pull(self, name: str, state: dict, records: dict, keys: dict) -> Any:
        key = self.key(name, state, keys)
        hit = self.cache.get(key, _MISSING)
        if hit is not _MISSING:
            records.setdefault(name, Record(name, False, 0.0))   # keep "ran" if it ran earlier in this pull
            return hit
        stage = self.stages[name]
        upstream = {i: self._pull(i, state, records, keys) for i in stage.inputs}
        writes = {i: getattr(upstream[i], "writes", None) for i in stage.grows}
        t0 = time.perf_counter()
        value = stage.run(state, upstream)
        records[name] = Record(name, True, (time.perf_counter() - t0) * 1000)
        for i in stage.grows:                  # they grew in place: recount them against the budget
            if writes[i] is None or getattr(upstream[i], "writes", None) != writes[i]:
                self.cache.remeasure(keys[i])
        self.cache.put(key, value)
        return value

    def _upstream(self, name: str) -> set[str]:
        out = {name}
        for i in self.stages[name].inputs:
            out |= self._upstream(i)
        return out

    def order(self) -> list[str]:
        """Stage names, upstream first."""
        seen: list[str] = []

        def visit(n):
            for i in self.stages[n].inputs:
                visit(i)
            if n not in seen:
                seen.append(n)
        for n in self.stages:
            visit(n)
        return seen

    def describe(self) -> str:
        """The graph as text: each stage, what it depends on, and what it does."""
        lines = []
        for n in self.order():
            s = self.stages[n]
            arrow = f" <- {', '.join(s.inputs)}" if s.inputs else ""
            lines.append(f"{n}{arrow}: {s.doc}")
        return "\n".join(lines)

    def dot(self) -> str:
        """Graphviz source of the graph."""
        edges = [f'  "{i}" -> "{n}";' for n in self.order() for i in self.stages[n].inputs]
        return "digraph pipeline {\n  rankdir=LR;\n" + "\n".join(edges) + "\n}"


_MISSING = object()

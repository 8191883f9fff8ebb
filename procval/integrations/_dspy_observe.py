"""DSPy callbacks and LM history across processes: recorded in the workers, replayed in the parent.

::

    parent: snapshot()                                worker: _Configure() then each example
    ──────────────────                                ──────────────────────────────────────
    dspy.settings.callbacks split in two:
      in_worker(cb) / cb.procval_in_worker ─pickled─▶ run there, as DSPy runs them (only there)
      the others stay here, in a Relay ───token────▶  a Recorder callback records each event:
      (with the LM, the adapter, the call id            (hook, call_id, parent id, instance ref,
       active now: the Evaluate call)                    inputs/outputs as plain data, exception)
                                                      the LM's update_history is tapped: each
                                                        history entry is recorded too
    rows arrive ◀── ExampleResult.events ──────────   (procval.worker.record: per example)
    replay(): for each event, in recorded order, the relay's callbacks are called with
      ACTIVE_CALL_ID set to the event's parent (a top-level call's parent: the call active at
      snapshot(), i.e. procval.dspy.Evaluate's); history entries go to the parent's LM through
      lm.update_history (so GLOBAL_HISTORY and DSPy's bounds apply)

What a replayed callback receives:
- ``call_id``: the worker's call id (a uuid, unique across processes).
- ``instance``: the parent's own object where it has one: the LM of the snapshot for LM calls,
  the program's module at the same path (``self.predict``...) when ``Evaluate`` runs it, the
  snapshot's adapter; otherwise a :class:`Replayed` stand-in naming the kind, class and path.
- ``inputs`` / ``outputs``: as recorded, with what is not plain data converted to plain data
  (a ``dspy.Signature`` class becomes its signature string, other objects go through
  ``procval._convert.to_jsonable``); ``dspy.Prediction`` and ``dspy.Example`` stay themselves,
  but a Prediction's ``completions.signature`` is the signature string too (a copy: the
  worker's Prediction is left as it is).
- ``exception``: the worker's exception if it could be pickled, else a ``RuntimeError`` naming it.
"""

from __future__ import annotations

import copy
import logging
import pickle
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import dspy
from dspy.clients.base_lm import BaseLM
from dspy.utils.callback import ACTIVE_CALL_ID

from procval._convert import to_jsonable
from procval.results import Row
from procval.run import replay
from procval.worker import record

__all__ = ["InWorker", "Recorder", "Relay", "Replayed", "in_worker", "runs_in_worker"]

logger = logging.getLogger("dspy.utils.callback")  # where DSPy logs a failing callback
KIND = "dspy"
_PLAIN = (str, int, float, bool, type(None))
_HOOKS = (
    "on_module_start",
    "on_module_end",
    "on_lm_start",
    "on_lm_end",
    "on_adapter_format_start",
    "on_adapter_format_end",
    "on_adapter_parse_start",
    "on_adapter_parse_end",
    "on_tool_start",
    "on_tool_end",
)
_HISTORY = "history"
_STARTS = frozenset(hook for hook in _HOOKS if hook.endswith("_start"))
_DEFAULT_ADAPTER = dspy.ChatAdapter()


# ------------------------------------------------------------------ in the worker, or here


class InWorker:
    """A DSPy callback that runs in the worker processes only (pickled with the snapshot).

    For callbacks that write to a file or a tracing server from where the program runs. Build
    it with :func:`in_worker`; it forwards every handler to the wrapped callback.
    """

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def __getattr__(self, name: str) -> Any:
        if name == "callback":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.callback, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (InWorker, (self.callback,))

    def __repr__(self) -> str:
        return f"in_worker({self.callback!r})"


def in_worker(callback: Any) -> InWorker:
    """Mark a DSPy callback to run in the workers, where the program runs, and not here.

    Without it (or a true ``procval_in_worker`` attribute on the callback), a callback in
    ``dspy.settings.callbacks`` runs in the calling process, on the events replayed from the
    workers. A callback run in the workers must be picklable.

    Args:
        callback: a ``dspy.utils.callback.BaseCallback`` (or any object with its handlers).

    Returns:
        The wrapped callback, for ``dspy.configure(callbacks=[...])``.
    """
    return callback if isinstance(callback, InWorker) else InWorker(callback)


def runs_in_worker(callback: Any) -> bool:
    """Whether ``callback`` is meant to run in the workers (wrapped, or ``procval_in_worker``)."""
    return isinstance(callback, InWorker) or getattr(callback, "procval_in_worker", False) is True


# ------------------------------------------------------------------ worker side


class Recorder:
    """The worker's DSPy callback that records every event in the running example's recording.

    Picklable (it holds only the relay's token). Its handlers are DSPy's (``on_lm_start``...).
    """

    def __init__(self, token: str) -> None:
        self.token = token

    def __reduce__(self) -> tuple[Any, ...]:
        return (Recorder, (self.token,))

    def _start(self, hook: str, call_id: str, instance: Any, inputs: Any) -> None:
        record.add(
            KIND, (self.token, hook, call_id, ACTIVE_CALL_ID.get(), _ref(instance), plain(inputs))
        )

    def _end(self, hook: str, call_id: str, outputs: Any, exception: Any) -> None:
        error = _exception(exception) if exception is not None else None
        record.add(KIND, (self.token, hook, call_id, ACTIVE_CALL_ID.get(), error, plain(outputs)))


def _recording_hook(hook: str) -> Callable[..., None]:
    if hook.endswith("_start"):

        def start(self: Recorder, call_id: str, instance: Any, inputs: Any) -> None:
            self._start(hook, call_id, instance, inputs)

        start.__name__ = hook
        return start

    def end(self: Recorder, call_id: str, outputs: Any, exception: Any = None) -> None:
        self._end(hook, call_id, outputs, exception)

    end.__name__ = hook
    return end


for _hook in _HOOKS:
    setattr(Recorder, _hook, _recording_hook(_hook))
for _other in ("on_evaluate_start", "on_evaluate_end", "on_compile_start", "on_compile_end"):
    setattr(Recorder, _other, lambda self, *args, **kwargs: None)


class _HistoryTap:
    """``lm.update_history`` in a worker: records the entry for the parent, then DSPy's own."""

    def __init__(self, lm: BaseLM, key: Any, token: str) -> None:
        self.lm = weakref.ref(lm)
        self.key = key
        self.token = token

    def __call__(self, entry: dict[str, Any]) -> None:
        record.add(KIND, (self.token, _HISTORY, self.key, entry))
        lm = self.lm()
        if lm is not None:
            type(lm).update_history(lm, entry)


def install(token: str, settings: dict[str, Any]) -> None:
    """In a worker: tap the snapshot's LM history (its key: ``"lm"``) for the relay ``token``."""
    lm = settings.get("lm")
    if isinstance(lm, BaseLM):
        tap(lm, "lm", token)


def tap(lm: BaseLM, key: Any, token: str) -> None:
    """Record ``lm``'s history entries under ``key`` (idempotent)."""
    if isinstance(vars(lm).get("update_history"), _HistoryTap):
        return
    lm.update_history = _HistoryTap(lm, key, token)
    lm._procval_key = key  # names it in recorded events


def watch(program: Any, token: str | None) -> None:
    """In a worker: tap the LMs set on the program's own predictors (keys: their names)."""
    if token is None or not isinstance(program, dspy.Module):
        return
    for name, predictor in program.named_predictors():
        lm = getattr(predictor, "lm", None)
        if isinstance(lm, BaseLM):
            tap(lm, ("predictor", name), token)
    for path, module in program.named_sub_modules():
        if "_procval_path" not in vars(module):
            module._procval_path = path


def current_token() -> str | None:
    """The relay token of the snapshot installed in this worker (None: nothing recorded)."""
    for callback in dspy.settings.get("callbacks") or []:
        if isinstance(callback, Recorder):
            return callback.token
    lm = dspy.settings.get("lm")
    tapped = vars(lm).get("update_history") if lm is not None else None
    return tapped.token if isinstance(tapped, _HistoryTap) else None


def _ref(instance: Any) -> tuple[Any, ...]:
    kind = _kind(instance)
    cls = type(instance)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if kind == "lm":
        return (
            kind,
            name,
            getattr(instance, "_procval_key", None),
            getattr(instance, "model", None),
        )
    if kind == "tool":
        return (kind, name, getattr(instance, "name", None))
    return (
        kind,
        name,
        vars(instance).get("_procval_path") if hasattr(instance, "__dict__") else None,
    )


def _kind(instance: Any) -> str:
    if isinstance(instance, BaseLM):
        return "lm"
    if isinstance(instance, dspy.Adapter):
        return "adapter"
    if isinstance(instance, dspy.Tool):
        return "tool"
    return "module"


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as picklable plain data (see the module docstring)."""
    if isinstance(value, _PLAIN):
        return value
    if depth > 20:
        return repr(value)
    if isinstance(value, dict):
        return {k: plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, dspy.Example):  # Prediction too
        if all(isinstance(v, _PLAIN) for v in value._store.values()):
            return _light(value)
        return to_jsonable(value)
    if _is_signature(value):
        return _signature_text(value)
    return to_jsonable(value)


def _light(example: Any) -> Any:
    """``example``, or a copy whose completions name their signature by its string.

    A Predict's ``Prediction`` holds its ``Completions``, which hold the signature class: a class
    built at run time, that cloudpickle sends by value and the parent rebuilds, the most costly
    part of a replayed event by far.
    """
    completions = vars(example).get("_completions")
    signature = vars(completions).get("signature") if hasattr(completions, "__dict__") else None
    if not _is_signature(signature):
        return example
    light = copy.copy(completions)
    light.signature = _signature_text(signature)
    example = copy.copy(example)
    example._completions = light
    return example


def _is_signature(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, dspy.Signature)


def _signature_text(signature: Any) -> str:
    return str(getattr(signature, "signature", signature.__name__))


def _exception(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")
    return exc


# ------------------------------------------------------------------ parent side


class Replayed:
    """The stand-in ``instance`` of a replayed event where the parent has no object of its own.

    Attributes:
        kind: ``"lm"``, ``"module"``, ``"adapter"`` or ``"tool"``.
        type: the worker object's class, as ``module.qualname``.
        name: the module's path in the program (``self.predict``), the tool's name or the LM's
            model, when known.
    """

    __slots__ = ("kind", "name", "type")

    def __init__(self, kind: str, type: str, name: Any) -> None:
        self.kind = kind
        self.type = type
        self.name = name

    def __repr__(self) -> str:
        return f"Replayed({self.kind}, {self.type}, {self.name!r})"


_relays: weakref.WeakValueDictionary[str, Relay] = weakref.WeakValueDictionary()


class Relay:
    """The parent's half of a snapshot: its callbacks, LM and adapter, and where calls hang.

    Attributes:
        token: names the relay in the events its workers record.
        callbacks: the callbacks replayed here (those not marked to run in the workers).
        lm: the caller's LM of the snapshot (its history receives the workers' entries).
        adapter: the caller's adapter of the snapshot, or None.
        root: the call id active at ``snapshot()`` (``Evaluate``'s): a top-level call's parent.
        program: the caller's program, set by ``Evaluate`` (modules are found in it by path).
        hold_history: keep history entries until :meth:`flush_history` (example order).
    """

    def __init__(self, callbacks: Sequence[Any], lm: Any, adapter: Any) -> None:
        self.token = uuid.uuid4().hex
        self.callbacks = list(callbacks)
        self.lm = lm
        self.adapter = adapter
        self.root = ACTIVE_CALL_ID.get()
        self.program: Any = None
        self.hold_history = False
        self._held: list[tuple[int, Any, dict[str, Any]]] = []
        self._modules: dict[str, Any] | None = None
        self._instances: dict[tuple[Any, ...], Any] = {}
        self._dispatch: dict[str, list[tuple[Any, Callable[..., Any]]]] = {}
        _relays[self.token] = self

    def replay(self, row: Row, events: Sequence[tuple[Any, ...]]) -> None:
        """Replay one example's recorded events of this relay (callback events, history)."""
        dispatch = self._dispatch
        root = self.root
        first = None  # ACTIVE_CALL_ID is set per event and put back once, at the end
        try:
            for event in events:
                hook = event[1]
                if hook == _HISTORY:
                    if self.hold_history:
                        self._held.append((row.index, event[2], event[3]))
                    else:
                        self._append(event[2], event[3])
                    continue
                _, hook, call_id, parent, extra, data = event
                token = ACTIVE_CALL_ID.set(root if parent is None else parent)
                if first is None:
                    first = token
                handlers = dispatch.get(hook)
                if handlers is None:
                    handlers = dispatch[hook] = [(c, getattr(c, hook)) for c in self.callbacks]
                if hook in _STARTS:
                    instance = self._instances.get(extra)
                    if instance is None:
                        instance = self._instances[extra] = self._instance(extra)
                    for callback, handler in handlers:
                        try:
                            handler(call_id=call_id, instance=instance, inputs=data)
                        except Exception as exc:  # as DSPy does: logged, not raised
                            _failed(callback, exc)
                else:
                    for callback, handler in handlers:
                        try:
                            handler(call_id=call_id, outputs=data, exception=extra)
                        except Exception as exc:
                            _failed(callback, exc)
        finally:
            if first is not None:
                ACTIVE_CALL_ID.reset(first)

    def flush_history(self) -> None:
        """Append the held history entries to their LMs, in example order."""
        held, self._held = self._held, []
        held.sort(key=lambda item: item[0])  # stable: an example's entries keep their order
        for _, key, entry in held:
            self._append(key, entry)

    def _append(self, key: Any, entry: dict[str, Any]) -> None:
        lm = self._lm(key)
        if lm is not None:
            lm.update_history(entry)

    def _lm(self, key: Any) -> Any:
        if key == "lm":
            return self.lm
        if isinstance(key, tuple) and self.program is not None:
            for name, predictor in self.program.named_predictors():
                if name == key[1]:
                    return getattr(predictor, "lm", None)
        return None

    def _instance(self, ref: tuple[Any, ...]) -> Any:
        kind, name, where = ref[0], ref[1], ref[2]
        if kind == "lm":
            lm = self._lm(where)
            return lm if lm is not None else Replayed(kind, name, ref[3])
        if kind == "adapter":
            if self.adapter is None and name == _name(_DEFAULT_ADAPTER):
                self.adapter = dspy.ChatAdapter()  # what DSPy uses when none is set
            if self.adapter is not None and _name(self.adapter) == name:
                return self.adapter
        if kind == "module" and where is not None and self.program is not None:
            module = self._module(where)
            if module is not None:
                return module
        return Replayed(kind, name, where)

    def _module(self, path: str) -> Any:
        if self._modules is None:
            program = self.program
            self._modules = (
                dict(program.named_sub_modules()) if isinstance(program, dspy.Module) else {}
            )
        return self._modules.get(path)


def _name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _failed(callback: Any, exc: Exception) -> None:
    logger.warning(f"Error when calling callback {callback}: {exc}")


def _replay(config: str, row: Row, events: list[Any]) -> None:
    if not events:
        return
    start, token = 0, events[0][0]
    for i in range(1, len(events) + 1):  # runs of one relay's events (usually one run)
        if i < len(events) and events[i][0] == token:
            continue
        relay = _relays.get(token)
        if relay is not None:
            relay.replay(row, events[start:i] if start or i < len(events) else events)
        if i < len(events):
            start, token = i, events[i][0]


replay.register(KIND, _replay)

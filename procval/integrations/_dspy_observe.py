"""DSPy callbacks and LM history across processes: recorded in the workers, replayed in the parent.

::

    parent: snapshot()                                worker: _Configure() then each example
    ──────────────────                                ──────────────────────────────────────
    dspy.settings.callbacks split in two:
      in_worker(cb) / cb.procval_in_worker ─pickled─▶ run there, as DSPy runs them (only there)
      the others stay here, in a Relay ───token────▶  a Recorder callback records each event:
      (with the LM, the adapter, the call id            (hook, call_id, parent id, instance ref,
       active now: the Evaluate call)                    inputs/outputs as plain data, exception)
      needed_hooks(): the hooks they implement ──────▶  of those hooks only (no Recorder at all
                                                        when there is none: DSPy's dispatch off)
                                                      the LM's update_history is tapped: each
                                                        history entry is recorded too
    rows arrive ◀── ExampleResult.events ──────────   (procval.worker.record: per example, one
                                                        pickle blob when the example ends)
    replay(): for each event, in recorded order, the relay's callbacks are called with
      ACTIVE_CALL_ID set to the event's parent (a top-level call's parent: the call active at
      snapshot(), i.e. procval.dspy.Evaluate's); history entries go to the parent's LM through
      lm.update_history (so GLOBAL_HISTORY and DSPy's bounds apply)

The hooks relayed are every ``on_*_start``/``on_*_end`` of the installed DSPy's ``BaseCallback``:
module, LM, adapter format and parse, tool, and (DSPy 3.4.1 and later) the code interpreters'
``on_interpreter_{startup,execute,tool_call,shutdown}_*``; ``on_compile_*`` (an optimizer run
inside the program) and ``on_evaluate_*`` (a ``dspy.Evaluate`` run inside it) too, but only
along with another hook: those events belong to the caller's process (its ``Evaluate`` call
runs here), and alone they would turn DSPy's dispatch on for every call in the workers. A hook
DSPy calls that this DSPy's ``BaseCallback`` does not define (a worker with a newer DSPy) is
not recorded: the Recorder answers any ``on_*_start``/``on_*_end`` with a handler doing nothing.

What a replayed callback receives:
- ``call_id``: the worker's call id (a uuid, unique across processes).
- ``instance``: the parent's own object where it has one: the LM of the snapshot for LM calls,
  the program's module at the same path (``self.predict``...) when ``Evaluate`` runs it, the
  code interpreter a module of that program holds at the same path (``self.interpreter``), the
  snapshot's adapter; otherwise a :class:`Replayed` stand-in naming the kind (from the hook:
  ``"interpreter"`` for ``on_interpreter_*``, ``"optimizer"`` for ``on_compile_*``), class and
  path (an interpreter made during the call, as ``dspy.RLM`` and ``ProgramOfThought`` make
  theirs, has none).
- ``inputs`` / ``outputs``: as recorded, with what is not plain data converted to plain data
  (a ``dspy.Signature`` class becomes its signature string, other objects go through
  ``procval._convert.to_jsonable``); ``dspy.Prediction`` and ``dspy.Example`` stay themselves,
  but a Prediction's ``completions.signature`` is the signature string too (a copy: the
  worker's Prediction is left as it is); an interpreter's ``FinalOutput`` stays one, its
  ``output`` plain data.
- ``exception``: the worker's exception if it could be pickled, else a ``RuntimeError`` naming it.

A hook that every relayed callback leaves as ``BaseCallback``'s (a no-op) is neither recorded
nor replayed: nothing could observe it. The same ``dspy.Prediction`` object passed to several
handlers of one example (a module returning its submodule's) is one object in the parent too,
as long as it was not changed in between.

What it costs per event (recording ~2.5 us in the worker, replay ~0.2 us plus its share of one
unpickling per example here) is small next to DSPy's own dispatch of a callback in the worker
(~40 us per module, LM or adapter call: ``benchmarks/relay.py``'s ``dispatch`` mode).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import dspy
from dspy.clients import base_lm
from dspy.clients.base_lm import BaseLM
from dspy.utils.callback import ACTIVE_CALL_ID, BaseCallback

from procval.integrations._dspy_held import HeldHistory
from procval.integrations._dspy_in_worker import InWorker, in_worker, runs_in_worker
from procval.integrations._dspy_plain import picklable_exception, plain
from procval.results import Row
from procval.run import replay
from procval.worker import record

__all__ = [
    "InWorker",
    "Recorder",
    "Relay",
    "Replayed",
    "in_worker",
    "needed_hooks",
    "runs_in_worker",
]

logger = logging.getLogger("dspy.utils.callback")  # where DSPy logs a failing callback
KIND = "dspy"
# Every hook of the installed DSPy's BaseCallback (3.4.1 added on_interpreter_*; an older DSPy
# has fewer, a newer one more): each is recorded and replayed the same way (see the docstring).
_HOOKS = tuple(
    name
    for name in vars(BaseCallback)
    if name.startswith("on_") and name.endswith(("_start", "_end"))
)
# Events that happen in the caller's process (its Evaluate call, its optimizer) and only rarely
# in a program: recorded only along with others, never the only reason to record.
_ALONG = frozenset(hook for hook in _HOOKS if hook.startswith(("on_evaluate_", "on_compile_")))
_HISTORY = "history"
_INTERPRETER = getattr(dspy, "CodeInterpreter", None)  # DSPy >= 3.4.1
_DEFAULT_ADAPTER = dspy.ChatAdapter()


# ------------------------------------------------------------------ worker side


class Recorder:
    """The worker's DSPy callback that records every event in the running example's recording.

    Picklable (it holds only the relay's token and the hooks to record). Its handlers are
    DSPy's (``on_lm_start``...); those of the hooks it is not asked to record do nothing, and so
    does any other ``on_*_start``/``on_*_end`` handler DSPy asks it for (a hook this DSPy's
    ``BaseCallback`` does not define): never an ``AttributeError`` in the worker.

    Args:
        token: the relay's token.
        hooks: the hooks to record (default: all); see :func:`needed_hooks`.
    """

    def __init__(self, token: str, hooks: Iterable[str] | None = None) -> None:
        self.token = token
        self.hooks = frozenset(_HOOKS if hooks is None else hooks)
        for hook in _HOOKS:
            if hook not in self.hooks:
                setattr(self, hook, _ignore)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_") and name.endswith(("_start", "_end")):
            return _ignore  # a hook unknown here: not recorded (see the module docstring)
        raise AttributeError(name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Recorder, (self.token, tuple(sorted(self.hooks))))


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _family(hook: str) -> str:
    """The kind of object a hook's events are about: ``on_interpreter_execute_start``'s..."""
    word = hook.split("_")[1]  # on_lm_start: lm; on_adapter_format_end: adapter
    return "optimizer" if word == "compile" else word


def _recording_hook(hook: str) -> Callable[..., None]:
    # One closure per hook, the per-event work inlined: a handler runs ~20 times per example.
    if hook.endswith("_start"):
        kind = _family(hook)

        def start(self: Recorder, call_id: str, instance: Any, inputs: Any) -> None:
            recording = record.current()
            if recording is not None:
                ref, data = _ref(instance, kind), plain(inputs, 0, recording)
                event = (self.token, hook, call_id, ACTIVE_CALL_ID.get(), ref, data)
                recording.events.append((KIND, event))

        start.__name__ = hook
        return start

    def end(self: Recorder, call_id: str, outputs: Any, exception: Any = None) -> None:
        recording = record.current()
        if recording is not None:
            error = None if exception is None else picklable_exception(exception)
            data = plain(outputs, 0, recording)
            event = (self.token, hook, call_id, ACTIVE_CALL_ID.get(), error, data)
            recording.events.append((KIND, event))

    end.__name__ = hook
    return end


for _hook in _HOOKS:
    setattr(Recorder, _hook, _recording_hook(_hook))


def needed_hooks(callbacks: Iterable[Any]) -> frozenset[str]:
    """The hooks that the workers must record for ``callbacks``: those one of them implements.

    A hook a callback leaves as ``BaseCallback``'s (which does nothing) needs no event: a
    callback that overrides no ``on_adapter_*`` handler makes the workers record no adapter
    event. Any other handler counts, and so does a missing one (DSPy calls it anyway, and logs
    the ``AttributeError``; so does the replay). ``on_evaluate_*`` and ``on_compile_*`` are
    recorded only along with another hook: alone, they would turn DSPy's dispatch on for every
    call in the workers for events that a program seldom has (a ``dspy.Evaluate`` or an
    optimizer run inside it).
    """
    needed = frozenset(
        hook for hook in _HOOKS if any(_implements(callback, hook) for callback in callbacks)
    )
    return needed if needed - _ALONG else frozenset()


def _implements(callback: Any, hook: str) -> bool:
    handler = getattr(callback, hook, None)  # missing: DSPy calls it anyway and logs the error
    return handler is None or getattr(handler, "__func__", handler) is not _BASE.get(hook)


_BASE = {hook: getattr(BaseCallback, hook, None) for hook in _HOOKS}


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


#: History entries a worker keeps itself: per LM, per module and in DSPy's global history.
#: Every entry goes to the caller's LMs (the relay, bounded there by the caller's own
#: ``max_history_size``), so the worker's copies serve only a program that reads ``lm.history``
#: or calls ``dspy.inspect_history()`` as it runs, which the latest entries serve. DSPy's own
#: bound (10,000 entries, 4.8 KB each for the test stand-in's short prompts and replies, more for
#: real ones) would grow every worker by 50 MB or more in a long run.
WORKER_HISTORY = 100


def install(token: str, settings: dict[str, Any]) -> None:
    """In a worker: tap the snapshot's LM history (its key: ``"lm"``) for the relay ``token``.

    And bound the worker's own histories to :data:`WORKER_HISTORY` entries (fewer if the
    snapshot's ``max_history_size`` says so).
    """
    lm = settings.get("lm")
    if isinstance(lm, BaseLM):
        tap(lm, "lm", token)
    bound = getattr(dspy.settings, "max_history_size", None)
    if isinstance(bound, int) and bound > WORKER_HISTORY:
        dspy.configure(max_history_size=WORKER_HISTORY)
    if getattr(base_lm, "MAX_HISTORY_SIZE", 0) > WORKER_HISTORY:
        base_lm.MAX_HISTORY_SIZE = WORKER_HISTORY  # GLOBAL_HISTORY's bound, read at each call


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
    for path, interpreter in _interpreters(program):
        with contextlib.suppress(AttributeError):  # __slots__: replayed as a stand-in
            interpreter._procval_path = path


def _interpreters(program: Any) -> list[tuple[str, Any]]:
    """The code interpreters the program's modules hold, by path (``self.interpreter``)."""
    if _INTERPRETER is None or not isinstance(program, dspy.Module):
        return []
    held = program.named_sub_modules(type_=_INTERPRETER)
    return [(path, obj) for path, obj in held if not isinstance(obj, type)]


def current_token() -> str | None:
    """The relay token of the snapshot installed in this worker (None: nothing recorded)."""
    for callback in dspy.settings.get("callbacks") or []:
        if isinstance(callback, Recorder):
            return callback.token
    lm = dspy.settings.get("lm")
    tapped = vars(lm).get("update_history") if lm is not None else None
    return tapped.token if isinstance(tapped, _HistoryTap) else None


def _ref(instance: Any, kind: str) -> tuple[Any, ...]:
    cls = type(instance)
    name = _NAMES.get(cls)
    if name is None:
        name = _NAMES[cls] = f"{cls.__module__}.{cls.__qualname__}"
    if kind == "lm":
        return (
            kind,
            name,
            getattr(instance, "_procval_key", None),
            getattr(instance, "model", None),
        )
    if kind == "tool":
        return (kind, name, getattr(instance, "name", None))
    own = getattr(instance, "__dict__", None)
    return (kind, name, own.get("_procval_path") if own is not None else None)


_NAMES: dict[type, str] = {}  # a class's name, found once


# ------------------------------------------------------------------ parent side


class Replayed:
    """The stand-in ``instance`` of a replayed event where the parent has no object of its own.

    Attributes:
        kind: what the hook is about: ``"lm"``, ``"module"``, ``"adapter"``, ``"tool"``,
            ``"interpreter"``, ``"optimizer"``, ``"evaluate"``.
        type: the worker object's class, as ``module.qualname``.
        name: the module's or interpreter's path in the program (``self.predict``), the tool's
            name or the LM's model, when known.
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

    def __init__(
        self, callbacks: Sequence[Any], lm: Any, adapter: Any, *, token: str | None = None
    ) -> None:
        self.token = token or uuid.uuid4().hex
        self.callbacks = list(callbacks)
        self.lm = lm
        self.adapter = adapter
        self.root = ACTIVE_CALL_ID.get()
        self.program: Any = None
        self.hold_history = False
        self._held = HeldHistory()
        self._modules: dict[tuple[str, str], Any] | None = None
        self._instances: dict[tuple[Any, ...], Any] = {}
        self._dispatch: dict[str, tuple[bool, list[tuple[Any, Callable[..., Any]]]]] = {}
        _relays[self.token] = self

    def replay(self, row: Row, events: Sequence[tuple[Any, ...]]) -> None:
        """Replay one example's recorded events of this relay (callback events, history)."""
        dispatch = self._dispatch
        instances = self._instances
        root = self.root
        first = None  # ACTIVE_CALL_ID is set when the parent changes, put back once at the end
        try:
            for event in events:
                hook = event[1]
                if hook == _HISTORY:
                    if self.hold_history:
                        self._held.add(row.index, event[2], event[3])
                    else:
                        self._append(event[2], event[3])
                    continue
                found = dispatch.get(hook)
                if found is None:
                    found = dispatch[hook] = (hook.endswith("_start"), self._handlers(hook))
                start, handlers = found
                if not handlers:
                    continue
                _, hook, call_id, parent, extra, data = event
                if parent is None:
                    parent = root
                if ACTIVE_CALL_ID.get() != parent:
                    token = ACTIVE_CALL_ID.set(parent)
                    if first is None:
                        first = token
                if start:
                    instance = instances.get(extra)
                    if instance is None:
                        instance = instances[extra] = self._instance(extra)
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

    def _handlers(self, hook: str) -> list[tuple[Any, Callable[..., Any]]]:
        """The callbacks' handlers of ``hook``, but ``BaseCallback``'s own (which do nothing)."""
        found = []
        for callback in self.callbacks:
            handler = getattr(callback, hook, None)
            if handler is None:  # called anyway: it fails and is logged, as DSPy does
                found.append((callback, _missing(callback, hook)))
            elif _implements(callback, hook):
                found.append((callback, handler))
        return found

    def flush_history(self) -> None:
        """Append the held history entries to their LMs, in example order."""
        for key, entry in self._held.entries():
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
        if kind in ("module", "interpreter") and where is not None and self.program is not None:
            held = self._find(kind, where)
            if held is not None and _name(held) == name:
                return held
        return Replayed(kind, name, where)

    def _find(self, kind: str, path: str) -> Any:
        """The program's module, or the interpreter one of its modules holds, at ``path``."""
        if self._modules is None:
            program = self.program
            modules = program.named_sub_modules() if isinstance(program, dspy.Module) else ()
            self._modules = {("module", path): module for path, module in modules}
            self._modules.update(
                (("interpreter", path), held) for path, held in _interpreters(program)
            )
        return self._modules.get((kind, path))


def _name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _missing(callback: Any, hook: str) -> Callable[..., Any]:
    def handler(**kwargs: Any) -> Any:
        return getattr(callback, hook)(**kwargs)  # AttributeError, in DSPy's words

    return handler


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

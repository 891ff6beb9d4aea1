"""Every value a request sends is checked against this server's own lists and ranges before Gradio or the
app does anything with it.

Anyone can call any event of the page (a browser, `gradio_client`, raw HTTP with an `fn_index`), so the
checks are not on the page but on the server: each input component is registered with its `Check`, the
`Gate` refuses to start while an event has an input without one, and it runs the checks of an event's
inputs on the raw values of each request, before Gradio moves files or validates shapes. A refused request
gets a clear message (a `gr.Error`, one line in the log). The events run with `preprocess=False`, so the
handlers see the same raw values, already checked.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, TypeVar

import gradio as gr

from ..errors import InputError
from .logs import refusal

Component = TypeVar("Component", bound=gr.components.Component)


@dataclass(frozen=True)
class Request:
    """The raw values of one request, by component, and the Gradio session that sent it."""

    session: str
    values: dict[int, Any]

    def __getitem__(self, component: gr.components.Component) -> Any:
        return self.values.get(component._id)


Check = Callable[[str, Any, Request], None]  # (the input's label, its value, the request); raises InputError


class Admission(Protocol):
    """What the gate asks the session store (vlm/ui/sessions.py) around each request."""

    def admit(self, session: str) -> None: ...
    def enter(self, session: str) -> None: ...
    def leave(self, session: str) -> None: ...


class Gate:
    def __init__(self) -> None:
        self.checks: dict[int, Check] = {}
        self.sessions: Admission | None = None  # set by vlm.ui.launch

    def field(self, component: Component, check: Check) -> Component:
        """Register `component`'s check; returns the component."""
        self.checks[component._id] = check
        return component

    def slider(self, minimum: float, maximum: float, value: float, step: float, label: str,
               **options: Any) -> gr.Slider:
        """A slider whose requests must hold a value in its range (a whole number when `step` is 1)."""
        return self.field(gr.Slider(minimum, maximum, value=value, step=step, label=label, **options),
                          number(minimum, maximum, integer=step == 1))

    def number_box(self, value: float, minimum: float, maximum: float, label: str, integer: bool = False,
               off: float | None = None, **options: Any) -> gr.Number:
        """A number box whose requests must hold a value from `minimum` to `maximum`, or `off`."""
        lowest = minimum if off is None else min(off, minimum)
        return self.field(gr.Number(value, precision=0 if integer else None, minimum=lowest, maximum=maximum,
                                    label=label, **options), number(minimum, maximum, integer, off))

    def install(self, demo: gr.Blocks) -> None:
        """Check every request of `demo`'s events; refuses to start while an input has no check."""
        unchecked = [f"{fn.name}: {block}" for fn in demo.fns.values() for block in fn.inputs
                     if not block.stateful and block._id not in self.checks]
        if unchecked:
            raise RuntimeError(f"Inputs without a check: {', '.join(unchecked)}")
        process_api = demo.process_api
        signature = inspect.signature(process_api)

        async def checked(*args: Any, **kwargs: Any) -> dict[str, Any]:
            call = signature.bind(*args, **kwargs).arguments
            fn = call["block_fn"] if not isinstance(call["block_fn"], int) else demo.fns[call["block_fn"]]
            session = call.get("session_hash") or ""
            if call.get("iterator") is None:  # the first call of an event; later ones continue its generator
                self.admit(fn, call["inputs"], session)
            if self.sessions is None:
                return await process_api(*args, **kwargs)
            self.sessions.enter(session)
            try:
                return await process_api(*args, **kwargs)
            finally:
                self.sessions.leave(session)

        demo.process_api = checked  # type: ignore[method-assign]

    def admit(self, fn: Any, inputs: Any, session: str) -> None:
        """Raise a gr.Error (one line in the log) unless every input of this request passes its check."""
        blocks = fn.inputs
        if not isinstance(inputs, list) or len(inputs) < len(blocks):
            got = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
            raise refusal(f"This endpoint takes {len(blocks)} values ({', '.join(map(name, blocks))}); got {got}.")
        request = Request(session, {block._id: value for block, value in zip(blocks, inputs)})
        try:
            if self.sessions is not None:
                self.sessions.admit(session)
            for block in blocks:
                if not block.stateful:
                    self.checks[block._id](name(block), request[block], request)
        except InputError as exc:
            raise refusal(str(exc)) from None


def name(block: Any) -> str:
    return getattr(block, "label", None) or type(block).__name__


# ---------------------------------------------------------------------------------------------- checks
def number(minimum: float, maximum: float, integer: bool = False, off: float | None = None) -> Check:
    """A finite number from `minimum` to `maximum` (a whole one if `integer`), or exactly `off`."""

    def check(label: str, value: Any, request: Request) -> None:
        kind = "a whole number" if integer else "a number"
        allowed = f"{kind} from {shown(minimum)} to {shown(maximum)}" + ("" if off is None else f", or {shown(off)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{label} must be {allowed}, not {short(value)}.")
        if value == off:
            return
        if not minimum <= value <= maximum or (integer and value != int(value)):  # NaN is in no range
            raise InputError(f"{label} must be {allowed}, not {short(value)}.")

    return check


def text(max_chars: int, required: bool = False) -> Check:
    """A string of at most `max_chars` characters (non-blank if `required`)."""

    def check(label: str, value: Any, request: Request) -> None:
        if not isinstance(value, str) or (required and not value.strip()):
            raise InputError(f"{label} must be {'a non-empty' if required else 'a'} string, not {short(value)}.")
        if len(value) > max_chars:
            raise InputError(f"{label} has {len(value):,} characters; this server takes at most {max_chars:,}.")

    return check


def one_of(options: Callable[[], Iterable[str]] | Iterable[str]) -> Check:
    """One of `options` (or of what `options()` returns for the request)."""

    def check(label: str, value: Any, request: Request) -> None:
        allowed = list(options() if callable(options) else options)
        if not isinstance(value, str) or value not in allowed:
            raise InputError(f"{label} must be one of {', '.join(map(repr, allowed))}, not {short(value)}.")

    return check


def flag(label: str, value: Any, request: Request) -> None:
    """True or False."""
    if not isinstance(value, bool):
        raise InputError(f"{label} must be true or false, not {short(value)}.")


def strings(max_items: int, max_chars: int) -> Check:
    """A list of at most `max_items` strings of at most `max_chars` characters each."""

    def check(label: str, value: Any, request: Request) -> None:
        if not isinstance(value, list) or len(value) > max_items or not all(
                isinstance(v, str) and len(v) <= max_chars for v in value):
            raise InputError(f"{label} must be a list of at most {max_items} strings, not {short(value)}.")

    return check


def checkpoint(catalog: Any, family: gr.components.Component, optional: bool = False) -> Check:
    """A Checkpoint box's value: one of the `catalog`'s choices for the request's `family` ("" too, if
    `optional`: the family's default)."""

    def check(label: str, value: Any, request: Request) -> None:
        text(200, required=not optional)(label, value, request)
        if value:
            catalog.source(request[family], value)

    return check


def example(count: int) -> Check:
    """The index of one of `count` examples."""
    return number(0, count - 1, integer=True)


def message(uploads: Any, max_chars: int, max_files: int) -> Check:
    """A MultimodalTextbox's value: {"text": str, "files": [uploads of this session]} within the caps."""

    def check(label: str, value: Any, request: Request) -> None:
        if value is None:
            return
        if not isinstance(value, dict) or not set(value) <= {"text", "files"}:
            raise InputError(f'{label} must be {{"text": "...", "files": [...]}}, not {short(value)}.')
        text(max_chars)(label, value.get("text") or "", request)
        files = value.get("files") or []
        if not isinstance(files, list) or len(files) > max_files:
            raise InputError(f"{label} may carry at most {max_files} files, as a list, not {short(files)}.")
        for file in files:
            uploads.use(request.session, file)

    return check


def media_file(uploads: Any, kinds: tuple[str, ...]) -> Check:
    """None, or an upload of this session of one of `kinds` ("image", "video")."""

    def check(label: str, value: Any, request: Request) -> None:
        if value is not None:
            uploads.use(request.session, value, kinds)

    return check


def shown(x: float) -> str:
    """A bound as a message shows it: 4,294,967,295, 0.001."""
    return f"{int(x):,}" if x == int(x) else f"{x:g}"


def short(value: Any, limit: int = 60) -> str:
    """`value` as a short repr for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"

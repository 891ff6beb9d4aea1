"""The chat tab: pick a family and checkpoint, upload images or a video, watch the answer stream.

Per-user state (turns, shown messages, cancel event) is a `ChatState` in the Gradio session; the
models are shared through the SessionManager. Also registers the `/chat` API endpoint. Every input is
registered with its check (vlm/ui/validation.py) and the events get the raw, checked values.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from ..boxes import relative_frame, strip_markup
from ..errors import VLMError
from ..session import SessionManager, Snapshot, format_bytes
from . import validation as check
from .checkpoints import Catalog, is_tiny, label
from .logs import record, refusal
from .turns import ChatState, Turn, answer_messages, draw_boxes, error_text, user_turn
from .uploads import Uploads
from .validation import Gate
from .zerogpu import gpu_stream

UPDATE_SECONDS = 0.05  # the answer is redrawn at most 20 times a second
DEFAULT_FPS = 2.0  # the Qwen2-VL reference's video sampling rate (qwen-vl-utils)
MAX_PIXELS = 12_845_056  # the largest image budget a request may ask for (the Qwen2-VL processor's default)
MAX_FPS = 60.0
MAX_SEED = 2**32 - 1
ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLES = [
    ("What is in this picture?", ["street.png"]),
    ("How many shapes are on the table, and what colours are they?", ["shapes.png"]),
    ("Describe the animal and where it is.", ["cat.png"]),
    ("What happens in this video?", ["bouncing_ball.mp4"]),
    ("What do these two pictures have in common?", ["street.png", "cat.png"]),
]
DROPPED = ("*The server closed your earlier session (unused for a while, or it was full), so it no longer "
           "remembers this chat: your question starts a new one.*")
GONE = ("The server closed your earlier session (unused for a while, or it was full) and no longer remembers "
        "this chat: ask your question again.")


class ChatTab:
    def __init__(self, manager: SessionManager, catalog: Catalog, families: list[str], gate: Gate, uploads: Uploads):
        self.manager, self.catalog, self.families = manager, catalog, families
        self.gate, self.uploads = gate, uploads
        self.stream = gpu_stream(self._stream)

    # ------------------------------------------------------------------------------------------ layout
    def build(self, demo: gr.Blocks) -> gr.Examples:
        """Lay out the tab inside `demo` and wire its events (the model loads when the page opens); returns
        its examples (their files are shared by every session)."""
        first = self.families[0]
        limits, gate = self.manager.limits, self.gate
        state = gr.State(ChatState())
        key = gate.field(gr.Textbox("", visible=False), check.text(32))  # the page's copy of its ChatState.key
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=560, elem_id="chatbot", buttons=["copy"],
                                     placeholder="Upload images or a video, ask a question, press Enter.")
                box = gate.field(gr.MultimodalTextbox(
                    label="Message", show_label=False, file_count="multiple", file_types=["image", "video"],
                    sources=["upload"], elem_id="chat-input",
                    placeholder="Ask about the images or the video (attach them with the clip)"),
                    check.message(self.uploads, limits.max_message_chars, limits.max_images + 1))
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False)  # on while answering
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
                examples = gr.Examples([[{"text": text, "files": [str(ASSETS / f) for f in files]}]
                                        for text, files in EXAMPLES],
                                       inputs=[box], label="Examples (made by assets/make_assets.py)")
                gate.field(examples.dataset, check.example(len(EXAMPLES)))
            with gr.Column(scale=2):
                family = gate.field(gr.Dropdown(self.families, value=first, label="Model family", elem_id="family"),
                                    check.one_of(self.families))
                checkpoint = gate.field(
                    gr.Dropdown(self.catalog.choices(first), value=self.catalog.default(first), label="Checkpoint",
                                elem_id="checkpoint", allow_custom_value=self.catalog.settings.custom_checkpoints),
                    check.checkpoint(self.catalog, family))
                status = gr.Markdown("Loading…", elem_id="model-status")
                unload = gr.Button("Unload this model", size="sm")
                system = gate.field(gr.Textbox("", label="System prompt", lines=2, elem_id="system",
                                               placeholder="Empty: the model's default"),
                                    check.text(limits.max_message_chars))
                with gr.Accordion("Sampling", open=False):
                    max_new_tokens = gate.slider(1, limits.max_new_tokens, min(256, limits.max_new_tokens), 1,
                                                 "Max new tokens", elem_id="max-new-tokens")
                    temperature = gate.slider(0, 2, 0, 0.01, "Temperature (0: greedy)", elem_id="temperature")
                    top_p = gate.slider(0.001, 1, 1, 0.001, "Top-p")
                    top_k = gate.slider(0, 200, 0, 1, "Top-k (0: off)")
                    repetition_penalty = gate.slider(0.8, 2, 1, 0.01, "Repetition penalty")
                    seed = gate.number_box(-1, 0, MAX_SEED, "Seed (-1: random)", integer=True, off=-1,
                                           elem_id="seed")
                with gr.Accordion("Images and video", open=False):
                    max_pixels = gate.number_box(0, 28 * 28, MAX_PIXELS, "Max pixels per image (0: the checkpoint's)",
                                                 integer=True, off=0)
                    fps = gate.number_box(DEFAULT_FPS, 0, MAX_FPS, "Video frames per second (0: every frame)")
                    num_frames = gate.number_box(0, 1, limits.max_frames, "Video frames (0: from fps)", integer=True,
                                                 off=0)
                with gr.Accordion("Thinking", visible=False) as thinking:
                    thinking_budget = gate.number_box(-1, 0, limits.max_new_tokens,
                                                      "Thinking budget in tokens (-1: no limit)", integer=True, off=-1)
        api_checkpoint = gate.field(gr.Textbox("", label="Checkpoint", visible=False),  # empty: the family's default
                                    check.checkpoint(self.catalog, family, optional=True))
        api_answer = gr.Textbox(label="Answer", visible=False)

        settings = [family, checkpoint, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                    max_pixels, fps, num_frames, thinking_budget]
        defaults = [max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, thinking_budget, thinking]
        private: dict[str, Any] = {"api_visibility": "private", "preprocess": False}
        generating = {**private, "concurrency_id": "chat",
                      "concurrency_limit": sum(self.manager.slots(name) for name in self.families)}
        enable = {"fn": lambda: (gr.MultimodalTextbox(interactive=True), gr.Button(interactive=False)),
                  "inputs": None, "outputs": [box, stop], **private}

        sent = box.submit(self.add_turn, [box, state, key], [box, chatbot, stop, key], **private)
        answered = sent.success(self.respond, [state, *settings], chatbot, **generating)
        answered.then(**enable)
        retried = regenerate.click(self.retry, [state, key], [box, chatbot, stop], **private)
        reanswered = retried.success(self.respond, [state, *settings], chatbot, **generating)
        reanswered.then(**enable)
        stop.click(self.stop, state, None, queue=False, **private)
        for clearing in (clear.click, chatbot.clear):
            clearing(self.clear, state, [box, chatbot, stop], cancels=[answered, reanswered], queue=False, **private)

        loading = {"fn": self.load_model, "inputs": [family, checkpoint], "outputs": [status, *defaults],
                   "concurrency_limit": None, **private}
        family.change(self.checkpoints, family, checkpoint, **private).then(**loading)
        checkpoint.input(**loading)
        unload.click(self.unload, family, status, **private)
        api_settings = [family, api_checkpoint, *settings[2:]]
        gr.Button(visible=False).click(self.api_chat, [box, *api_settings], api_answer, api_name="chat",
                                       **{**generating, "api_visibility": "public"})
        demo.load(**loading)
        return examples

    # ------------------------------------------------------------------------------------------ events
    def add_turn(self, message: dict[str, Any] | None, state: ChatState, key: str):
        """Append the user's message (text and files) to the chat, lock the input box and enable Stop.

        `key` is the page's copy of its session's key: when it differs, the server had dropped that session
        and the user is told that the chat starts again."""
        if state.busy:
            raise refusal("An answer is still being written; press Stop first.")
        text, paths = message_parts(message)
        try:
            user, shown = user_turn(text, paths)
            self.manager.check_text(state.conversation("", user))
        except VLMError as exc:
            raise refusal(str(exc)) from None
        if key and key != state.key:
            state.shown.append({"role": "assistant", "content": DROPPED})
        state.shown += shown
        state.turns.append(Turn(user, shown_at=len(state.shown)))
        state.cancel = threading.Event()  # Stop from now on stops this answer, even before it starts
        return (gr.MultimodalTextbox(value=None, interactive=False), list(state.shown), gr.Button(interactive=True),
                state.key)

    def retry(self, state: ChatState, key: str):
        """Forget the last answer so `respond` writes it again."""
        if state.busy:
            raise refusal("An answer is still being written; press Stop first.")
        if key and key != state.key:
            raise refusal(GONE)
        if not state.turns:
            raise refusal("Nothing to regenerate yet: ask a question first.")
        state.turns[-1].answer = None
        del state.shown[state.turns[-1].shown_at:]
        state.cancel = threading.Event()
        return gr.MultimodalTextbox(interactive=False), list(state.shown), gr.Button(interactive=True)

    def respond(self, state: ChatState, family: str, checkpoint: str, system: str, *settings: Any):
        """Stream the answer to the last turn into the chat (thinking, answer, stats, boxes, or the error)."""
        if not state.turns:
            return
        turn = state.turns[-1]
        state.busy = True
        try:
            stream = self.stream(family, self.catalog.source(family, checkpoint), state.conversation(system),
                                 request_options(*settings), cancel=state.cancel)
            for snap in stream:
                if not snap.done:
                    yield state.shown + answer_messages(snap)
                    continue
                if snap.error is not None:
                    record(snap.error)
                turn.answer = None if snap.error else snap.answer
                state.shown += answer_messages(snap, self.boxes(snap, state, family, request_options(*settings)))
                yield list(state.shown)
        finally:
            state.busy = False

    def stop(self, state: ChatState) -> None:
        state.cancel.set()

    def clear(self, state: ChatState, request: gr.Request):
        """Stop the answer, forget the chat and delete its uploads."""
        state.cancel.set()
        self.uploads.release(request.session_hash, state.paths())
        state.turns.clear()
        state.shown.clear()
        return gr.MultimodalTextbox(value=None, interactive=True), [], gr.Button(interactive=False)

    def checkpoints(self, family: str):
        return gr.Dropdown(choices=self.catalog.choices(family), value=self.catalog.default(family))

    def load_model(self, family: str, checkpoint: str, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """Load the chosen model (with progress) and show its defaults; a failure is a message, not a crash."""
        source = self.catalog.source(family, checkpoint)
        try:
            pipe = self.manager.get(family, source, lambda done, message: progress(done, desc=message))
        except Exception as exc:  # shown to the user; the rest of the app keeps working
            record(exc)
            message = f"⚠️ **Could not load {checkpoint}:** {error_text(exc)}"
            return message, *[gr.update()] * 6, gr.Number(value=-1), gr.Accordion(visible=False)
        d = pipe.defaults
        return (
            self.status_text(family, source),
            gr.Slider(value=min(d.max_new_tokens, self.manager.limits.max_new_tokens)),
            gr.Slider(value=d.temperature if d.do_sample else 0),
            gr.Slider(value=d.top_p),
            gr.Slider(value=d.top_k),
            gr.Slider(value=d.repetition_penalty),
            gr.Number(value=-1 if d.seed is None or not 0 <= d.seed <= MAX_SEED else d.seed),
            gr.Number(value=-1),
            gr.Accordion(visible=pipe.thinking is not None),
        )

    def unload(self, family: str) -> str:
        if self.manager.unload(family):
            return f"{family} unloaded; it loads again with the next question."
        return f"{family} was not loaded."

    def status_text(self, family: str, source: str) -> str:
        """Which model is ready, its estimated memory, and what is loaded against the budget."""
        loaded = self.manager.loaded()
        size = f" · ~{format_bytes(loaded[family].nbytes)}" if family in loaded else ""
        lines = [f"**{family}** ready: {label(source)}{size}"]
        if is_tiny(source):
            lines.append("⚠️ Random weights: the answers are gibberish (see the banner to use real weights).")
        total = format_bytes(sum(e.nbytes for e in loaded.values()))
        budget = f" of a {format_bytes(self.manager.budget)} budget" if self.manager.budget else ""
        lines.append(f"Loaded: {', '.join(loaded)} ({total}{budget})")
        return "\n\n".join(lines)

    def api_chat(self, message: dict[str, Any] | None, family: str, checkpoint: str, system: str,
                 max_new_tokens: float, temperature: float, top_p: float, top_k: float, repetition_penalty: float,
                 seed: float, max_pixels: float, fps: float, num_frames: float, thinking_budget: float
                 ) -> Iterator[str]:
        """One question (text and files) to one model (empty checkpoint: the family's); yields the answer so far."""
        settings = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, max_pixels, fps, num_frames,
                    thinking_budget)
        try:
            user, _ = user_turn(*message_parts(message))
        except VLMError as exc:
            raise refusal(str(exc)) from None
        conversation = ([{"role": "system", "content": system}] if system.strip() else []) + [user]
        source = self.catalog.source(family, checkpoint) if checkpoint else self.catalog.default_source(family)
        for snap in self.stream(family, source, conversation, request_options(*settings), cancel=threading.Event()):
            if snap.error is not None:
                record(snap.error)
                raise gr.Error(error_text(snap.error), print_exception=False)
            yield strip_markup(snap.answer)

    # ----------------------------------------------------------------------------------------- helpers
    def _stream(self, family: str, source: str, conversation: list[dict[str, Any]], options: dict[str, Any],
                cancel: threading.Event | None = None) -> Iterator[Snapshot]:
        generation = self.manager.generate(family, source, conversation, cancel, **options)
        try:
            yield from generation.updates(UPDATE_SECONDS)
        finally:
            generation.cancel()
            generation.join()

    def boxes(self, snap: Snapshot, state: ChatState, family: str, options: dict[str, Any]) -> tuple[gr.Image, ...]:
        """The last image of the chat with the answer's boxes drawn, if the answer has boxes (in the family's
        coordinates: Qwen2.5-VL's are pixels of the image as resized with the request's `max_pixels`)."""
        images = state.images()
        if not images or snap.error is not None:
            return ()
        loaded = self.manager.loaded().get(family)
        frame = getattr(loaded.pipeline, "box_frame", relative_frame) if loaded else relative_frame
        media = {k: options[k] for k in ("min_pixels", "max_pixels") if options.get(k)}
        drawn = draw_boxes(snap.answer, images[-1], functools.partial(frame, **media))
        return (gr.Image(drawn, label="Boxes in the answer"),) if drawn is not None else ()


def message_parts(message: dict[str, Any] | None) -> tuple[str, list[str]]:
    """The text and the file paths of a MultimodalTextbox's value (checked by the gate)."""
    message = message or {}
    return message.get("text") or "", [os.path.realpath(file["path"]) for file in message.get("files") or []]


def request_options(max_new_tokens: float, temperature: float, top_p: float, top_k: float, repetition_penalty: float,
                    seed: float, max_pixels: float, fps: float, num_frames: float, thinking_budget: float
                    ) -> dict[str, Any]:
    """Generation options from the settings: temperature 0 is greedy decoding, a seed or budget of -1 and
    media settings of 0 leave the choice to the checkpoint."""
    options: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens), "do_sample": temperature > 0, "top_p": float(top_p),
        "top_k": int(top_k), "repetition_penalty": float(repetition_penalty),
        "seed": int(seed) if seed >= 0 else None,
        "max_pixels": int(max_pixels) if max_pixels else None, "fps": float(fps) if fps else None,
        "num_frames": int(num_frames) if num_frames else None,
    }
    if temperature > 0:
        options["temperature"] = float(temperature)
    if thinking_budget >= 0:
        options["thinking_budget"] = int(thinking_budget)
    return options

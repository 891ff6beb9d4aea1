"""The chat tab: pick a family and checkpoint, upload images or a video, watch the answer stream.

Per-user state (turns, shown messages, cancel event) is a `ChatState` in the Gradio session; the
models are shared through the SessionManager. Also registers the `/chat` API endpoint. Every input is
registered with its check (vlm/ui/validation.py) and the events get the raw, checked values.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from ..admission import fit_frame_rate
from ..boxes import relative_frame, strip_markup
from ..cost import PrefillRate, estimate, fit
from ..errors import VLMError
from ..families import FAMILIES
from ..pipeline import MEDIA_OPTIONS
from ..session import SessionManager, Snapshot, format_bytes
from . import validation as check
from .checkpoints import Catalog, is_tiny, label
from .logs import record, refusal
from .turns import (ChatState, Turn, animated_note, answer_messages, cost_text, draw_boxes, error_text, text_only,
                    user_turn)
from .uploads import Uploads, media_kind
from .validation import Gate
from .zerogpu import gpu_stream

UPDATE_SECONDS = 0.05  # the answer is redrawn at most 20 times a second
DEFAULT_FPS = 2.0  # the Qwen2-VL reference's video sampling rate (qwen-vl-utils)
DEFAULT_FRAMES = 16  # the number of frames offered when the video is sampled by count
MAX_PIXELS = 12_845_056  # the largest image budget a request may ask for (the Qwen2-VL processor's default)
MIN_FPS, MAX_FPS = 0.01, 60.0
MAX_SEED = 2**32 - 1
BY_RATE, BY_COUNT = "frames per second", "number of frames"  # how a video is sampled (one control decides)
ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLES = [
    ("What is in this picture?", ["street.png"]),
    ("How many shapes are on the table, and what colours are they?", ["shapes.png"]),
    ("Describe the animal and where it is.", ["cat.png"]),
    ("What happens in this video?", ["bouncing_ball.mp4"]),
    ("What do these two pictures have in common?", ["street.png", "cat.png"]),
]
TEXT_EXAMPLES = [  # for families that read text only
    "Write a haiku about a bicycle in the rain.",
    "Explain in three sentences how a rainbow forms.",
    "Give me three names for a bakery that sells only bread.",
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
        self.rates: dict[str, PrefillRate] = {}  # prompt tokens per second to the first token, per family

    # ------------------------------------------------------------------------------------------ layout
    def build(self, demo: gr.Blocks) -> list[gr.Examples]:
        """Lay out the tab inside `demo` and wire its events (the model loads when the page opens); returns
        its examples (their files are shared by every session)."""
        first = self.families[0]
        limits, gate = self.manager.limits, self.gate
        state = gr.State(ChatState())
        key = gate.field(gr.Textbox("", visible=False), check.text(32))  # the page's copy of its ChatState.key
        with gr.Row(elem_id="chat-row"):
            with gr.Column(scale=3, elem_id="chat-main"):
                chatbot = gr.Chatbot(label="Chat", height=560, elem_id="chatbot", buttons=["copy"],
                                     placeholder=chat_placeholder(first))
                box = gate.field(gr.MultimodalTextbox(
                    label="Message", show_label=False, file_count="multiple", file_types=["image", "video"],
                    elem_id="chat-input", **composer(first)),
                    check.message(self.uploads, limits.max_message_chars, limits.max_images + 1))
                with gr.Row(visible=False) as cost_row:
                    cost = gr.Markdown("", elem_id="cost")
                    fit_button = gr.Button("Fit", elem_id="fit", size="sm", scale=0, min_width=160, visible=False)
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False)  # on while answering
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
                takes_media = bool(FAMILIES[first].media)
                media_examples = gr.Examples([[{"text": text, "files": [str(ASSETS / f) for f in files]}]
                                              for text, files in EXAMPLES], inputs=[box], label="Examples",
                                             elem_id="media-examples", visible=takes_media)
                text_examples = gr.Examples([[{"text": text, "files": []}] for text in TEXT_EXAMPLES], inputs=[box],
                                            label="Examples", elem_id="text-examples", visible=not takes_media)
                gate.field(media_examples.dataset, check.example(len(EXAMPLES)))
                gate.field(text_examples.dataset, check.example(len(TEXT_EXAMPLES)))
            with gr.Column(scale=2, elem_id="chat-settings"):
                family = gate.field(gr.Dropdown(self.families, value=first, label="Model family", elem_id="family"),
                                    check.one_of(self.families))
                checkpoint = gate.field(
                    gr.Dropdown(self.catalog.choices(first), value=self.catalog.default(first), label="Checkpoint",
                                elem_id="checkpoint", allow_custom_value=self.catalog.settings.custom_checkpoints),
                    check.checkpoint(self.catalog, family))
                status = gr.Markdown(f"Loading {first}…", elem_id="model-status")
                unload = gr.Button("Unload this model", size="sm", elem_id="unload")
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
                with gr.Accordion("Images and video", open=False, visible=takes_media) as media_settings:
                    max_pixels = gate.number_box(0, 28 * 28, MAX_PIXELS, "Max pixels per image (0: the checkpoint's)",
                                                 integer=True, off=0, elem_id="max-pixels")
                    sampling = gate.field(gr.Radio([BY_RATE, BY_COUNT], value=BY_RATE, label="Sample the video by",
                                                   elem_id="video-sampling"), check.one_of([BY_RATE, BY_COUNT]))
                    # Only the chosen one is sent (a number of frames > 0 wins over the rate), and a rate that would
                    # take more frames than the server's cap is lowered for that video: the defaults always work.
                    fps = gate.number_box(DEFAULT_FPS, MIN_FPS, MAX_FPS, "Frames per second (0: the checkpoint's)",
                                          off=0, elem_id="fps")
                    num_frames = gate.number_box(0, 1, limits.max_frames,
                                                 f"Number of frames (at most {limits.max_frames})", integer=True,
                                                 off=0, elem_id="num-frames", visible=False)
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
        slots = [self.manager.slots(name) for name in self.families]  # None: what a family's KV budget holds
        generating = {**private, "concurrency_id": "chat", "concurrency_limit": None if None in slots else sum(slots)}
        enable = {"fn": lambda: (gr.MultimodalTextbox(interactive=True), gr.Button(interactive=False)),
                  "inputs": None, "outputs": [box, stop], **private}
        showing = {"fn": self.show_status, "inputs": [family, checkpoint], "outputs": status,
                   "show_progress": "hidden", **private}
        costing = {"fn": self.cost, "inputs": [state, box, *settings], "outputs": [cost_row, cost, fit_button],
                   "concurrency_id": "cost", "concurrency_limit": 2, "trigger_mode": "always_last",
                   "show_progress": "hidden", **private}

        sent = box.submit(self.add_turn, [box, state, key, family], [box, chatbot, stop, key], **private)
        answered = sent.success(self.respond, [state, *settings], chatbot, **generating)
        answered.then(**enable).then(**showing)
        retried = regenerate.click(self.retry, [state, key], [box, chatbot, stop], **private)
        reanswered = retried.success(self.respond, [state, *settings], chatbot, **generating)
        reanswered.then(**enable).then(**showing)
        stop.click(self.stop, state, None, queue=False, **private)
        for clearing in (clear.click, chatbot.clear):
            clearing(self.clear, state, [box, chatbot, stop], cancels=[answered, reanswered], queue=False, **private)

        loading = {"fn": self.load_model, "inputs": [family, checkpoint], "outputs": [status, *defaults],
                   "concurrency_limit": None, **private}
        adapting = [chatbot, box, media_examples.dataset, text_examples.dataset, media_settings, thinking, status]
        family.change(self.switch_family, family, [checkpoint, *adapting], **private).then(**loading).then(**costing)
        checkpoint.input(**loading).then(**costing)
        unload.click(self.unload, family, status, **private)
        sampling.input(self.sampling_mode, [sampling, num_frames], [fps, num_frames], **private)
        for control in (box, system, max_new_tokens, max_pixels, fps, num_frames):
            control.change(**costing)
        fitting = fit_button.click(self.fit, [state, box, *settings],
                                   [media_settings, max_pixels, sampling, fps, num_frames], **private)
        fitting.then(**costing)  # the controls' own change events are not sure to fire: they mount as the settings open
        api_settings = [family, api_checkpoint, *settings[2:]]
        gr.Button(visible=False).click(self.api_chat, [box, *api_settings], api_answer, api_name="chat",
                                       **{**generating, "api_visibility": "public"})
        demo.load(**loading)
        return [media_examples, text_examples]

    # ------------------------------------------------------------------------------------------ events
    def add_turn(self, message: dict[str, Any] | None, state: ChatState, key: str, family: str):
        """Append the user's message (text and files) to the chat, lock the input box and enable Stop.

        `key` is the page's copy of its session's key: when it differs, the server had dropped that session
        and the user is told that the chat starts again. Media a family does not read are refused here."""
        if state.busy:
            raise refusal("An answer is still being written; press Stop first.")
        text, paths = message_parts(message)
        try:
            user, shown = user_turn(text, paths)
            conversation = state.conversation("", user)
            self.manager.check_text(conversation)
            text_only(family, FAMILIES[family].media, conversation, self.media_families())
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
            notes = animated_note([p["path"] for p in turn.user["content"] if p["type"] == "image"])
            for snap in stream:
                if not snap.done:
                    yield state.shown + answer_messages(snap)
                    continue
                if snap.error is not None:
                    record(snap.error)
                turn.answer = None if snap.error else snap.answer
                self.measured(state, family, snap)
                if notes and snap.stats is not None:
                    snap = dataclasses.replace(snap, stats=dataclasses.replace(snap.stats,
                                                                               notes=snap.stats.notes + notes))
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

    def switch_family(self, family: str):
        """The family's checkpoints, the composer, examples and settings for what it reads, and a status that
        says it is loading (not the last family's "ready")."""
        takes = FAMILIES[family].media
        return (gr.Dropdown(choices=self.catalog.choices(family), value=self.catalog.default(family)),
                gr.Chatbot(placeholder=chat_placeholder(family)), gr.MultimodalTextbox(**composer(family)),
                gr.Dataset(visible=bool(takes)),
                gr.Dataset(visible=not takes), gr.Accordion(visible=bool(takes)), gr.Accordion(visible=False),
                f"Loading {family}…")

    def sampling_mode(self, mode: str, num_frames: float):
        """Show the one number that decides how a video is sampled; a hidden frame count is 0 (not sent)."""
        by_count = mode == BY_COUNT
        frames = (num_frames or min(DEFAULT_FRAMES, self.manager.limits.max_frames)) if by_count else 0
        return gr.Number(visible=not by_count), gr.Number(value=frames, visible=by_count)

    def load_model(self, family: str, checkpoint: str, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """Load the chosen model (with progress) and show its defaults; a failure is a message, not a crash."""
        source = self.catalog.source(family, checkpoint)
        try:
            pipe = self.manager.get(family, source, lambda done, message: progress(done, desc=message))
        except Exception as exc:  # shown to the user; the rest of the app keeps working
            record(exc)
            message = f"⚠️ **Could not load {checkpoint}:** {error_text(exc)}"
            return message, *[gr.update()] * 6, gr.Number(value=-1), gr.Accordion(visible=False)
        thinks = getattr(pipe, "thinks", pipe.thinking is not None)  # a remote client: its family's format
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
            gr.Accordion(visible=thinks),
        )

    def unload(self, family: str) -> str:
        if self.manager.unload(family):
            return f"{family} unloaded; it loads again with the next question."
        return f"{family} was not loaded."

    def show_status(self, family: str, checkpoint: str) -> str:
        """The status after an answer: what is loaded now (the answer may have loaded it again)."""
        source = self.catalog.source(family, checkpoint)
        loaded = self.manager.loaded().get(family)
        if family in self.catalog.settings.remote or (loaded is not None and loaded.source == source):
            return self.status_text(family, source)
        return f"{family} is not loaded; it loads with the next question."

    # ------------------------------------------------------------------------------------------ cost
    def cost(self, state: ChatState, message: dict[str, Any] | None, family: str, checkpoint: str, system: str,
             *settings: Any):
        """What the question in the composer will cost, shown as soon as media is attached: visual tokens per
        image and video and in total, the prompt, the context left, the time to the first token (from the
        prefill rate measured here), and a Fit button when the prompt is over the budget."""
        hidden = gr.Row(visible=False), "", gr.Button(visible=False)
        text, paths = message_parts(message)
        if not paths:
            return hidden
        pipe = self.pipeline(family, checkpoint)
        if pipe is None:
            return gr.Row(visible=True), "*The cost is shown once the model is loaded.*", gr.Button(visible=False)
        try:
            conversation, options, note = self.planned(state, text, paths, family, system, settings)
            found = estimate(pipe, conversation, **media_options(options))
        except VLMError as exc:
            return gr.Row(visible=True), f"⚠️ {error_text(exc)}", gr.Button(visible=False)
        budget = self.budget(pipe, options)
        notes = ((note,) if note else ()) + animated_note([p for p in paths if media_kind(p) == "image"])
        rate = self.rates.setdefault(family, PrefillRate()).value
        text = cost_text(found, budget, rate, state.cached_tokens if state.turns else None, notes)
        return gr.Row(visible=True), text, gr.Button(f"Fit to {budget:,} tokens", visible=found.prompt_tokens > budget)

    def fit(self, state: ChatState, message: dict[str, Any] | None, family: str, checkpoint: str, system: str,
            *settings: Any):
        """Lower max pixels and the video's frames until the question fits the budget (one click); the settings
        open to show what changed (a closed accordion's controls are not on the page and would miss the values)."""
        text, paths = message_parts(message)
        pipe = self.pipeline(family, checkpoint)
        if pipe is None or not paths:
            raise refusal("Attach an image or a video first (and wait for the model to load).")
        try:
            conversation, options, _ = self.planned(state, text, paths, family, system, settings)
            fitted, _ = fit(pipe, conversation, self.budget(pipe, options), **media_options(options))
        except VLMError as exc:
            raise refusal(error_text(exc)) from None
        frames = fitted.get("num_frames")
        counted = (gr.Radio(value=BY_COUNT), gr.Number(visible=False), gr.Number(value=frames, visible=True))
        return (gr.Accordion(open=True), gr.Number(value=fitted.get("max_pixels") or 0),
                *(counted if frames else [gr.skip()] * 3))

    def planned(self, state: ChatState, text: str, paths: list[str], family: str, system: str,
                settings: tuple[Any, ...]) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
        """The conversation the question would make, the request options it would be sent with (videos
        sampled within the frame cap), and the note saying what the cap changed."""
        user, _ = user_turn(text, paths)
        conversation = state.conversation(system, user)
        text_only(family, FAMILIES[family].media, conversation, self.media_families())
        options, note = fit_frame_rate(conversation, request_options(*settings), self.manager.limits.max_frames)
        self.manager.check(conversation, options)
        return conversation, options, note

    def budget(self, pipe: Any, options: dict[str, Any]) -> int:
        """The prompt tokens a question may take: the server's prompt budget, and what the context holds
        beside the answer's tokens."""
        return max(1, min(self.catalog.settings.prompt_budget, pipe.max_context - options["max_new_tokens"]))

    def pipeline(self, family: str, checkpoint: str) -> Any:
        """The family's loaded pipeline when it is the checkpoint asked for and can count tokens, else None."""
        loaded = self.manager.loaded().get(family)
        if loaded is None or loaded.source != self.catalog.source(family, checkpoint):
            return None
        return loaded.pipeline if hasattr(loaded.pipeline, "encode") else None

    def measured(self, state: ChatState, family: str, snap: Snapshot) -> None:
        """Learn the prefill rate from a finished answer, and what of this chat's prompt the model keeps."""
        stats = snap.stats
        if snap.error is not None or stats is None:
            state.cached_tokens = 0
            return
        if stats.seconds_to_first_token and stats.prefilled_tokens:
            self.rates.setdefault(family, PrefillRate()).add(stats.prefilled_tokens, stats.seconds_to_first_token)
        state.cached_tokens = (stats.prompt_tokens or 0) + stats.tokens

    def media_families(self) -> list[str]:
        """The families served here that read images and videos."""
        return [name for name in self.families if FAMILIES[name].media]

    def status_text(self, family: str, source: str) -> str:
        """Which model is ready, its estimated memory, and what is loaded against the budget."""
        loaded = self.manager.loaded()
        if self.manager.is_remote(family):
            size = " · served by a remote server"
        else:
            size = f" · ~{format_bytes(loaded[family].nbytes)}" if family in loaded else ""
        lines = [f"**{family}** ready: {label(source)}{size}"]
        if is_tiny(source):
            lines.append("⚠️ Random weights: the answers are gibberish (see the banner to use real weights).")
        if loaded:  # remote families hold no memory here
            total = format_bytes(sum(e.nbytes for e in loaded.values()))
            budget = f" of a {format_bytes(self.manager.budget)} budget" if self.manager.budget else ""
            lines.append(f"Loaded here: {', '.join(loaded)} ({total}{budget})")
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
        generation = self.manager.generate(family, source, conversation, cancel, fit_frames=True, **options)
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
    media settings of 0 leave the choice to the checkpoint; a number of frames wins over the video fps."""
    options: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens), "do_sample": temperature > 0, "top_p": float(top_p),
        "top_k": int(top_k), "repetition_penalty": float(repetition_penalty),
        "seed": int(seed) if seed >= 0 else None,
        "max_pixels": int(max_pixels) if max_pixels else None,
        "fps": float(fps) if fps and not num_frames else None,
        "num_frames": int(num_frames) if num_frames else None,
    }
    if temperature > 0:
        options["temperature"] = float(temperature)
    if thinking_budget >= 0:
        options["thinking_budget"] = int(thinking_budget)
    return options


def media_options(options: dict[str, Any]) -> dict[str, Any]:
    """The media settings of request options (what vlm.cost takes)."""
    return {k: options[k] for k in MEDIA_OPTIONS if options.get(k) is not None}


def chat_placeholder(family: str) -> str:
    """What the empty chat says to do with `family`."""
    if FAMILIES[family].media:
        return "Upload images or a video, ask a question, press Enter."
    return "Ask a question and press Enter."


def composer(family: str) -> dict[str, Any]:
    """The message box's attach button and placeholder for what `family` reads."""
    if FAMILIES[family].media:
        return {"sources": ["upload"], "placeholder": "Ask about the images or the video (attach them with the clip)"}
    return {"sources": [], "placeholder": f"Ask anything: {family} reads text only"}

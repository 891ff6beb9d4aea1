"""The chat tab: pick a family and checkpoint, upload images or a video, watch the answer stream.

Per-user state (turns, shown messages, cancel event) is a `ChatState` in the Gradio session; the
models are shared through the SessionManager. Also registers the `/chat` API endpoint.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from ..boxes import strip_markup
from ..errors import VLMError
from ..session import SessionManager, Snapshot, format_bytes
from .checkpoints import Catalog, is_tiny, label
from .turns import ChatState, Turn, answer_messages, draw_boxes, error_text, user_turn
from .uploads import uploads_only
from .zerogpu import gpu_stream

UPDATE_SECONDS = 0.05  # the answer is redrawn at most 20 times a second
DEFAULT_FPS = 2.0  # the Qwen2-VL reference's video sampling rate (qwen-vl-utils)
ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLES = [
    ("What is in this picture?", ["street.png"]),
    ("How many shapes are on the table, and what colours are they?", ["shapes.png"]),
    ("Describe the animal and where it is.", ["cat.png"]),
    ("What happens in this video?", ["bouncing_ball.mp4"]),
    ("What do these two pictures have in common?", ["street.png", "cat.png"]),
]


class ChatTab:
    def __init__(self, manager: SessionManager, catalog: Catalog, families: list[str]):
        self.manager, self.catalog, self.families = manager, catalog, families
        self.stream = gpu_stream(self._stream)

    # ------------------------------------------------------------------------------------------ layout
    def build(self, demo: gr.Blocks) -> None:
        """Lay out the tab inside `demo` and wire its events (the model loads when the page opens)."""
        first = self.families[0]
        limits = self.manager.limits
        state = gr.State(ChatState())
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=560, elem_id="chatbot", buttons=["copy"],
                                     placeholder="Upload images or a video, ask a question, press Enter.")
                box = uploads_only(gr.MultimodalTextbox(
                    label="Message", show_label=False, file_count="multiple", file_types=["image", "video"],
                    sources=["upload"], elem_id="chat-input",
                    placeholder="Ask about the images or the video (attach them with the clip)"))
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False)  # on while answering
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
                gr.Examples([[{"text": text, "files": [str(ASSETS / f) for f in files]}] for text, files in EXAMPLES],
                            inputs=[box], label="Examples (made by assets/make_assets.py)")
            with gr.Column(scale=2):
                family = gr.Dropdown(self.families, value=first, label="Model family", elem_id="family")
                checkpoint = gr.Dropdown(self.catalog.choices(first), value=self.catalog.default(first),
                                         label="Checkpoint", elem_id="checkpoint",
                                         allow_custom_value=self.catalog.settings.custom_checkpoints)
                status = gr.Markdown("Loading…", elem_id="model-status")
                unload = gr.Button("Unload this model", size="sm")
                system = gr.Textbox("", label="System prompt", lines=2, placeholder="Empty: the model's default",
                                    elem_id="system")
                with gr.Accordion("Sampling", open=False):
                    max_new_tokens = gr.Slider(1, limits.max_new_tokens, value=min(256, limits.max_new_tokens),
                                               step=1, label="Max new tokens", elem_id="max-new-tokens")
                    temperature = gr.Slider(0, 2, value=0, step=0.01, label="Temperature (0: greedy)",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.001, 1, value=1, step=0.001, label="Top-p")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0: off)")
                    repetition_penalty = gr.Slider(0.8, 2, value=1, step=0.01, label="Repetition penalty")
                    seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                with gr.Accordion("Images and video", open=False):
                    max_pixels = gr.Number(0, precision=0, minimum=0,
                                           label="Max pixels per image (0: the checkpoint's)")
                    fps = gr.Number(DEFAULT_FPS, minimum=0, label="Video frames per second (0: every frame)")
                    num_frames = gr.Number(0, precision=0, minimum=0, label="Video frames (0: from fps)")
                with gr.Accordion("Thinking", visible=False) as thinking:
                    thinking_budget = gr.Number(-1, precision=0, minimum=-1,
                                                label="Thinking budget in tokens (-1: no limit)")
        api_checkpoint = gr.Textbox("", label="Checkpoint", visible=False)  # empty: the family's default
        api_answer = gr.Textbox(label="Answer", visible=False)

        settings = [family, checkpoint, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                    max_pixels, fps, num_frames, thinking_budget]
        defaults = [max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, thinking_budget, thinking]
        private: dict[str, Any] = {"api_visibility": "private"}
        concurrency = self.manager.concurrency  # requests in a family's batch; None: what its KV budget holds
        generating = {**private, "concurrency_id": "chat",
                      "concurrency_limit": concurrency * len(self.families) if concurrency else None}
        enable = {"fn": lambda: (gr.MultimodalTextbox(interactive=True), gr.Button(interactive=False)),
                  "inputs": None, "outputs": [box, stop], **private}

        sent = box.submit(self.add_turn, [box, state], [box, chatbot, stop], **private)
        answered = sent.success(self.respond, [state, *settings], chatbot, **generating)
        answered.then(**enable)
        retried = regenerate.click(self.retry, state, [box, chatbot, stop], **private)
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

    # ------------------------------------------------------------------------------------------ events
    def add_turn(self, message: dict[str, Any] | None, state: ChatState):
        """Append the user's message (text and files) to the chat, lock the input box and enable Stop."""
        if state.busy:
            raise gr.Error("An answer is still being written; press Stop first.")
        try:
            user, shown = user_turn((message or {}).get("text") or "", files((message or {}).get("files")))
        except VLMError as exc:
            raise gr.Error(str(exc)) from None
        state.shown += shown
        state.turns.append(Turn(user, shown_at=len(state.shown)))
        return gr.MultimodalTextbox(value=None, interactive=False), list(state.shown), gr.Button(interactive=True)

    def retry(self, state: ChatState):
        """Forget the last answer so `respond` writes it again."""
        if state.busy:
            raise gr.Error("An answer is still being written; press Stop first.")
        if not state.turns:
            raise gr.Error("Nothing to regenerate yet: ask a question first.")
        state.turns[-1].answer = None
        del state.shown[state.turns[-1].shown_at:]
        return gr.MultimodalTextbox(interactive=False), list(state.shown), gr.Button(interactive=True)

    def respond(self, state: ChatState, family: str, checkpoint: str, system: str, *settings: Any):
        """Stream the answer to the last turn into the chat (thinking, answer, stats, boxes, or the error)."""
        if not state.turns:
            return
        turn = state.turns[-1]
        state.cancel = threading.Event()
        state.busy = True
        try:
            stream = self.stream(family, checkpoint, state.conversation(system), request_options(*settings),
                                 cancel=state.cancel)
            for snap in stream:
                if not snap.done:
                    yield state.shown + answer_messages(snap)
                    continue
                turn.answer = None if snap.error else snap.answer
                state.shown += answer_messages(snap, self.boxes(snap, state))
                yield list(state.shown)
        finally:
            state.busy = False

    def stop(self, state: ChatState) -> None:
        state.cancel.set()

    def clear(self, state: ChatState):
        state.cancel.set()
        state.turns.clear()
        state.shown.clear()
        return gr.MultimodalTextbox(value=None, interactive=True), [], gr.Button(interactive=False)

    def checkpoints(self, family: str):
        return gr.Dropdown(choices=self.catalog.choices(family), value=self.catalog.default(family))

    def load_model(self, family: str, checkpoint: str, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """Load the chosen model (with progress) and show its defaults; a failure is a message, not a crash."""
        try:
            pipe = self.manager.get(family, checkpoint, lambda done, message: progress(done, desc=message))
        except Exception as exc:  # shown to the user; the rest of the app keeps working
            message = f"⚠️ **Could not load {label(checkpoint)}:** {error_text(exc)}"
            return message, *[gr.update()] * 6, gr.Number(value=-1), gr.Accordion(visible=False)
        d = pipe.defaults
        return (
            self.status_text(family, checkpoint),
            gr.Slider(value=min(d.max_new_tokens, self.manager.limits.max_new_tokens)),
            gr.Slider(value=d.temperature if d.do_sample else 0),
            gr.Slider(value=d.top_p),
            gr.Slider(value=d.top_k),
            gr.Slider(value=d.repetition_penalty),
            gr.Number(value=-1 if d.seed is None else d.seed),
            gr.Number(value=-1),
            gr.Accordion(visible=pipe.thinking is not None),
        )

    def unload(self, family: str) -> str:
        if self.manager.unload(family):
            return f"{family} unloaded; it loads again with the next question."
        return f"{family} was not loaded."

    def status_text(self, family: str, checkpoint: str) -> str:
        """Which model is ready, its estimated memory, and what is loaded against the budget."""
        loaded = self.manager.loaded()
        size = f" · ~{format_bytes(loaded[family].nbytes)}" if family in loaded else ""
        lines = [f"**{family}** ready: {label(checkpoint)}{size}"]
        if is_tiny(checkpoint):
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
            user, _ = user_turn((message or {}).get("text") or "", files((message or {}).get("files")))
        except VLMError as exc:
            raise gr.Error(str(exc)) from None
        conversation = ([{"role": "system", "content": system}] if system.strip() else []) + [user]
        source = checkpoint or self.catalog.default(family)
        for snap in self.stream(family, source, conversation, request_options(*settings), cancel=threading.Event()):
            if snap.error is not None:
                raise gr.Error(error_text(snap.error))
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

    def boxes(self, snap: Snapshot, state: ChatState) -> tuple[gr.Image, ...]:
        """The last image of the chat with the answer's boxes drawn, if the answer has boxes."""
        images = state.images()
        drawn = draw_boxes(snap.answer, images[-1]) if images and snap.error is None else None
        return (gr.Image(drawn, label="Boxes in the answer"),) if drawn is not None else ()


def files(items: list[Any] | None) -> list[str]:
    """Paths of the files a MultimodalTextbox (or an API client) sent."""
    return [item if isinstance(item, str) else item["path"] for item in items or []]


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

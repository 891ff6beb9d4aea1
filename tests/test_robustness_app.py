"""The demo under hostile use (issue #8): cancellation ends threads, one user's failure or out-of-memory
does not touch another, a bounded soak of concurrent users, and the web surface (file routes, upload
size, URL-shaped input), against tiny checkpoints on loopback.

The app is built and launched in this process (as app.py does, through vlm.ui.build / vlm.ui.launch)
so that its threads and memory can be counted. test_app.py drives the same app in a browser.
"""

from __future__ import annotations

import ctypes
import gc
import http.client
import http.server
import json
import os
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from PIL import Image

import vlm.conversation
import vlm.errors
import vlm.engine.engine
import vlm.media
import vlm.pipeline
import vlm.tiny
from tests.app_client import Api, free_port
from tests.endless import endless_qwen2_vl
from vlm.session import SessionManager
from vlm.ui import Settings, build, launch
from vlm.ui.checkpoints import label

ROOT = Path(__file__).resolve().parents[1]
QUEUE_SIZE = 4
USERS = 2 * QUEUE_SIZE
SOAK_REQUESTS = 200
SESSIONS = 20  # Gradio sessions kept (each API call is one): the soak's warm-up fills them
UPLOADS_TOTAL_MB = 40
HEADER_SECONDS = 2
CONNECTIONS = 64

pytestmark = pytest.mark.timeout(600)


def steady_allocator() -> None:
    """glibc malloc without its moving mmap threshold and with two arenas (MALLOC_MMAP_THRESHOLD_=131072,
    MALLOC_ARENA_MAX=2 for this process from now on), so that resident memory measures what is kept,
    not heap fragmentation."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-8, 2)  # M_ARENA_MAX


def vlm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("vlm-", "vlm_"))]


def chat(text: str, files: list[dict] = (), max_new_tokens: int = 4, checkpoint: str = "",
         family: str = "qwen2_vl") -> list:
    """The /chat endpoint's inputs: message, family, checkpoint, system, then the sampling and media settings."""
    return [{"text": text, "files": list(files)}, family, checkpoint, "", max_new_tokens, 0, 1, 0, 1, -1, 0, 2.0, 0, -1]


def stored(file: dict) -> Path:
    """Where the app keeps an upload (clients name it relative to its upload directory)."""
    return Path(os.environ["GRADIO_TEMP_DIR"]) / file["path"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The demo on a free loopback port: tiny Qwen2-VL (never-ending answers) and GroupViT, a queue of
    QUEUE_SIZE, two generations at once, 1 MB uploads (3 MB per session, UPLOADS_TOTAL on disk, in a
    Gradio directory of its own), SESSIONS sessions kept, HEADER_SECONDS for a request's headers and
    CONNECTIONS open connections."""
    env = {"VLM_TINY": "1", "VLM_FAMILIES": "qwen2_vl,groupvit", "VLM_CACHE_DIR": str(tmp_path_factory.mktemp("tiny")),
           "VLM_MODEL_QWEN2_VL": str(endless_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))),
           "VLM_QUEUE_SIZE": str(QUEUE_SIZE), "VLM_CONCURRENCY": "2", "VLM_MAX_FILE_SIZE": "1mb",
           "VLM_SESSION_UPLOADS": "3mb", "VLM_UPLOADS_TOTAL": f"{UPLOADS_TOTAL_MB}mb",
           "VLM_HEADER_SECONDS": str(HEADER_SECONDS), "VLM_MAX_CONNECTIONS": str(CONNECTIONS),
           "VLM_DEVICE": "cpu", "VLM_DTYPE": "float32", "VLM_SESSION_CAPACITY": str(SESSIONS)}
    settings = Settings.from_env(env)
    steady_allocator()
    limits, pillow_limit = vlm.media.current_limits(), Image.MAX_IMAGE_PIXELS
    gradio_dir = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))  # uploads: nobody else's
    demo = build(settings)
    port = free_port()
    launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    api = Api(f"http://127.0.0.1:{port}/")
    api.demo, api.checkpoint = demo, label(env["VLM_MODEL_QWEN2_VL"])
    assert api.call("chat", chat("warm up"))[0] == "answer"  # the model is loaded
    yield api
    demo.close()
    vlm.media.configure(limits)
    Image.MAX_IMAGE_PIXELS = pillow_limit
    if gradio_dir is None:
        os.environ.pop("GRADIO_TEMP_DIR")
    else:
        os.environ["GRADIO_TEMP_DIR"] = gradio_dir


def test_media_limits_come_from_the_settings(app):
    settings = Settings.from_env({"VLM_MAX_FILE_SIZE": "10 MB", "VLM_MAX_VIDEO_RESOLUTION": "1920x1080",
                                  "VLM_MAX_VIDEO_SECONDS": "600", "VLM_MAX_VIDEO_FRAMES": "9000",
                                  "VLM_MAX_IMAGE_PIXELS": "1000000", "VLM_DECODE_SECONDS": "30",
                                  "VLM_CONTEXT_OVERFLOW": "error", "VLM_SESSION_CAPACITY": "50"})
    assert settings.media == vlm.media.MediaLimits(max_image_pixels=1_000_000, max_video_bytes=10 * 2**20,
                                                   max_video_seconds=600, max_video_pixels=1920 * 1080,
                                                   max_video_frames=9000, decode_seconds=30)
    assert settings.limits.context_overflow == "error" and Settings.from_env({}).limits.context_overflow == "truncate"
    assert settings.sessions.capacity == 50 and Settings.from_env({}).sessions.capacity == 1000
    for bad in ({"VLM_MAX_FILE_SIZE": "ten"}, {"VLM_MAX_VIDEO_RESOLUTION": "4k"}, {"VLM_CONTEXT_OVERFLOW": "drop"}):
        with pytest.raises(ValueError):
            Settings.from_env(bad)
    # the running app (VLM_MAX_FILE_SIZE=1mb) configured vlm.media, and Pillow's own limit matches
    assert vlm.media.current_limits().max_video_bytes == 2**20
    assert Image.MAX_IMAGE_PIXELS * 2 == vlm.media.current_limits().max_image_pixels


# ------------------------------------------------------------------------------------------ generation
def test_stop_ends_the_generation_thread_within_a_second(tmp_path):
    manager = SessionManager(device="cpu", dtype="float32")
    source = str(endless_qwen2_vl(tmp_path / "q"))
    manager.get("qwen2_vl", source)
    baseline = threading.active_count()
    generation = manager.generate("qwen2_vl", source, [{"role": "user", "content": "Go on."}], max_new_tokens=2048)
    for snap in generation.updates(0.01):
        if len(snap.answer) > 20:
            break
    assert len(vlm_threads()) == 2 and threading.active_count() > baseline  # the session thread and the engine
    stopped = time.monotonic()
    generation.cancel()
    while vlm_threads() or threading.active_count() > baseline:
        assert time.monotonic() - stopped < 1.0, [t.name for t in threading.enumerate()]
        time.sleep(0.01)
    assert generation.snapshot().finish == "cancelled"


CLOSED_SECONDS = 5.0  # cancelled within a decode step and an update (~0.1 s); the rest is margin for a loaded
#                      machine (1.005 s was seen under load); the 2048 tokens asked for take over 10 s here


def test_closing_the_tab_ends_the_generation_thread_promptly(app):
    baseline = None
    for attempt in range(3):  # the first round lets Gradio's pool of worker threads reach its size
        event_id = app.submit("chat", chat("Tell me everything.", max_new_tokens=2048))
        updates = 0
        for kind, _ in app.events("chat", event_id):
            updates += kind == "generating"
            if updates == 5:
                break  # leaving the block closes the connection, as closing the tab does
        closed = time.monotonic()
        assert updates == 5 and vlm_threads()
        while vlm_threads() or (baseline is not None and len(_own_threads()) > baseline):
            assert time.monotonic() - closed < CLOSED_SECONDS, [t.name for t in threading.enumerate()]
            time.sleep(0.01)
        baseline = len(_own_threads()) if baseline is None else baseline


@pytest.fixture
def faults(monkeypatch):
    """Questions containing "explode" fail mid-answer; "oom" runs out of memory once per question."""
    stream = vlm.pipeline.ChatPipeline.stream

    def faulty(self, conversation, **options):
        text = json.dumps(conversation, default=str)
        for i, delta in enumerate(stream(self, conversation, **options)):
            if "explode" in text and i == 3:
                raise RuntimeError("boom")
            if "oom" in text:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            yield delta

    monkeypatch.setattr(vlm.pipeline.ChatPipeline, "stream", faulty)


def test_one_users_failure_does_not_affect_another(app, faults):
    results = {}

    def ask(name: str, text: str) -> None:
        results[name] = Api(app.url).call("chat", chat(text, max_new_tokens=40))

    users = [threading.Thread(target=ask, args=("a", "please explode")), threading.Thread(target=ask, args=("b", "hi"))]
    for user in users:
        user.start()
    for user in users:
        user.join(120)
    assert results["a"][0] == "error" and "boom" in json.dumps(results["a"][1])
    assert results["b"][0] == "answer" and len(results["b"][1][0]) > 0
    assert app.call("chat", chat("and again"))[0] == "answer"


def test_out_of_memory_is_a_message_and_the_next_request_works(app, faults):
    kind, message = app.call("chat", chat("oom please", max_new_tokens=40))
    assert kind == "error" and "ran out of memory" in json.dumps(message) and "fewer" in json.dumps(message)
    kind, answer = app.call("chat", chat("hello again", max_new_tokens=5))
    assert kind == "answer" and answer[0]
    assert not vlm_threads()


# ------------------------------------------------------------------------------------------------- load
def test_soak_concurrent_users_get_an_answer_or_busy_and_nothing_grows(app):
    """USERS (twice the queue) users stream SOAK_REQUESTS short answers in all: each ends with an answer
    or Gradio's queue-full message; no deadlock (every call has a deadline); threads and memory flat."""
    process = psutil.Process()
    outcomes: list[str] = []
    lock = threading.Lock()

    def user(count: int) -> None:
        client = Api(app.url)
        picture = client.upload(ROOT / "assets" / "shapes.png")
        for i in range(count):
            files = [picture] if i % 2 else []  # every other question is about an image
            kind, data = client.call("chat", chat(f"question {i}", files=files, max_new_tokens=3))
            assert kind in ("answer", "busy"), (kind, data)
            if kind == "busy":
                assert "Queue is full" in data
                time.sleep(0.05)
            with lock:
                outcomes.append(kind)

    def round_of(per_user: int) -> None:
        users = [threading.Thread(target=user, args=(per_user,), name=f"user-{i}") for i in range(USERS)]
        for t in users:
            t.start()
        for t in users:
            t.join(300)
            assert not t.is_alive(), "a request never ended (deadlock?)"

    def settled_rss() -> int:
        """Resident memory once garbage and free heap pages are given back (allocator noise removed) and the
        caches kept for follow-ups dropped (KV caches within VLM_KV_BUDGET_GB, vision features within 512 MB)."""
        time.sleep(0.5)
        for engine in list(vlm.engine.engine._engines):
            engine.clear()
            engine.model.features.clear()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return process.memory_info().rss

    per_round = SOAK_REQUESTS // USERS // 5  # five rounds: a warm-up (worker pool, caches), four measured
    round_of(per_round)
    threads, memory = len(_own_threads()), [settled_rss()]
    start = time.monotonic()
    for _ in range(4):
        round_of(per_round)
        memory.append(settled_rss())
    elapsed = time.monotonic() - start
    assert len(outcomes) == SOAK_REQUESTS
    print(f"soak: {outcomes.count('answer')} answers, {outcomes.count('busy')} busy in {elapsed:.1f} s; "
          f"RSS after each round (MB): {[round(m / 2**20) for m in memory]}")
    assert outcomes.count("answer") >= SOAK_REQUESTS // 4 and "busy" in outcomes, outcomes
    assert not vlm_threads()
    assert len(_own_threads()) <= threads + 2, [t.name for t in threading.enumerate()]
    assert len(app.demo.state_holder.session_data) <= SESSIONS  # one per API call, the oldest dropped
    grown = [round((m - memory[0]) / 2**20, 1) for m in memory]  # MB since the warm-up, after each round
    # keeping each decoded image (0.9 MB) would add ~17 MB a round; the engine's first rounds warm per-shape
    # kernel caches (ragged batches of two to four requests), which level off
    assert grown[-1] - grown[-3] < 12 and max(grown) < 60, f"RSS grew by {grown} MB"


def _own_threads() -> list[threading.Thread]:
    """Live threads, without AnyIO's worker pool (bounded, and grown on demand by request overlap)."""
    return [t for t in threading.enumerate() if t.name != "AnyIO worker thread"]


# -------------------------------------------------------------------------------------------------- web
def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` sent byte for byte (no client-side normalisation of '..' or escapes)."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("GET", path, skip_accept_encoding=True)
    connection.endheaders()
    response = connection.getresponse()
    return response.status, response.read()


def test_file_routes_serve_uploads_only(app, tmp_path):
    picture = tmp_path / "mine.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(picture)
    uploaded = app.upload(picture)["path"]  # relative to the upload directory, which clients never see
    assert not uploaded.startswith("/") and stored({"path": uploaded}).read_bytes() == picture.read_bytes()
    status, body = raw_get(app.url, f"/gradio_api/file={uploaded}")
    assert status == 200 and body == picture.read_bytes()  # the route works: what follows is refused by it

    cache = stored({"path": uploaded}).parents[1]
    secrets = ["/etc/passwd", "/proc/self/environ", str(ROOT / "app.py"), str(ROOT / "vlm" / "media.py"),
               str(Path.home() / ".cache" / "huggingface" / "token")]
    paths = []
    for secret in secrets:
        quoted = secret.replace("/", "%2F")
        paths += [f"/gradio_api/file={secret}", f"/gradio_api/file={quoted}", f"/gradio_api/file={quoted.replace('%', '%25')}",
                  f"/file={secret}", f"/gradio_api/file=/{secret}", f"/gradio_api/file={secret}%00.png"]
    paths += [f"/gradio_api/file={cache}/../../etc/passwd", f"/gradio_api/file={cache}/..%2F..%2F..%2Fetc%2Fpasswd",
              "/gradio_api/file=../../../../../../etc/passwd", "/gradio_api/file=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
              "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/gradio_api/file=\\etc\\passwd",
              f"/gradio_api/file={Path(uploaded).parent}/../../../../../etc/passwd",
              "/gradio_api/file=../../../../etc/passwd", f"/gradio_api/file={Path(uploaded).parent}/../../app.py",
              "/gradio_api/file=file:///etc/passwd", "/static/../../../../etc/passwd",
              "/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd"]
    for path in paths:
        status, body = raw_get(app.url, path)
        assert status >= 400 and b"root:x:0" not in body and b"import" not in body[:200], (path, status, body[:80])


def test_uploads_over_max_file_size_are_refused(app, tmp_path):
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(os.urandom(200_000))
    big.write_bytes(os.urandom(1_200_000))  # VLM_MAX_FILE_SIZE=1mb
    assert stored(app.upload(small)).read_bytes() == small.read_bytes()
    with open(big, "rb") as f:
        response = app.http.post("gradio_api/upload", files={"files": ("big.png", f)})
    assert response.status_code == 413
    cache = Path(os.environ["GRADIO_TEMP_DIR"])  # the app's own upload directory
    assert not [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]  # nothing kept


def test_no_response_names_a_server_directory(app, tmp_path):
    """The upload route, the page and its config, API answers (an overlay file), examples and streamed
    events name files relative to the upload directory, and never show the working directory."""
    directories = [os.environ["GRADIO_TEMP_DIR"], str(ROOT)]
    picture = noise_png(tmp_path / "seen.png", 64, seed=5)
    with open(picture, "rb") as f:
        upload = app.http.post("gradio_api/upload", files={"files": ("seen.png", f)})
    file = {"path": upload.json()[0], "meta": {"_type": "gradio.FileData"}}
    responses = [upload.text, app.http.get("/").text, app.http.get("config").text,
                 json.dumps(app.call("segment", [file, "cat, dog", "groupvit", "tiny random (groupvit)", 0.0, 0.5, True])),
                 json.dumps(app.event("load_example", [0]))]
    event_id = app.submit("chat", chat("Describe it.", files=[file], max_new_tokens=3))
    for kind, data in app.events("chat", event_id):
        responses.append(json.dumps(data))
        if kind in ("complete", "error"):
            break
    overlay = json.loads(responses[3])[1][0]
    assert app.http.get(overlay["url"]).status_code == 200  # the relative file URL serves the overlay
    for text in responses:
        assert not any(directory in text for directory in directories), text[:300]


class Listener(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        Listener.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"GIF89a")

    do_HEAD = do_POST = do_GET

    def log_message(self, *args):
        pass


def test_url_shaped_inputs_make_no_outbound_request(app):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        urls = [f"{base}/picture.png", f"{base}/clip.mp4"]
        file_data = [{"path": u, "url": u, "orig_name": u.rsplit("/", 1)[1], "meta": {"_type": "gradio.FileData"}}
                     for u in urls]
        outcomes = [app.call("chat", chat(f"Look at {urls[0]}", files=[f])) for f in file_data]
        outcomes.append(app.call("chat", chat("hi", checkpoint=f"{base}/model")))
        outcomes.append(app.call("chat", chat(urls[0], files=[{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}])))
        outcomes.append(app.call("segment", [file_data[0], "cat", "groupvit", "tiny random (groupvit)", 0.0, 0.5, True]))
        assert [kind for kind, _ in outcomes] == ["error"] * 5, outcomes
        for i in (0, 1, 4):  # refused by our components, for any host: Gradio would fetch public URLs
            assert "URLs are not fetched" in json.dumps(outcomes[i][1]), outcomes[i]
        assert "is not one of this server's qwen2_vl checkpoints" in json.dumps(outcomes[2][1])
        assert "root:x:0" not in json.dumps(outcomes)
        time.sleep(0.5)
        assert Listener.hits == []
        with pytest.raises(vlm.errors.InputError, match="URLs are not fetched"):
            vlm.conversation.normalize([{"role": "user", "content": [{"type": "image", "url": urls[0]}]}])
        with httpx.Client(trust_env=False) as direct:  # the listener does count requests that reach it
            direct.get(urls[0])
        assert Listener.hits == ["/picture.png"]
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------- errors reach the user
def test_hostile_uploads_end_with_their_message(app, tmp_path):
    bomb = tmp_path / "bomb.png"
    from tests.test_robustness_media import claim_size, make_video

    bomb.write_bytes(claim_size("PNG", 60000, 60000))
    eps = tmp_path / "drawing.png"
    Image.new("RGB", (4, 4)).save(eps, format="EPS")
    video = make_video(tmp_path / "cut.mp4", 20)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    expected = {bomb: "bomb.png is too large", eps: "drawing.png is not a supported image",
                truncated: "truncated.mp4 has no video stream"}
    for path, message in expected.items():
        kind, data = app.call("chat", chat("What is this?", files=[app.upload(path)]))
        assert kind == "error" and f'"{message}' in json.dumps(data), (path.name, kind, data)  # no server path
    kind, data = app.call("segment", [app.upload(bomb), "cat", "groupvit", "tiny random (groupvit)", 0.0, 0.5, True])
    assert kind == "error" and "too large" in json.dumps(data), data
    kind, data = app.call("chat", chat("   "))
    assert kind == "error" and "Type a question" in json.dumps(data)


def test_the_chat_shows_the_error_in_the_browser(app, tmp_path):
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    from tests.test_robustness_media import claim_size

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(claim_size("PNG", 60000, 60000))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(app.url)
            page.wait_for_selector("#model-status:has-text('ready')")
            page.set_input_files("#chat-input input[type=file]", str(bomb))
            page.wait_for_selector("#chat-input [aria-label='File thumbnail'], #chat-input img")
            page.fill("#chat-input textarea", "What is this?")
            page.press("#chat-input textarea", "Enter")
            page.wait_for_selector("#chatbot :text('Error')")
            assert "too large" in page.locator("#chatbot").inner_text()
            page.wait_for_function("!document.querySelector('#chat-input textarea').disabled", timeout=10_000)
        finally:
            browser.close()


# --------------------------------------------------------------------------------------------- sessions
def respond(user: Api, max_new_tokens: int = 3) -> list:
    """The page's respond event inputs (its state, then the settings): the app's Qwen2-VL, greedy."""
    return [None, "qwen2_vl", user.checkpoint, "", max_new_tokens, 0, 1, 0, 1, -1, 0, 2.0, 0, -1]


def user_texts(chatbot: list) -> list[str]:
    return [json.dumps(m["content"]) for m in chatbot if m["role"] == "user"]


def test_a_flood_of_new_sessions_keeps_a_real_users_chat(app):
    user = app.user()
    kind, out = user.event("add_turn", [{"text": "Remember the word kiwi.", "files": []}, None, "", "qwen2_vl"])
    assert kind == "answer", out
    key = out[3]
    assert user.event("respond", respond(user))[0] == "answer"
    for _ in range(3 * SESSIONS):  # empty /chat calls, each a session of its own (refused at once)
        assert app.user().call("chat", chat("   "))[0] == "error"
    assert len(app.demo.state_holder.session_data) <= SESSIONS
    kind, out = user.event("add_turn", [{"text": "Which word?", "files": []}, None, key, "qwen2_vl"])
    assert kind == "answer" and "closed your earlier session" not in json.dumps(out[1])
    texts = user_texts(out[1])
    assert len(texts) == 2 and "kiwi" in texts[0] and "Which word" in texts[1]  # the history is all there


def test_a_user_whose_session_was_dropped_is_told_so(app):
    user = app.user()
    kind, out = user.event("add_turn", [{"text": "First question.", "files": []}, None, "", "qwen2_vl"])
    key = out[3]
    app.demo.defences.sessions.end(user.session)  # as when it is unused for an hour, or its tab closed
    kind, out = user.event("add_turn", [{"text": "Second question.", "files": []}, None, key, "qwen2_vl"])
    assert kind == "answer" and "closed your earlier session" in json.dumps(out[1])
    assert len(user_texts(out[1])) == 1 and out[3] != key  # a new chat, with a key of its own
    kind, message = user.event("retry", [None, key])
    assert kind == "error" and "no longer remembers this chat" in json.dumps(message)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def policy():
    """Sessions(capacity 3, 20 KB of state beyond Gradio's part each, keep 600 s, idle 3600 s) on a real
    StateHolder, with a clock the test moves, and the sessions that ended."""
    import gradio as gr
    from gradio.state_holder import StateHolder

    from vlm.ui.sessions import SESSION_BYTES, SessionLimits, Sessions
    from vlm.ui.turns import ChatState, Turn

    clock = Clock()  # the policy's own: patching time.monotonic would move the clock of the app's event loop too
    with gr.Blocks() as blocks:
        state = gr.State(ChatState())
    holder = StateHolder()
    holder.set_blocks(blocks)
    ended: list[str] = []
    sessions = Sessions(SessionLimits(capacity=3, memory_bytes=3 * SESSION_BYTES + 60_000, keep_seconds=600,
                                      idle_seconds=3600), on_end=ended.append, clock=clock)
    sessions.install(holder)

    def use(session: str, text: str | None = None, busy: bool = False, after: float = 1.0) -> ChatState:
        """`session` used `after` seconds later; with `text`, its chat gains a turn of that text."""
        clock.now += after
        chat = holder[session][state._id]
        if text is not None:
            chat.turns.append(Turn({"role": "user", "content": text}, 0, "ok"))
        chat.busy = busy
        holder[session]  # a use after the change, as Gradio's next request of the session
        return chat

    return holder, sessions, use, clock, ended


def test_sessions_drop_empty_ones_first_and_never_a_recently_used_chat_for_a_new_one(policy):
    holder, sessions, use, clock, ended = policy
    use("a", "hello")
    use("b")
    use("c", "hi")
    use("d")  # a fourth: the empty "b" goes, not the older "a"
    assert list(holder.session_data) == ["a", "c", "d"] and ended == ["b"]
    use("e", "a question")  # "d" is empty: it goes
    assert sorted(holder.session_data) == ["a", "c", "e"]
    holder["f"]  # everyone holds a chat used within keep_seconds: the new session is refused, nothing lost
    assert {"a", "c", "e"} <= set(holder.session_data)
    with pytest.raises(vlm.errors.InputError, match="try again in a few minutes"):
        sessions.admit("f")
    holder["g"]  # the refused one makes room for the next one (refused too): never more than one over
    assert sorted(holder.session_data) == ["a", "c", "e", "g"] and "f" in ended
    clock.now += 600  # now "a", "c", "e" were last used over keep_seconds ago; "a" the longest
    use("h", "new", after=0)
    assert sorted(holder.session_data) == ["c", "e", "h"] and "a" in ended
    sessions.admit("h")


def test_sessions_never_drop_a_running_answer_and_end_after_idle_time(policy):
    holder, sessions, use, clock, ended = policy
    use("streaming", "tell me a story", busy=True)
    use("b", "x")
    use("c", "y")
    clock.now += 700
    use("d", "z", after=0)  # "streaming" is the least recently used, but its answer is being written
    assert "streaming" in holder.session_data and "b" in ended
    clock.now += 3601
    use("e", after=0)  # every other session is unused for over an hour: they end
    assert sorted(holder.session_data) == ["e", "streaming"] and {"c", "d"} <= set(ended)


def test_sessions_are_bounded_by_the_memory_their_state_holds(policy):
    holder, sessions, use, clock, ended = policy
    use("a", "x" * 50_000)
    clock.now += 700
    use("b", "y" * 50_000, after=0)
    use("c", "z" * 30_000)  # 130 KB of chats > 60 KB + a session's share: the long-unused "a" goes (under capacity)
    assert sorted(holder.session_data) == ["b", "c"] and ended == ["a"]


# ---------------------------------------------------------------------------------------------- uploads
def noise_png(path: Path, side: int, seed: int = 0) -> Path:
    """A PNG of random pixels (3 bytes a pixel: it does not compress), unlike any other file."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_an_upload_is_usable_only_by_the_session_that_uploaded_it(app, tmp_path):
    owner, other = app.user(), app.user()
    picture = owner.upload(noise_png(tmp_path / "private.png", 64))
    assert owner.call("chat", chat("What is this?", files=[picture]))[0] == "answer"
    for kind, data in [other.call("chat", chat("What is this?", files=[picture])),
                       other.call("segment", [picture, "cat", "groupvit", "tiny random (groupvit)", 0.0, 0.5, True])]:
        assert kind == "error" and "private.png is not an upload of this session" in json.dumps(data), data
    own = other.upload(tmp_path / "private.png")  # the same content, uploaded by this session
    assert own["path"] == picture["path"] and other.call("chat", chat("And now?", files=[own]))[0] == "answer"


def test_only_images_and_videos_can_be_uploaded(app, tmp_path):
    for name, content in [("page.html", b"<script>alert(1)</script>"), ("tool.exe", b"MZ" + os.urandom(100)),
                          ("notes", b"no suffix")]:
        (tmp_path / name).write_bytes(content)
        with open(tmp_path / name, "rb") as f:
            response = app.http.post("gradio_api/upload", files={"files": (name, f)})
        assert response.status_code == 415 and "Only images and videos" in response.text, (name, response.text)
        assert not list(Path(os.environ["GRADIO_TEMP_DIR"]).rglob(name))  # and nothing is kept


def test_a_sessions_uploads_are_bounded_and_deleted_when_it_ends(app, tmp_path):
    user = app.user()
    pictures = [user.upload(noise_png(tmp_path / f"n{i}.png", 520, seed=i)) for i in range(4)]  # ~0.81 MB each
    for picture in pictures[:3]:
        assert user.call("chat", chat("What is it?", files=[picture]))[0] == "answer"
    kind, data = user.call("chat", chat("And this?", files=[pictures[3]]))  # VLM_SESSION_UPLOADS=3mb
    assert kind == "error" and "the server keeps at most 3 MB per user" in json.dumps(data)
    assert all(stored(p).exists() for p in pictures)
    app.demo.defences.sessions.end(user.session)  # its tab closed
    assert not any(stored(p).exists() for p in pictures[:3])


def test_clear_deletes_the_chats_uploads(app, tmp_path):
    user = app.user()
    picture = user.upload(noise_png(tmp_path / "cleared.png", 64, seed=7))
    kind, out = user.event("add_turn", [{"text": "Look.", "files": [picture]}, None, "", "qwen2_vl"])
    assert kind == "answer" and stored(picture).exists()
    assert user.event("clear", [None])[0] == "answer"
    assert not stored(picture).exists()


def test_the_servers_uploads_are_bounded_on_disk_and_unused_ones_expire(app, tmp_path):
    from dataclasses import replace

    from vlm.ui.uploads import SWEEP_SECONDS

    uploads = app.demo.defences.uploads
    noise = tmp_path / "fill.png"
    statuses = []
    for i in range(UPLOADS_TOTAL_MB * 2**20 // 900_000 + 3):
        noise.write_bytes(os.urandom(900_000))
        with open(noise, "rb") as f:
            statuses.append(app.http.post("gradio_api/upload", files={"files": (f"fill{i}.png", f)}).status_code)
    assert 200 in statuses and statuses[-1] == 507, statuses  # VLM_UPLOADS_TOTAL
    assert uploads.disk_bytes() <= UPLOADS_TOTAL_MB * 2**20
    limits = uploads.limits
    uploads.limits = replace(limits, unclaimed_seconds=0.5)
    try:
        time.sleep(SWEEP_SECONDS + 0.5)
        assert stored(app.upload(tmp_path / "fill.png")).exists()  # room again: the unused ones are gone
        assert not list(Path(os.environ["GRADIO_TEMP_DIR"]).rglob("fill[0-9]*.png"))
    finally:
        uploads.limits = limits


# ------------------------------------------------------------------------------------------ connections
def test_slow_clients_are_cut_off_and_the_server_keeps_answering(app):
    """3 x CONNECTIONS clients send their headers a byte at a time: beyond the cap the oldest are closed at
    once, the rest after HEADER_SECONDS, and a real request is answered meanwhile."""
    import socket

    fds = psutil.Process().num_fds()
    clients = []
    for _ in range(3 * CONNECTIONS):
        client = socket.create_connection(("127.0.0.1", app.port))
        client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        client.setblocking(False)
        clients.append(client)
    assert app.user().call("chat", chat("Still there?"))[0] == "answer"
    open_ = set(clients)
    deadline = time.monotonic() + HEADER_SECONDS + 5
    while open_ and time.monotonic() < deadline:
        for client in list(open_):
            try:
                if client.recv(1024) == b"":  # the server closed it
                    open_.discard(client)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(client)
                continue
            try:
                client.send(b"X")  # a byte of header every 0.25 s does not buy more time
            except OSError:
                open_.discard(client)
        time.sleep(0.25)
    assert not open_, f"{len(open_)} of {len(clients)} slow connections still open"
    for client in clients:
        client.close()
    time.sleep(0.5)
    assert psutil.Process().num_fds() <= fds + 5
    assert app.user().call("chat", chat("And now?"))[0] == "answer"


def test_request_bodies_are_bounded(app):
    big = chat("x" * 2_000_000)  # VLM_MAX_REQUEST_SIZE: 1 MB
    response = app.http.post("gradio_api/call/chat", json={"data": big})
    assert response.status_code == 413 and "at most 1,048,576 bytes" in response.text

    def chunks():  # no Content-Length: counted as it arrives
        body = json.dumps({"data": big}).encode()
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    response = app.http.post("gradio_api/call/chat", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


# ------------------------------------------------------------------------------------- refusals and logs
@pytest.mark.parametrize("data, message", [
    (chat("hi") + [], None),
    (chat("hi")[:4] + [float("nan")] + chat("hi")[5:], "Max new tokens must be a whole number from 1 to 2,048, not nan"),
    (chat("hi")[:9] + [2**70] + chat("hi")[10:], "Seed (-1: random) must be a whole number from 0 to 4,294,967,295"),
    (["hello"] + chat("hi")[1:], 'Message must be {"text": "...", "files": [...]}'),
    ([{"text": 5, "files": []}] + chat("hi")[1:], "Message must be a string, not 5"),
    ([{"text": "hi", "files": "x.png"}] + chat("hi")[1:], "Message may carry at most 9 files, as a list"),
    ([{"text": "hi", "files": [{"path": str(ROOT / "app.py"), "meta": {"_type": "gradio.FileData"}}]}]
     + chat("hi")[1:], "app.py was not uploaded to this server"),
    (chat("hi", family="../groupvit"), "Model family must be one of 'qwen2_vl', not '../groupvit'"),
    (chat("hi", checkpoint="tiny:../../victim"), "'tiny:../../victim' is not one of this server's qwen2_vl checkpoints"),
    (chat("hi")[:5] + ["0.5"] + chat("hi")[6:], "Temperature (0: greedy) must be a number from 0 to 2, not '0.5'"),
    ([{"text": "hi"}], "This endpoint takes 14 values"),
])
def test_refused_requests_get_a_clear_message_and_one_log_line(app, caplog, capfd, data, message):
    import logging

    with caplog.at_level(logging.INFO, logger="vlm.ui"):
        kind, payload = app.user().call("chat", data)
    if message is None:  # the control: the same request, valid
        assert kind == "answer"
        return
    text = json.dumps(payload)
    assert kind == "error" and message in payload["error"], payload
    assert str(ROOT) not in text and os.environ["GRADIO_TEMP_DIR"] not in text  # no server path
    lines = [r.getMessage() for r in caplog.records if r.name == "vlm.ui"]
    assert len(lines) == 1 and lines[0].startswith("refused: ") and "\n" not in lines[0], lines
    assert "Traceback" not in capfd.readouterr().err


def test_stop_pressed_before_the_answer_starts_stops_it(app):
    """Stop between the question and the start of its answer (queued behind others): the answer never runs."""
    user = app.user()
    assert user.event("add_turn", [{"text": "Tell me everything.", "files": []}, None, "", "qwen2_vl"])[0] == "answer"
    assert user.event("stop", [None])[0] == "answer"
    started = time.monotonic()
    kind, out = user.event("respond", respond(user, max_new_tokens=2048))
    assert kind == "answer" and "stopped" in json.dumps(out[0][-1]) and time.monotonic() - started < CLOSED_SECONDS, out


# ----------------------------------------------------------------------------------- soak of the attacks
ATTACK_ROUNDS = 5


def test_soak_of_the_attacks_leaves_the_server_answering_with_memory_back_to_its_baseline(app, tmp_path):
    """ATTACK_ROUNDS rounds of every attack of this file, on loopback: checkpoint values, malformed and
    out-of-range values, a flood of new sessions, refused and foreign uploads, oversized bodies, slow
    connections. Afterwards a real user is answered, and memory, descriptors, threads, sessions and the
    upload directory are back to what they were after the first round."""
    import socket

    process = psutil.Process()
    picture = noise_png(tmp_path / "mine.png", 64, seed=11)
    bad = [chat("hi", checkpoint="tiny:../victim"), chat("hi", checkpoint="tiny:*"),
           chat("hi", checkpoint="tiny random (groupvit)"), chat("hi")[:9] + [2**70] + chat("hi")[10:],
           chat("hi")[:4] + [float("nan")] + chat("hi")[5:], ["hello"] + chat("hi")[1:], [{"text": "hi"}],
           [{"text": "hi", "files": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}]}] + chat("hi")[1:]]

    def attack_round() -> Path:
        """One round; the path of the upload its victim made."""
        slow = []
        for _ in range(CONNECTIONS // 2):
            client = socket.create_connection(("127.0.0.1", app.port))
            client.sendall(b"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(client)
        attacker, owner = app.user(), app.user()
        for data in bad:
            assert attacker.call("chat", data)[0] == "error"
        for _ in range(SESSIONS):
            assert app.user().call("chat", chat("   "))[0] == "error"
        assert attacker.http.post("gradio_api/upload", files={"files": ("x.html", b"<p>hi</p>")}).status_code == 415
        mine = owner.upload(picture)
        assert owner.call("chat", chat("Mine?", files=[mine]))[0] == "answer"
        assert attacker.call("chat", chat("Yours?", files=[mine]))[0] == "error"
        assert attacker.http.post("gradio_api/call/chat", content=b"x" * 2_000_000).status_code == 413
        app.demo.defences.sessions.end(owner.session)  # its tab closes: its upload goes
        time.sleep(HEADER_SECONDS + 1)  # the slow connections are cut off
        for client in slow:
            client.close()
        return stored(mine)

    def settled() -> tuple[int, int, int]:
        time.sleep(0.5)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return process.memory_info().rss, process.num_fds(), len(_own_threads())

    attack_round()  # warm-up: caches, worker pools
    (rss, fds, threads), uploads = settled(), app.demo.defences.uploads.disk_bytes()
    memory, victims = [], []
    for _ in range(ATTACK_ROUNDS):
        victims.append(attack_round())
        memory.append(settled()[0])
    print(f"attack soak: RSS after each round (MB): {[round(m / 2**20) for m in [rss] + memory]}")
    assert app.user().call("chat", chat("Still answering?"))[0] == "answer"
    now_rss, now_fds, now_threads = settled()
    assert max(memory) - rss < 20 * 2**20, f"RSS grew by {(max(memory) - rss) / 2**20:.1f} MB"
    assert now_fds <= fds + 5 and now_threads <= threads + 2
    assert len(app.demo.state_holder.session_data) <= SESSIONS + 1  # (a refused newcomer waits for the next)
    assert app.demo.defences.uploads.disk_bytes() <= uploads and not any(path.exists() for path in victims)

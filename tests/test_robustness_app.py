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
from typing import Any, Iterator

import httpx
import psutil
import pytest
import torch
from PIL import Image

import vlm.conversation
import vlm.errors
import vlm.media
import vlm.pipeline
from tests.endless import endless_qwen2_vl
from tests.test_app import free_port
from vlm.session import SessionManager
from vlm.ui import Settings, build, launch

ROOT = Path(__file__).resolve().parents[1]
QUEUE_SIZE = 4
USERS = 2 * QUEUE_SIZE
SOAK_REQUESTS = 200
SESSIONS = 20  # Gradio sessions kept (each API call is one): the soak's warm-up fills them

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


class Api:
    """A minimal client of Gradio's HTTP API (the /gradio_api/call routes, server-sent events)."""

    def __init__(self, url: str):
        self.url = url
        self.demo: Any = None  # the app's Blocks, when the test serves it
        self.http = httpx.Client(base_url=url, trust_env=False, timeout=120)

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            response = self.http.post("gradio_api/upload", files={"files": (path.name, f)})
        response.raise_for_status()
        return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def submit(self, api: str, data: list) -> httpx.Response | str:
        """The POST: an event id, or the response when it was refused (e.g. 503: the queue is full)."""
        response = self.http.post(f"gradio_api/call/{api}", json={"data": data})
        return response.json()["event_id"] if response.status_code == 200 else response

    def events(self, api: str, event_id: str) -> Iterator[tuple[str, Any]]:
        with self.http.stream("GET", f"gradio_api/call/{api}/{event_id}") as stream:
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    yield kind, json.loads(line[5:])

    def call(self, api: str, data: list) -> tuple[str, Any]:
        """("answer", data), ("error", message), or ("busy", detail) when the queue is full."""
        event_id = self.submit(api, data)
        if not isinstance(event_id, str):
            assert event_id.status_code == 503, event_id.text
            return "busy", event_id.json()["detail"]
        for kind, data in self.events(api, event_id):
            if kind == "complete":
                return "answer", data
            if kind == "error":
                return "error", data
        return "closed", None


def chat(text: str, files: list[dict] = (), max_new_tokens: int = 4, checkpoint: str = "",
         family: str = "qwen2_vl") -> list:
    """The /chat endpoint's inputs: message, family, checkpoint, system, then the sampling and media settings."""
    return [{"text": text, "files": list(files)}, family, checkpoint, "", max_new_tokens, 0, 1, 0, 1, -1, 0, 2.0, 0, -1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The demo on a free loopback port: tiny Qwen2-VL (never-ending answers) and GroupViT, a queue of
    QUEUE_SIZE, two generations at once, 1 MB uploads, SESSIONS sessions kept."""
    env = {"VLM_TINY": "1", "VLM_FAMILIES": "qwen2_vl,groupvit", "VLM_CACHE_DIR": str(tmp_path_factory.mktemp("tiny")),
           "VLM_MODEL_QWEN2_VL": str(endless_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))),
           "VLM_QUEUE_SIZE": str(QUEUE_SIZE), "VLM_CONCURRENCY": "2", "VLM_MAX_FILE_SIZE": "1mb",
           "VLM_DEVICE": "cpu", "VLM_DTYPE": "float32", "VLM_SESSION_CAPACITY": str(SESSIONS)}
    settings = Settings.from_env(env)
    steady_allocator()
    limits, pillow_limit = vlm.media.current_limits(), Image.MAX_IMAGE_PIXELS
    demo = build(settings)
    port = free_port()
    launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    api = Api(f"http://127.0.0.1:{port}/")
    api.demo = demo
    assert api.call("chat", chat("warm up"))[0] == "answer"  # the model is loaded
    yield api
    demo.close()
    vlm.media.configure(limits)
    Image.MAX_IMAGE_PIXELS = pillow_limit


def test_media_limits_come_from_the_settings(app):
    settings = Settings.from_env({"VLM_MAX_FILE_SIZE": "10 MB", "VLM_MAX_VIDEO_RESOLUTION": "1920x1080",
                                  "VLM_MAX_VIDEO_SECONDS": "600", "VLM_MAX_VIDEO_FRAMES": "9000",
                                  "VLM_MAX_IMAGE_PIXELS": "1000000", "VLM_DECODE_SECONDS": "30",
                                  "VLM_CONTEXT_OVERFLOW": "error", "VLM_SESSION_CAPACITY": "50"})
    assert settings.media == vlm.media.MediaLimits(max_image_pixels=1_000_000, max_video_bytes=10 * 2**20,
                                                   max_video_seconds=600, max_video_pixels=1920 * 1080,
                                                   max_video_frames=9000, decode_seconds=30)
    assert settings.limits.context_overflow == "error" and Settings.from_env({}).limits.context_overflow == "truncate"
    assert settings.session_capacity == 50 and Settings.from_env({}).session_capacity == 1000
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


def test_closing_the_tab_ends_the_generation_thread_within_a_second(app):
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
        while vlm_threads() or (baseline is not None and threading.active_count() > baseline):
            assert time.monotonic() - closed < 1.0, [t.name for t in threading.enumerate()]
            time.sleep(0.01)
        baseline = threading.active_count() if baseline is None else baseline


@pytest.fixture
def faults(monkeypatch):
    """Questions containing "explode" fail mid-answer; "oom" runs out of memory once per question."""
    stream = vlm.pipeline.ChatPipeline.stream

    def faulty(self, conversation, **options):
        def deltas():
            text = json.dumps(conversation, default=str)
            for i, delta in enumerate(stream(self, conversation, **options)):
                if "explode" in text and i == 3:
                    raise RuntimeError("boom")
                if "oom" in text:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
                yield delta
        return vlm.pipeline.Answer(deltas())

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
        """Resident memory once garbage and free heap pages are given back (allocator noise removed)."""
        time.sleep(0.5)
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
    assert max(grown) < 15, f"RSS grew by {grown} MB"  # keeping each decoded image (0.9 MB) would add 70


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
    uploaded = app.upload(picture)["path"]
    status, body = raw_get(app.url, f"/gradio_api/file={uploaded}")
    assert status == 200 and body == picture.read_bytes()  # the route works: what follows is refused by it

    cache = Path(uploaded).parents[1]
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
              "/gradio_api/file=file:///etc/passwd", "/static/../../../../etc/passwd",
              "/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd"]
    for path in paths:
        status, body = raw_get(app.url, path)
        assert status >= 400 and b"root:x:0" not in body and b"import" not in body[:200], (path, status, body[:80])


def test_uploads_over_max_file_size_are_refused(app, tmp_path):
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(os.urandom(200_000))
    big.write_bytes(os.urandom(1_200_000))  # VLM_MAX_FILE_SIZE=1mb
    assert Path(app.upload(small)["path"]).read_bytes() == small.read_bytes()
    with open(big, "rb") as f:
        response = app.http.post("gradio_api/upload", files={"files": ("big.bin", f)})
    assert response.status_code == 413
    cache = Path(app.upload(small)["path"]).parents[1]
    assert not [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]  # nothing kept


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
        outcomes.append(app.call("segment", [file_data[0], "cat", "groupvit", "tiny:groupvit", 0.0, 0.5, True]))
        assert [kind for kind, _ in outcomes] == ["error"] * 5, outcomes
        for i in (0, 1, 4):  # refused by our components, for any host: Gradio would fetch public URLs
            assert "URLs are not fetched" in json.dumps(outcomes[i][1]), outcomes[i]
        assert "not one of this server's checkpoints" in json.dumps(outcomes[2][1])
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
    kind, data = app.call("segment", [app.upload(bomb), "cat", "groupvit", "tiny:groupvit", 0.0, 0.5, True])
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

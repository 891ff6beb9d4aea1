"""The remote backend (vlm/remote.py): a family served by an OpenAI-compatible server instead of local
weights. Against `python -m vlm serve` started in another process on loopback (a real server speaking the
protocol): answers equal the local ones, reasoning, Stop, stats and usage; the server going away mid-answer,
refusing connections, busy (429) or slow. A scripted server speaks vLLM's dialect (reasoning in
`reasoning`, think tags and box markup in the content, no visual-token count, 503 when busy).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path

import openai
import pytest
from PIL import Image

import vlm
import vlm.tiny
from tests.test_app import ARTIFACTS, ask, browser, endless_qwen2_vl, free_port, open_app  # noqa: F401 (a fixture)
from vlm.errors import RemoteError, ServerBusyError
from vlm.families import FAMILIES
from vlm.families.glm4.tiny import Z1_CHAT_TEMPLATE
from vlm.remote import RemotePipeline, RemoteServer, servers_from_env
from vlm.session import SessionManager
from vlm.ui import Settings, build, launch
from vlm.ui.chat import ChatTab
from vlm.ui.turns import answer_messages, draw_boxes, stats_line

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "assets" / "shapes.png")
VIDEO = str(ROOT / "assets" / "bouncing_ball.mp4")
KEY = "remote-key"
STARTUP_SECONDS = 180

pytestmark = pytest.mark.timeout(600)


class Serve:
    """`python -m vlm serve` of `models` on a free loopback port, in its own process."""

    def __init__(self, models: list[Path], log: Path, port: int | None = None, **env: str):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.models, self.log, self.env = models, log, env
        self.start()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VLM_DEVICE": "cpu",
               "VLM_DTYPE": "float32", "VLM_API_KEY": KEY, **self.env}
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "vlm", "serve", *map(str, self.models),
                                             "--port", str(self.port)], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"python -m vlm serve did not start; see {self.log}")
                time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A never-ending Qwen2-VL (the slower one of test_app.py) and a GLM-4 that reasons like GLM-Z1."""
    return {"qwen2_vl": endless_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl")),
            "glm4": vlm.tiny.write("glm4", tmp_path_factory.mktemp("z1"), seed=3, chat_template=Z1_CHAT_TEMPLATE)}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    serve = Serve([checkpoints["qwen2_vl"], checkpoints["glm4"]], tmp_path_factory.mktemp("log") / "serve.log",
                  VLM_QUEUE_SIZE="2", VLM_CONCURRENCY="1")
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def local(checkpoints):
    return {name: vlm.load(path, device="cpu", dtype="float32") for name, path in checkpoints.items()}


def remote_manager(url: str, timeout: float = 60.0) -> SessionManager:
    """A session manager whose qwen2_vl and glm4 are served by `url` (the other families load locally)."""
    servers = {name: RemoteServer(url, KEY, name, timeout) for name in ("qwen2_vl", "glm4")}
    return SessionManager(device="cpu", dtype="float32",
                          remote={name: partial(RemotePipeline.connect, name, s) for name, s in servers.items()})


def finish(generation):
    *_, last = generation.updates(0.01)
    assert generation.join(10)
    return last


CONVERSATION = [{"role": "user", "content": [{"type": "image", "path": IMAGE}, {"type": "text", "text": "What?"}]}]


# ------------------------------------------------------------------------------------------- answers
def test_remote_answers_equal_local_ones_with_stats_and_usage(server, local):
    manager = remote_manager(server.url)
    pipe = local["qwen2_vl"]
    for conversation, options in ((CONVERSATION, {}), (
            [{"role": "user", "content": [{"type": "video", "path": VIDEO}, {"type": "text", "text": "And here?"}]}],
            {"num_frames": 4})):
        generation = manager.generate("qwen2_vl", "ignored", conversation, max_new_tokens=12, do_sample=False,
                                      **options)
        snaps = list(generation.updates(0.001))
        assert generation.join(10)
        last = snaps[-1]
        assert last.error is None and last.finish == "length"
        assert last.answer == pipe.chat(conversation, max_new_tokens=12, do_sample=False, **options)
        ids = pipe.encode(conversation, **options)["input_ids"]
        stats = last.stats
        assert (stats.tokens, stats.prompt_tokens) == (12, ids.shape[1])
        assert stats.visual_tokens == sum(int((ids == i).sum()) for i in pipe.visual_ids) > 0
        assert stats.seconds_to_first_token > 0 and stats.tokens_per_second > 0
    assert manager.loaded() == {}  # no weights here
    generation = manager.generate("qwen2_vl", "ignored", [{"role": "user", "content": "Go on."}], max_new_tokens=200)
    growing = [s.answer for s in generation.updates(0.001) if not s.done]
    assert generation.join(10) and len(set(growing)) >= 3  # it streamed


def test_reasoning_arrives_as_thinking(server, local):
    manager = remote_manager(server.url)
    conversation = [{"role": "user", "content": "How many dogs run across the grass?"}]
    out = local["glm4"].generate(conversation, max_new_tokens=12, do_sample=False, thinking_budget=3)[0]
    last = finish(manager.generate("glm4", "ignored", conversation, max_new_tokens=12, do_sample=False,
                                   thinking_budget=3))
    assert (last.thinking, last.answer) == (out.reasoning, out.text) and out.reasoning and out.text
    shown = answer_messages(last)
    assert shown[0]["metadata"]["title"] == "Thinking" and shown[0]["content"] == out.reasoning


def test_stop_closes_the_stream_and_the_server_cancels(server):
    manager = remote_manager(server.url)
    generation = manager.generate("qwen2_vl", "ignored", [{"role": "user", "content": "Go on."}], max_new_tokens=2048)
    for snap in generation.updates(0.01):
        if len(snap.answer) > 10:
            break
    stopped = time.monotonic()
    generation.cancel()
    last = finish(generation)
    assert last.finish == "cancelled" and last.error is None and time.monotonic() - stopped < 2
    # the server has one generation slot: the rest of that answer (about 10 s) would hold it
    started = time.monotonic()
    after = finish(manager.generate("qwen2_vl", "ignored", [{"role": "user", "content": "Hi"}], max_new_tokens=2))
    assert after.error is None and after.stats.tokens == 2 and time.monotonic() - started < 5


def test_a_busy_server_says_so(server):
    manager = remote_manager(server.url)
    long = []
    for _ in range(2):  # the server takes 2 requests at once (VLM_QUEUE_SIZE=2): the first streams, the second waits
        long.append(manager.generate("qwen2_vl", "ignored", [{"role": "user", "content": "Go on."}],
                                     max_new_tokens=2048))
        while not long[-1].snapshot().answer and long[-1].snapshot().status != "Reading the inputs…":
            time.sleep(0.01)
        time.sleep(0.5)
    impatient = remote_manager(server.url, timeout=1.0)  # a probe let in before both arrived gives up after 1 s
    deadline = time.monotonic() + 60
    while True:
        last = finish(impatient.generate("qwen2_vl", "ignored", [{"role": "user", "content": "Hi"}], max_new_tokens=2))
        if isinstance(last.error, ServerBusyError):
            break
        assert time.monotonic() < deadline and "did not answer within 1 s" in str(last.error)
    assert "is busy (429: This server is busy with 2 requests" in str(last.error)
    assert "Try again" in answer_messages(last)[-1]["content"]
    for generation in long:
        generation.cancel()
        assert finish(generation).error is None


# ------------------------------------------------------------------------------------------ failures
def test_the_server_going_away_mid_answer_is_a_message_and_nothing_else_breaks(checkpoints, tmp_path):
    serve = Serve([checkpoints["qwen2_vl"]], tmp_path / "serve.log")
    manager = remote_manager(serve.url)
    try:
        generation = manager.generate("qwen2_vl", "ignored", [{"role": "user", "content": "Go on."}],
                                      max_new_tokens=2048)
        for snap in generation.updates(0.01):
            if len(snap.answer) > 10:
                break
        serve.stop(signal.SIGKILL)
        last = finish(generation)
        assert isinstance(last.error, RemoteError) and "went away mid-answer" in str(last.error)
        assert len(last.answer) > 10  # what had arrived is kept
        down = finish(manager.generate("qwen2_vl", "ignored", [{"role": "user", "content": "Hi"}], max_new_tokens=2))
        assert isinstance(down.error, RemoteError) and "cannot be reached" in str(down.error)
        serve.start()  # back on the same port: the same client answers again
        again = finish(manager.generate("qwen2_vl", "ignored", [{"role": "user", "content": "Hi"}], max_new_tokens=2))
        assert again.error is None and again.stats.tokens == 2
    finally:
        serve.stop()


def test_a_server_that_is_not_there_is_a_message():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(RemoteError, match="cannot be reached .*Check that it is running and VLM_REMOTE_QWEN2_VL"):
        RemotePipeline.connect("qwen2_vl", RemoteServer(url))
    with pytest.raises(RemoteError, match="cannot be reached"):
        remote_manager(url).get("qwen2_vl", "ignored")


def test_a_wrong_key_or_model_is_a_message(server):
    with pytest.raises(RemoteError, match=r"refused the API key \(401\)"):
        RemotePipeline.connect("qwen2_vl", RemoteServer(server.url, "wrong"))
    with pytest.raises(RemoteError, match="serves .*qwen2_vl.* not llava; set VLM_REMOTE_QWEN2_VL_MODEL"):
        RemotePipeline.connect("qwen2_vl", RemoteServer(server.url, KEY, "llava"))


class Scripted(http.server.BaseHTTPRequestHandler):
    """A server speaking vLLM's dialect from a script: GET /v1/models, and POST /v1/chat/completions
    answering with `Scripted.reply` (status, list of SSE events, seconds before each event)."""

    reply: tuple[int, list[dict], float] = (200, [], 0.0)
    bodies: list[dict] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._send(200, json.dumps({"object": "list", "data": [{"id": "glm-4.1v", "object": "model"}]}).encode())

    def do_POST(self):
        Scripted.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status, events, pause = Scripted.reply
        if status != 200:
            self._send(status, json.dumps({"object": "error", "message": "Server overloaded", "code": status}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for event in events + ["[DONE]"]:
                time.sleep(pause)
                self.wfile.write(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode())
                self.wfile.flush()
        except BrokenPipeError:  # the client gave up (the slow server test)
            pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted.bodies.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def chunk(**delta) -> dict:
    finish = delta.pop("finish", None)
    return {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": finish}]}


def test_vllms_dialect_reasoning_think_tags_boxes_and_usage(scripted):
    manager = SessionManager(remote={"glm4v": partial(RemotePipeline.connect, "glm4v", RemoteServer(scripted))})
    box = "<|begin_of_box|>[406, 500, 625, 792]<|end_of_box|>"
    for events in (  # a reasoning parser on the server ("reasoning"), or none (the tags stay in the content)
        [chunk(role="assistant", content=""), chunk(reasoning="A blue "), chunk(reasoning="square."),
         chunk(content="It is here: "), chunk(content=box, finish="stop")],
        [chunk(role="assistant", content=""), chunk(content="<think>A blue "), chunk(content="square.</think>"),
         chunk(content="<answer>It is here: "), chunk(content=box + "</answer>", finish="stop")],
    ):
        Scripted.reply = (200, events + [{"id": "x", "choices": [], "usage": {
            "prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}}], 0.0)
        last = finish(manager.generate("glm4v", "ignored", CONVERSATION, max_new_tokens=64, temperature=0.7,
                                       do_sample=True, top_k=0, seed=3, max_pixels=60_000))
        assert last.error is None and (last.thinking, last.answer) == ("A blue square.", "It is here: " + box)
        assert (last.finish, last.stats.tokens, last.stats.prompt_tokens, last.stats.visual_tokens) == (
            "stop", 9, 40, None)
        line = stats_line(last.stats, last.finish)
        assert line.endswith(" · 40 prompt tokens") and "visual tokens" not in line  # the server did not count them
        assert draw_boxes(last.answer, IMAGE).getpixel((260, 240)) != (30, 136, 229)  # the square's edge is drawn
    sent = Scripted.bodies[-1]
    assert {k: sent[k] for k in ("model", "max_tokens", "temperature", "top_k", "seed", "stream",
                                 "skip_special_tokens")} == {
        "model": "glm-4.1v", "max_tokens": 64, "temperature": 0.7, "top_k": -1, "seed": 3, "stream": True,
        "skip_special_tokens": False}
    assert sent["stream_options"] == {"include_usage": True}
    url = sent["messages"][0]["content"][0]["image_url"]["url"]
    sent_image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert url.startswith("data:image/png;base64,") and sent_image.width * sent_image.height <= 60_000  # downscaled


def test_busy_and_slow_servers(scripted):
    manager = SessionManager(remote={"glm4v": partial(RemotePipeline.connect, "glm4v",
                                                      RemoteServer(scripted, timeout=1.0))})
    Scripted.reply = (503, [], 0.0)
    last = finish(manager.generate("glm4v", "ignored", CONVERSATION))
    assert isinstance(last.error, ServerBusyError) and "busy (503: Server overloaded)" in str(last.error)
    Scripted.reply = (200, [chunk(content="slow"), chunk(content=" and slower")], 2.0)  # 2 s before each piece
    started = time.monotonic()
    last = finish(manager.generate("glm4v", "ignored", CONVERSATION))
    assert isinstance(last.error, RemoteError) and "did not answer within 1 s" in str(last.error)
    assert time.monotonic() - started < 10


def test_settings():
    servers = servers_from_env({"VLM_REMOTE_QWEN2_VL": "http://gpu:8000/v1/", "VLM_REMOTE_QWEN2_VL_API_KEY": "k",
                                "VLM_REMOTE_QWEN2_VL_MODEL": "Qwen/Qwen2-VL-72B-Instruct", "VLM_REMOTE_TIMEOUT": "30",
                                "VLM_REMOTE_GLM4": ""}, FAMILIES)
    assert servers == {"qwen2_vl": RemoteServer("http://gpu:8000/v1", "k", "Qwen/Qwen2-VL-72B-Instruct", 30.0)}
    for bad in ({"VLM_REMOTE_GPT": "http://x/v1"}, {"VLM_REMOTE_GLM4": "gpu:8000"}, {"VLM_REMOTE_TIMEOUT": "soon"}):
        with pytest.raises(ValueError):
            servers_from_env(bad, FAMILIES)


def test_the_status_line_of_a_remote_family_counts_no_memory_here(scripted, checkpoints):
    manager = SessionManager(device="cpu", dtype="float32",
                             remote={"glm4v": partial(RemotePipeline.connect, "glm4v", RemoteServer(scripted))})
    tab = ChatTab(manager, None, ["glm4v", "qwen2_vl"], None, None)  # the status needs neither catalog nor gate
    manager.get("glm4v", "zai-org/GLM-4.1V-9B-Thinking")
    status = tab.status_text("glm4v", "zai-org/GLM-4.1V-9B-Thinking")
    assert "served by a remote server" in status and "Loaded" not in status and "0 B" not in status
    manager.get("qwen2_vl", checkpoints["qwen2_vl"])
    status = tab.status_text("glm4v", "zai-org/GLM-4.1V-9B-Thinking")
    assert "served by a remote server" in status and "Loaded here: qwen2_vl (" in status


# ---------------------------------------------------------------------------------------------- the demo
def test_the_demo_fronts_a_remote_server_in_the_browser_and_its_api(scripted, browser):
    """The chat tab and the app's own /v1 API with GLM-4.1V served by the scripted server: the reasoning in
    the Thinking block, the boxes drawn, stats without a visual-token count."""
    box = "<|begin_of_box|>[406, 500, 625, 792]<|end_of_box|>"
    events = [chunk(role="assistant", content="")] + [chunk(reasoning=w) for w in ("A ", "blue ", "square.")]
    events += [chunk(content=w) for w in ("It ", "is ", "here: ")] + [chunk(content=box, finish="stop")]
    usage = {"id": "x", "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 9}}
    Scripted.reply = (200, events + [usage], 0.3)
    settings = Settings.from_env({"VLM_FAMILIES": "glm4v", "VLM_REMOTE_GLM4V": scripted, "VLM_DEVICE": "cpu"})
    demo = build(settings)
    port = free_port()
    launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        open_app(page, f"http://127.0.0.1:{port}/")
        assert f"ready: remote server {scripted}" in page.locator("#model-status").inner_text()
        assert not page.locator("#banner").is_visible()  # no random weights here
        ask(page, "Where is the square?", "shapes.png")
        page.wait_for_selector("#chatbot :text('Thinking')")
        page.wait_for_selector("#chatbot :text('to first token')")
        page.wait_for_selector("#chatbot :text('Boxes in the answer')")  # the image with the box drawn
        shown = page.locator("#chatbot").inner_text()
        assert "It is here: [406, 500, 625, 792]" in shown and "tokens/s" in shown and "visual tokens" not in shown
        page.locator("#chatbot").get_by_text("Thinking", exact=True).click()  # the finished reasoning is folded
        page.wait_for_selector("#chatbot :text('A blue square.')")
        page.screenshot(path=str(ARTIFACTS / "remote_thinking_and_boxes.png"), full_page=True)
        assert Scripted.bodies[-1]["messages"][-1]["content"][0]["type"] == "image_url"

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        message = client.chat.completions.create(model="glm4v", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=64).choices[0].message
        assert (message.reasoning_content, message.content) == ("A blue square.", "It is here: " + box)
        Scripted.reply = (503, [], 0.0)
        with pytest.raises(openai.InternalServerError, match="is busy") as busy:
            client.chat.completions.create(model="glm4v", messages=[{"role": "user", "content": "Hi"}])
        assert busy.value.status_code == 503 and busy.value.body["code"] == "server_busy"
    finally:
        context.close()
        demo.close()

"""End to end: `python app.py` on a free port with tiny checkpoints, driven in headless Chromium and
through the Gradio API. Screenshots go to artifacts/app/ (git-ignored).

Qwen2-VL is served from a tiny checkpoint that never writes its end-of-sequence token and is a bit
larger than the built-in one, so an answer streams for several seconds: long enough to watch it grow
and to stop it. Needs Debian's chromium (/usr/bin/chromium) and the playwright package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

import vlm.tiny
from tests.app_client import Api, free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "app"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_SECONDS = 180

ANSWERS_WITH_STATS = ("[...document.querySelectorAll('#chatbot [data-testid=bot]')]"
                      ".filter(b => b.innerText.includes('visual tokens')).length >= {}")

pytestmark = pytest.mark.timeout(600)


def endless_qwen2_vl(directory: Path) -> Path:
    """A tiny Qwen2-VL whose end-of-sequence id is out of its vocabulary: answers run to max_new_tokens
    (2048 take ~10 s here, so a streaming answer is still running when a test looks at it)."""
    vlm.tiny.write("qwen2_vl", directory, generation={"eos_token_id": [99999]},
                   text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, mrope_section=[8, 12, 12]))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = None
    config_path.write_text(json.dumps(config))
    return directory


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen
    cache: Path  # VLM_CACHE_DIR: where the tiny checkpoints are written
    log: Path  # the app's output


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app, started like the README says (`python app.py`), with tiny checkpoints and no network."""
    port = free_port()
    log_path, cache = tmp_path_factory.mktemp("log") / "app.log", tmp_path_factory.mktemp("tiny")
    log = log_path.open("w")
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VLM_TINY": "1",
        "VLM_CACHE_DIR": str(cache), "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
        "VLM_MODEL_QWEN2_VL": str(endless_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))),
        "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
        "VLM_CONCURRENCY": "2",  # two users of one family at once (test_closing_a_tab_...)
    }
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"app.py did not start; see {log.name}")
            time.sleep(0.5)
    yield Server(url, process, cache, log_path)
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    open_app(page, server.url)
    yield page
    context.close()


def open_app(page, url: str) -> None:
    """Open the app and wait until the model loaded at page load has set its defaults."""
    page.goto(url)
    page.wait_for_selector("#model-status:has-text('ready')")


def last_answer(page) -> str:
    bots = page.locator("#chatbot [data-testid='bot']")
    return bots.nth(bots.count() - 1).inner_text() if bots.count() else ""


def set_number(page, elem_id: str, value: float, accordion: str | None = None) -> None:
    if accordion and not page.locator(f"#{elem_id}").is_visible():
        page.get_by_text(accordion, exact=True).click()
    field = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(5):  # a slider its accordion has just shown can still take its stored value (~1 in 3)
        field.fill(str(value))
        field.press("Enter")
        page.wait_for_timeout(500)
        if field.input_value() == str(value):
            return
    raise AssertionError(f"#{elem_id} did not keep {value}: {field.input_value()}")


def ask(page, question: str, *files: str) -> None:
    if files:
        page.set_input_files("#chat-input input[type=file]", [str(ROOT / "assets" / f) for f in files])
        page.wait_for_selector("#chat-input img")  # the upload's preview
    page.fill("#chat-input textarea", question)
    page.press("#chat-input textarea", "Enter")


def wait_for_growth(page, updates: int = 4, timeout: float = 120) -> list[int]:
    """Lengths of the streaming answer until it has taken `updates` different lengths."""
    lengths: list[int] = []
    deadline = time.monotonic() + timeout
    while len(set(lengths)) < updates and time.monotonic() < deadline:
        text = last_answer(page)
        if text and not text.startswith(("Loading", "Waiting", "Reading", "Finding", "Estimated")):
            lengths.append(len(text))
        page.wait_for_timeout(100)
    ended = "to first token" in last_answer(page)  # the stats line of a finished answer
    assert len(set(lengths)) >= updates, ("the answer ended before it grew" if ended else "no growth", lengths)
    assert lengths == sorted(lengths), lengths
    return lengths


def server_cpu(server) -> float:
    import psutil

    return psutil.Process(server.process.pid).cpu_percent(interval=1.0)


def test_banner_says_answers_are_random(page):
    banner = page.locator("#banner")
    assert "answers are random" in banner.inner_text()
    assert "VLM_MODEL_" in banner.inner_text()


def test_a_load_failure_is_a_message_and_the_app_keeps_working(page):
    page.click("#checkpoint input")
    page.get_by_role("option", name="Qwen/Qwen2-VL-2B-Instruct").click()  # offline: cannot be downloaded
    page.wait_for_selector("#model-status:has-text('Could not load')")
    assert "HF_HUB_OFFLINE" in page.locator("#model-status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "load_failure.png"), full_page=True)
    page.click("#checkpoint input")
    page.get_by_role("option", name="tiny random (qwen2_vl)").click()
    page.wait_for_selector("#model-status:has-text('ready')")
    set_number(page, "max-new-tokens", 3, accordion="Sampling")
    ask(page, "Still there?")
    page.wait_for_selector("#chatbot :text('visual tokens')")


def test_qwen2_5_vl_is_offered_and_answers_offline(page):
    page.click("#family input")
    page.get_by_role("option", name="qwen2_5_vl").click()
    page.wait_for_selector("#model-status:has-text('qwen2_5_vl ready')")
    assert "tiny random (qwen2_5_vl)" in page.locator("#model-status").inner_text()
    set_number(page, "max-new-tokens", 3, accordion="Sampling")
    ask(page, "Where is the red square?", "shapes.png")
    page.wait_for_selector("#chatbot :text('visual tokens')")
    assert int(last_answer(page).split(" visual tokens")[0].rsplit("· ", 1)[-1]) > 0
    page.screenshot(path=str(ARTIFACTS / "chat_qwen2_5_vl.png"), full_page=True)


def test_chat_streams_and_stops(page, server):
    set_number(page, "max-new-tokens", 2048, accordion="Sampling")
    assert page.locator("#stop").is_disabled()  # nothing to stop yet
    ask(page, "What is in this picture?", "street.png")
    wait_for_growth(page)
    assert page.locator("#stop").is_enabled()
    page.screenshot(path=str(ARTIFACTS / "chat_streaming.png"), full_page=True)

    page.click("#stop")
    page.wait_for_selector("#chatbot [data-testid='bot'] >> text=stopped", timeout=30_000)
    stopped = page.locator("#chatbot [data-testid='bot']", has_text="to first token").last.inner_text()
    assert "visual tokens" in stopped  # from the request's own inputs (boxes in the random text may follow it)
    shown = last_answer(page)
    page.wait_for_timeout(1000)
    assert last_answer(page) == shown  # nothing more arrives
    assert server_cpu(server) < 50  # the model is idle again: its thread ended
    assert page.locator("#chat-input textarea").is_enabled()
    page.wait_for_selector("#stop:disabled")
    page.screenshot(path=str(ARTIFACTS / "chat_stopped.png"), full_page=True)


def test_video_example_is_one_click_away(page):
    set_number(page, "max-new-tokens", 3, accordion="Sampling")
    page.get_by_text("What happens in this video?").click()
    page.wait_for_selector("#chat-input [aria-label='File thumbnail']")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_selector("#chatbot video")  # the video is previewed in the chat
    page.wait_for_selector("#chatbot :text('visual tokens')")
    assert int(last_answer(page).split(" visual tokens")[0].rsplit("· ", 1)[-1]) > 0
    page.screenshot(path=str(ARTIFACTS / "chat_video_example.png"), full_page=True)


def test_multi_turn_keeps_media_then_regenerate_and_clear(page):
    set_number(page, "max-new-tokens", 4, accordion="Sampling")
    page.fill("#system textarea", "Answer in one word.")
    ask(page, "What is in this picture?", "cat.png")
    page.wait_for_selector("#chatbot :text('visual tokens')")
    first = last_answer(page)
    visual = first.split(" visual tokens")[0].rsplit("· ", 1)[-1]
    assert int(visual) > 0
    ask(page, "And what colour is it?")  # no new file: the cat is still part of the conversation
    page.wait_for_function(ANSWERS_WITH_STATS.format(2))
    assert f"· {visual} visual tokens" in last_answer(page)

    set_number(page, "seed", 7)
    set_number(page, "temperature", 1.5)
    page.click("#regenerate")
    page.wait_for_function(ANSWERS_WITH_STATS.format(2))
    assert page.locator("#chatbot [data-testid='user']").count() == 3  # image, question, follow-up
    page.screenshot(path=str(ARTIFACTS / "chat_multi_turn.png"), full_page=True)

    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=user]').length === 0")


def test_closing_a_tab_cancels_only_that_users_generation(browser, server):
    pages = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(120_000)
        open_app(page, server.url)
        set_number(page, "max-new-tokens", 2048, accordion="Sampling")
        pages.append(page)
    for page in pages:  # both ask at once: neither answer (2048 tokens) can end while the other page is set up
        ask(page, "Describe the picture.", "shapes.png")
    for page in pages:
        wait_for_growth(page, updates=2)
    pages[0].context.close()  # user A leaves mid-answer
    wait_for_growth(pages[1], updates=3)  # user B's answer keeps coming
    pages[1].click("#stop")
    pages[1].wait_for_selector("#chatbot [data-testid='bot'] >> text=stopped", timeout=30_000)
    deadline = time.monotonic() + 30
    while server_cpu(server) >= 50:  # A's generation was cancelled too, not left running
        assert time.monotonic() < deadline, "a generation kept running after its tab was closed"
    pages[1].context.close()


def test_segmentation_overlay(page):
    page.get_by_role("tab", name="Segmentation").click()
    page.set_input_files("#seg-image input[type=file]", str(ROOT / "assets" / "cat.png"))
    page.fill("#seg-labels-input textarea", "cat, sofa, wall")
    set_number(page, "seg-threshold", 0)  # no background: every pixel gets one of the (random) labels
    page.click("#segment")
    overlay = page.locator("#seg-overlay img")
    overlay.wait_for()
    legend = page.locator("#seg-labels").inner_text()
    assert all(f"{label} · " in legend for label in ("cat", "sofa", "wall")), legend
    assert "Background (no label confident enough): 0.0%" in legend
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "segmentation.png"), full_page=True)
    before = overlay.get_attribute("src")
    largest = max(("cat", "sofa", "wall"), key=lambda label: float(legend.split(f"{label} · ")[1].split("%")[0]))
    page.locator(f"#seg-labels label:has-text('{largest}')").click()  # hide its tint: the overlay is redrawn
    page.wait_for_function("before => document.querySelector('#seg-overlay img').src !== before", arg=before)
    page.screenshot(path=str(ARTIFACTS / "segmentation_toggled.png"), full_page=True)


def test_api_chat_and_segment(server):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    answer = client.predict(
        message={"text": "Describe the picture.", "files": [handle_file(str(ROOT / "assets" / "shapes.png"))]},
        family="qwen2_vl", max_new_tokens=12, api_name="/chat")
    assert isinstance(answer, str) and answer
    overlay, _, areas = client.predict(image=handle_file(str(ROOT / "assets" / "street.png")),
                                       labels="car, tree, sky", threshold=0.0, api_name="/segment")
    assert Path(overlay).suffix == ".png" and Path(overlay).stat().st_size > 0
    assert list(areas) == ["car", "tree", "sky", "background"]
    assert areas["background"] == 0.0 and abs(sum(areas.values()) - 100) < 0.5


# Checkpoint values an attacker sends (the hidden Checkpoint box of /chat, the page's own events by fn_index):
# once each deleted or created directories, or loaded GroupViT into Qwen2-VL's place for every user.
CHECKPOINT_ATTACKS = ["tiny:../victim", "tiny:../../victim", "tiny:../../**/victim", "tiny:*", "tiny:",
                      "tiny:../../made_by_attacker/sub/x", "tiny:groupvit", "tiny random (groupvit)",
                      "tiny random (../victim)", "../victim", "/etc", str(ROOT), "~"]


def chat_values(checkpoint: str, family: str = "qwen2_vl") -> list:
    """The /chat endpoint's inputs: message, family, checkpoint, system, sampling and media settings."""
    return [{"text": "hi", "files": []}, family, checkpoint, "", 4, 0, 1, 0, 1, -1, 0, 2.0, 0, -1]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_no_request_deletes_or_creates_a_directory(server):
    """Every checkpoint a request names is checked against the server's list before anything runs."""
    cache = server.cache
    victims = [cache.parent / "victim-1", cache.parent.parent / "victim-2", cache / "victim-3",
               cache / "qwen2_vl-0123456789"]  # the last looks like a stale tiny checkpoint
    for victim in victims:
        victim.mkdir(exist_ok=True)
        (victim / "keep").write_text("mine")
    before = tree(cache.parent)
    refusals = server.log.read_text().count("refused: ")
    api = Api(server.url)
    for attack in CHECKPOINT_ATTACKS:
        outcomes = {
            "/chat": api.call("chat", chat_values(attack)),
            "load_model": api.event("load_model", ["qwen2_vl", attack]),
            "respond": api.event("respond", [None] + chat_values(attack)[1:]),
        }
        if attack != "tiny random (groupvit)":  # GroupViT's own (the segmentation tab's only family)
            outcomes["/segment"] = api.call("segment", [None, "cat", "groupvit", attack, 0.0, 0.5, True])
        for route, (kind, payload) in outcomes.items():
            assert kind == "error" and "checkpoint" in payload["error"], (attack, route, payload)
            assert str(ROOT) not in json.dumps(payload) or attack == str(ROOT), payload
    assert all((victim / "keep").read_text() == "mine" for victim in victims)
    assert tree(cache.parent) == before and not list(cache.parent.parent.glob("made_by_attacker"))
    assert api.call("chat", chat_values("tiny random (qwen2_vl)", "glm4"))[0] == "error"  # not glm4's
    assert api.call("chat", chat_values(""))[0] == "answer"  # the family's own checkpoint still answers
    log = server.log.read_text()
    assert log.count("refused: ") - refusals >= 3 * len(CHECKPOINT_ATTACKS) and "Traceback" not in log


# ------------------------------------------------------------------------------------ the UI's pieces
def test_settings_and_checkpoints_without_hub(tmp_path):
    from vlm.families import FAMILIES
    from vlm.ui.checkpoints import Catalog, code_hash
    from vlm.ui.settings import Settings

    stale, current, other = tmp_path / "qwen2_vl-0123456789", tmp_path / f"qwen2_vl-{code_hash()}", tmp_path / "mine"
    for directory in (stale, current, other):
        directory.mkdir()
    settings = Settings.from_env({"VLM_TINY": "1", "VLM_CACHE_DIR": str(tmp_path), "VLM_MODEL_GLM4V": "/m/glm",
                                  "VLM_MEMORY_BUDGET_GB": "2", "VLM_MAX_IMAGES": "3"})
    assert settings.memory_budget_bytes == 2 * 2**30 and settings.limits.max_images == 3
    catalog = Catalog.discover(settings)
    assert not stale.exists() and current.exists() and other.exists()  # only older tiny checkpoints go, at startup
    assert not catalog.hub_reachable  # VLM_TINY: the hub is not even asked
    assert catalog.default_source("glm4v") == "/m/glm" and catalog.default_source("qwen2_vl") == "tiny:qwen2_vl"
    assert catalog.default_source("qwen2_5_vl") == "tiny:qwen2_5_vl"
    assert catalog.choices("glm4v") == ["glm (local directory)", "THUDM/GLM-4.1V-9B-Thinking", "tiny random (glm4v)"]
    assert catalog.source("glm4v", "glm (local directory)") == "/m/glm"  # pages name it without its path
    assert set(catalog.tiny_families()) == set(FAMILIES) - {"glm4v"}
    assert "answers are random" in catalog.banner() and "VLM_MODEL_" in catalog.banner()
    for family, choice in [("qwen2_vl", "tiny random (groupvit)"), ("qwen2_vl", "tiny:qwen2_vl"), ("qwen2_vl", "/m/glm"),
                           ("qwen3", "tiny random (qwen2_vl)")]:
        with pytest.raises(vlm.errors.InputError):
            catalog.source(family, choice)
    for source in ("someone/else", "tiny:../victim", "tiny:nonexistent"):
        with pytest.raises(vlm.errors.ModelNotFoundError, match="VLM_CUSTOM_CHECKPOINTS"):
            catalog.resolve(source)
    tiny = catalog.resolve("tiny:qwen2_vl")
    assert (tiny / "config.json").is_file() and catalog.resolve("tiny:qwen2_vl") == tiny  # written once
    custom = Catalog.discover(Settings.from_env({"VLM_TINY": "1", "VLM_CACHE_DIR": str(tmp_path),
                                                 "VLM_CUSTOM_CHECKPOINTS": "1"}))
    assert custom.source("qwen2_vl", "someone/else") == "someone/else"  # an operator's choice, a hub id
    with pytest.raises(vlm.errors.InputError):
        custom.source("qwen2_vl", "tiny:../victim")  # never a tiny source


def test_request_options():
    from vlm.ui.chat import request_options

    greedy = request_options(64, 0, 1, 0, 1, -1, 0, 2.0, 0, -1)
    assert greedy == {"max_new_tokens": 64, "do_sample": False, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                      "seed": None, "max_pixels": None, "fps": 2.0, "num_frames": None}
    sampled = request_options(64, 0.7, 0.9, 50, 1.1, 3, 50176, 0, 8, 100)
    assert sampled["do_sample"] and sampled["temperature"] == 0.7 and sampled["seed"] == 3
    media = (sampled["max_pixels"], sampled["fps"], sampled["num_frames"], sampled["thinking_budget"])
    assert media == (50176, None, 8, 100)


def test_turns_render_thinking_stats_errors_and_boxes():
    from vlm.session import Snapshot, Stats
    from vlm.ui.turns import ChatState, Turn, answer_messages, draw_boxes, user_turn

    state = ChatState()
    image = str(ROOT / "assets" / "shapes.png")
    for text, answer in (("first", "one"), ("failed", None), ("third", None)):
        user, _ = user_turn(text, [image] if text == "first" else [])
        state.turns.append(Turn(user, 0, answer))
    conversation = state.conversation("Be brief.")
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user"]
    assert conversation[-1]["content"] == [{"type": "text", "text": "third"}] and state.images() == [image]

    thinking = answer_messages(Snapshot(1, "", "let me see", ""))
    assert thinking == [{"role": "assistant", "content": "let me see",
                         "metadata": {"title": "Thinking", "status": "pending"}}]
    done = answer_messages(Snapshot(2, "", "let me see", "<|box_start|>(1,2),(3,4)<|box_end|>", done=True,
                                    finish="cancelled", stats=Stats(0.25, 11, 1.25, 64)))
    assert done[0]["metadata"]["status"] == "done"
    stats = "0.25 s to first token · 10.0 tokens/s · 64 visual tokens · stopped"
    assert done[1]["content"] == f"(1,2),(3,4)\n\n<sub>{stats}</sub>"
    failed = answer_messages(Snapshot(3, "", "", "", done=True, finish="error", error=vlm.errors.InputError("bad")))
    assert failed == [{"role": "assistant", "content": "⚠️ **Error:** bad"}]

    boxed = draw_boxes("<|begin_of_box|>[406, 500, 625, 792]<|end_of_box|>", image)
    assert boxed.size == (640, 480) and boxed.getpixel((260, 240)) != (30, 136, 229)  # the square's edge is drawn
    assert draw_boxes("no boxes here", image) is None
    half = draw_boxes('[{"bbox_2d": [10, 10, 100, 100], "label": "cat"}, {"point_2d": [250, 200]}]', image,
                      lambda width, height: (width / 2, height / 2))  # pixels of the image resized to half
    orange, sky = (230, 159, 0), (86, 180, 233)  # the palette's first two colours
    assert half.getpixel((22, 24)) == orange  # the label's background at the box's corner (20, 20)
    assert half.getpixel((200, 120)) == orange and half.getpixel((500, 400)) == sky  # right edge; the point


def test_boxes_are_drawn_in_the_familys_coordinates(tmp_path, monkeypatch):
    """Qwen2.5-VL's boxes are pixels of the image as its processor resized it (with the request's max_pixels):
    the chat draws them at the same place of the original picture."""
    from vlm.session import SessionManager, Snapshot
    from vlm.ui import chat
    from vlm.ui.turns import ChatState, Turn, draw_boxes, user_turn

    drawn = []  # what the chat shows, before Gradio stores it (lossily)
    monkeypatch.setattr(chat, "draw_boxes", lambda *args: drawn.append(draw_boxes(*args)) or drawn[-1])

    manager = SessionManager(dtype="float32")
    source = str(vlm.tiny.write("qwen2_5_vl", tmp_path / "qwen2_5_vl"))
    pipe = manager.get("qwen2_5_vl", source)
    image = str(ROOT / "assets" / "shapes.png")  # 640x480
    state = ChatState()
    state.turns.append(Turn(user_turn("Where?", [image])[0], 0))
    tab = chat.ChatTab(manager, None, ["qwen2_5_vl"], None, None)  # boxes() needs neither the catalog nor the gate
    frames = [pipe.box_frame(640, 480, max_pixels=max_pixels) for max_pixels in (None, 28 * 28 * 16)]
    assert frames[0] != frames[1] and (640, 480) not in frames
    for max_pixels, (width, height) in zip((None, 28 * 28 * 16), frames):
        answer = f'```json\n[{{"bbox_2d": [0, 0, {width // 2}, {height}], "label": "left"}}]\n```'
        assert len(tab.boxes(Snapshot(1, "", "", answer, done=True), state, "qwen2_5_vl", {"max_pixels": max_pixels}))
        assert drawn[-1].getpixel((320, 240)) == (230, 159, 0)  # the left half's right edge, at x = 320
    assert tab.boxes(Snapshot(1, "", "", "none", done=True), state, "qwen2_5_vl", {}) == ()

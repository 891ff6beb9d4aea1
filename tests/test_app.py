"""End to end: `python app.py` on a free port with tiny checkpoints, driven in headless Chromium and
through the Gradio API. Screenshots go to artifacts/app/ (git-ignored).

Qwen2-VL is served from a tiny checkpoint that never writes its end-of-sequence token and is a bit
larger than the built-in one, so an answer streams for several seconds: long enough to watch it grow
and to stop it. Needs Debian's chromium (/usr/bin/chromium) and the playwright package.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import vlm.errors
from tests.endless import endless_qwen2_vl

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "app"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_SECONDS = 180

ANSWERS_WITH_STATS = ("[...document.querySelectorAll('#chatbot [data-testid=bot]')]"
                      ".filter(b => b.innerText.includes('visual tokens')).length >= {}")

pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slow_endless_qwen2_vl(directory: Path) -> Path:
    """A larger endless tiny Qwen2-VL: 2048 tokens take ~10 s here, so a streaming answer is still running
    when a test looks at it."""
    return endless_qwen2_vl(directory, text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                                 mrope_section=[8, 12, 12]))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app's URL and process, started like the README says, with tiny checkpoints and no network."""
    port = free_port()
    log = (tmp_path_factory.mktemp("log") / "app.log").open("w")
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VLM_TINY": "1",
        "VLM_CACHE_DIR": str(tmp_path_factory.mktemp("tiny")),
        "VLM_MODEL_QWEN2_VL": str(slow_endless_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))),
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
    yield url, process
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
    open_app(page, server[0])
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

    return psutil.Process(server[1].pid).cpu_percent(interval=1.0)


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


def test_chat_streams_and_stops(page, server):
    set_number(page, "max-new-tokens", 2048, accordion="Sampling")
    assert page.locator("#stop").is_disabled()  # nothing to stop yet
    ask(page, "What is in this picture?", "street.png")
    wait_for_growth(page)
    assert page.locator("#stop").is_enabled()
    page.screenshot(path=str(ARTIFACTS / "chat_streaming.png"), full_page=True)

    page.click("#stop")
    page.wait_for_selector("#chatbot [data-testid='bot'] >> text=stopped", timeout=30_000)
    answer = page.locator("#chatbot [data-testid='bot']", has_text="stopped").last  # (boxes may follow it)
    stopped = answer.inner_text()
    assert "to first token" in stopped and "visual tokens" in stopped
    page.wait_for_timeout(1000)
    assert answer.inner_text() == stopped  # nothing more arrives
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
        open_app(page, server[0])
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

    client = Client(server[0], verbose=False)
    answer = client.predict(
        message={"text": "Describe the picture.", "files": [handle_file(str(ROOT / "assets" / "shapes.png"))]},
        family="qwen2_vl", max_new_tokens=12, api_name="/chat")
    assert isinstance(answer, str) and answer
    overlay, _, areas = client.predict(image=handle_file(str(ROOT / "assets" / "street.png")),
                                       labels="car, tree, sky", threshold=0.0, api_name="/segment")
    assert Path(overlay).suffix == ".png" and Path(overlay).stat().st_size > 0
    assert list(areas) == ["car", "tree", "sky", "background"]
    assert areas["background"] == 0.0 and abs(sum(areas.values()) - 100) < 0.5


# ------------------------------------------------------------------------------------ the UI's pieces
def test_settings_and_checkpoints_without_hub(tmp_path):
    from vlm.families import FAMILIES
    from vlm.ui.checkpoints import Catalog
    from vlm.ui.settings import Settings

    settings = Settings.from_env({"VLM_TINY": "1", "VLM_CACHE_DIR": str(tmp_path), "VLM_MODEL_GLM4V": "/m/glm",
                                  "VLM_MEMORY_BUDGET_GB": "2", "VLM_MAX_IMAGES": "3"})
    assert settings.memory_budget_bytes == 2 * 2**30 and settings.limits.max_images == 3
    catalog = Catalog.discover(settings)
    assert not catalog.hub_reachable  # VLM_TINY: the hub is not even asked
    assert catalog.default("glm4v") == "/m/glm" and catalog.default("qwen2_vl") == "tiny:qwen2_vl"
    assert set(catalog.tiny_families()) == set(FAMILIES) - {"glm4v"}
    assert "answers are random" in catalog.banner() and "VLM_MODEL_" in catalog.banner()
    with pytest.raises(vlm.errors.ModelNotFoundError, match="VLM_CUSTOM_CHECKPOINTS"):
        catalog.resolve("someone/else")
    tiny = catalog.resolve("tiny:qwen2_vl")
    assert (tiny / "config.json").is_file() and catalog.resolve("tiny:qwen2_vl") == tiny  # written once


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

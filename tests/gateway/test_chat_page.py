"""The chat page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) over the real swarm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import OUTPUT, chat_ids
from tests.gateway.conftest import TOKEN, GatewayThread, server_sessions, settled_sessions, wait_sessions_freed

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = OUTPUT / "gateway"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]

# Keeps, in the page, every text the streaming answer showed before it was done.
RECORD_SNAPSHOTS = """
window.snapshots = [];
new MutationObserver(() => {
  const box = document.querySelector('[data-testid=assistant]:last-of-type');
  if (box && box.dataset.done !== 'true') window.snapshots.push(box.querySelector('.text').textContent);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture()
def page(gateway: GatewayThread) -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def open_chat(page: Any, gateway: GatewayThread) -> None:
    page.goto(gateway.url + "/")
    page.wait_for_function("document.getElementById('status-text').textContent === 'API key needed'")  # the gateway has a token
    page.fill("[data-testid=api-key]", TOKEN)
    page.dispatch_event("[data-testid=api-key]", "change")
    page.wait_for_function("document.getElementById('status-text').textContent === 'SmolLM2-135M-Instruct'")


def test_chat_page_streams_the_answer_and_names_the_spans(page: Any, gateway: GatewayThread, local_smollm2: Any,
                                                          tokenizer: Any, swarm3: Any) -> None:
    question = "What is the capital of France? Answer in two sentences."
    ids = chat_ids(tokenizer, question)
    with torch.no_grad():
        out = local_smollm2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    open_chat(page, gateway)
    page.fill("[data-testid=temperature]", "0")
    page.fill("[data-testid=max-tokens]", "60")
    page.evaluate(RECORD_SNAPSHOTS)
    page.locator("[data-testid=prompt]").press_sequentially(question)
    page.press("[data-testid=prompt]", "Enter")
    page.wait_for_selector("[data-testid=stop]:visible", timeout=10_000)  # the stop button shows while streaming
    page.wait_for_selector("[data-testid=assistant][data-done=true]")

    assert page.text_content("[data-testid=user] .text") == question
    answer = page.text_content("[data-testid=assistant] .text")
    assert answer == expected  # the page shows exactly what local transformers generates
    partial = [s for s in page.evaluate("window.snapshots") if s and s != answer]
    assert len(set(partial)) >= 5, f"tokens should stream in, saw {partial}"
    assert all(answer.startswith(s) for s in partial)
    spans = page.text_content("[data-testid=spans]")
    for server in swarm3.routes().servers:
        assert f"{server.id} [{server.start}, {server.end})" in spans
    assert "completion tokens" in spans
    assert page.is_hidden("[data-testid=stop]") and page.is_enabled("[data-testid=send]")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat.png"))
    assert (SCREENSHOTS / "chat.png").stat().st_size > 10_000


def test_stop_button_ends_the_answer_and_frees_the_swarm(page: Any, gateway: GatewayThread, swarm3: Any) -> None:
    before = settled_sessions(swarm3)  # other tests' sessions may still be closing: only ours must be freed
    open_chat(page, gateway)
    page.fill("[data-testid=temperature]", "0")
    page.fill("[data-testid=max-tokens]", "400")
    page.fill("[data-testid=prompt]", "Tell me a very long story about a dragon and a knight.")
    page.press("[data-testid=prompt]", "Enter")
    page.wait_for_function("(document.querySelector('[data-testid=assistant] .text')?.textContent || '').length > 40")
    assert all(server_sessions(swarm3))
    page.click("[data-testid=stop]")
    page.wait_for_selector("[data-testid=assistant][data-done=true]")
    note = page.text_content("[data-testid=spans]")
    assert note.startswith("stopped · answered so far by")
    for server in swarm3.routes().servers:
        assert f"{server.id} [{server.start}, {server.end})" in note
    freed = wait_sessions_freed(swarm3, timeout=30, before=before)
    assert all(now <= then for now, then in zip(freed, before, strict=True)), (freed, before)
    stopped_at = page.text_content("[data-testid=assistant] .text")
    page.wait_for_timeout(500)
    assert page.text_content("[data-testid=assistant] .text") == stopped_at  # nothing arrives after stop
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat-stopped.png"))

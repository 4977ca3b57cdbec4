"""The web demo's conversation in Debian's chromium: the shipped examples as one-click samples,
Ask disabled until an image is chosen, a system prompt and a follow-up question about the same
image (the page sends the whole history as messages)."""

from __future__ import annotations

import os

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.serve_helpers import EXAMPLES, demo_server
from tests.test_serve_browser import browser  # noqa: F401 (the chromium fixture)

SYSTEM = "You are a careful assistant who answers in one short sentence."
# records every request body the page sends
RECORD = ("window.sent = []; const f = window.fetch; window.fetch = (url, opts) => { "
          "if (opts && opts.body) window.sent.push(JSON.parse(opts.body)); return f(url, opts); };")


@pytest.fixture(scope="module")
def server():
    with demo_server(slots=2, max_queue=8) as s:
        yield s


def opened(browser, server):  # noqa: F811
    browser.get(f"{server.url}/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("model:"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#samples button img"))
    return wait


def ask(browser, wait, question: str) -> str:  # noqa: F811
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled()
               and d.find_element(By.ID, "col-on").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.ID, "col-on").get_attribute("data-state") == "done"
    return browser.find_element(By.ID, "answer-on").get_attribute("textContent")


def test_samples_are_the_shipped_examples_and_ask_waits_for_an_image(server, browser):  # noqa: F811
    wait = opened(browser, server)
    names = [b.get_attribute("data-name") for b in browser.find_elements(By.CSS_SELECTOR, "#samples button")]
    assert names == sorted(f[:-4] for f in os.listdir(EXAMPLES) if f.endswith(".png"))
    ask_button = browser.find_element(By.ID, "ask")
    assert not ask_button.is_enabled() and ask_button.get_attribute("title") == "choose an image first"
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-name="risky"]').click()
    wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
    assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png;base64,")
    chosen = browser.find_elements(By.CSS_SELECTOR, "#samples button.chosen")
    assert [b.get_attribute("data-name") for b in chosen] == ["risky"]
    answer = ask(browser, wait, "What is shown in this image?")
    assert answer.startswith("I'm sorry")  # the verdict's refusal, with no leading space
    assert "level 3 (high)" in browser.find_element(By.CSS_SELECTOR, "#col-on .verdict-line").text


def test_a_follow_up_question_sends_the_system_prompt_and_the_whole_history(server, browser):  # noqa: F811
    wait = opened(browser, server)
    browser.execute_script(RECORD)
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-name="clean"]').click()
    wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
    browser.find_element(By.ID, "system").send_keys(SYSTEM)
    first = ask(browser, wait, "What is shown in this image?")
    assert first and not first[0].isspace()
    assert not browser.find_element(By.ID, "new-chat").get_attribute("disabled")
    second = ask(browser, wait, "What colour is it?")
    assert second and not second[0].isspace()

    history = [t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "#col-on .history .turn")]
    assert history == ["What is shown in this image?", first]
    sent = [body for body in browser.execute_script("return window.sent") if "messages" in body]
    assert len(sent) == 2
    image = {"type": "image_url", "image_url": {"url": sent[0]["messages"][1]["content"][0]["image_url"]["url"]}}
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    question = [image, {"type": "text", "text": "What is shown in this image?"}]
    assert sent[0]["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    assert sent[1]["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                                   {"role": "assistant", "content": first},
                                   {"role": "user", "content": "What colour is it?"}]

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#col-on .history .turn") == []
    assert browser.find_element(By.ID, "answer-on").get_attribute("textContent") == ""

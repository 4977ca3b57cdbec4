"""The web demo in a real headless browser (Debian's chromium + chromedriver, via selenium):
upload an image, ask, read the verdict and both streamed answers from the page, screenshot."""

from __future__ import annotations

import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.serve_helpers import EXAMPLES

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


@pytest.fixture(scope="module")
def server(demo_api):
    return demo_api


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_window_size(1280, 860)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_shows_the_verdict_and_streams_both_answers(server, browser, tmp_path):
    browser.get(f"{server.url}/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("model:"))
    assert not browser.find_element(By.ID, "ask").is_enabled()  # no image yet
    browser.find_element(By.ID, "image").send_keys(os.path.join(EXAMPLES, "risky.png"))
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed() and d.find_element(By.ID, "ask").is_enabled())
    browser.find_element(By.ID, "compare").click()
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: all(d.find_element(By.ID, c).get_attribute("data-state") in ("done", "error")
                             for c in ("col-on", "col-off")))

    assert browser.find_element(By.ID, "col-on").get_attribute("data-state") == "done"
    assert browser.find_element(By.ID, "col-off").get_attribute("data-state") == "done"
    verdict = browser.find_element(By.CSS_SELECTOR, "#col-on .verdict-line").text
    assert "level 3 (high)" in verdict and "action: refuse" in verdict
    level_bars = browser.find_elements(By.CSS_SELECTOR, '#col-on .bars[data-kind="level"] .fill')
    type_bars = browser.find_elements(By.CSS_SELECTOR, '#col-on .bars[data-kind="type"] .fill')
    assert (len(level_bars), len(type_bars)) == (4, 7)
    widths = [float(b.get_attribute("style").split("width:")[1].split("%")[0]) for b in level_bars]
    assert max(widths) == widths[3] > 50  # the "high" bar is the longest
    risky_type = browser.find_element(By.CSS_SELECTOR, '#col-on .bars[data-kind="type"] div.top').text
    assert f"type: {risky_type}" in verdict  # the bold bar is the type the verdict names
    assert browser.find_element(By.ID, "answer-on").get_attribute("textContent").startswith("I'm sorry")
    plain = browser.find_element(By.ID, "answer-off").get_attribute("textContent")
    assert plain and not plain[0].isspace() and not plain.startswith("I'm sorry")

    shot = tmp_path / "serve_page.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000

"""The status page in a real browser: Debian's Chromium, headless, driven by selenium through
chromium-driver, against a running engine (embedded: `engine worker` processes and the API)."""

from __future__ import annotations

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from engine.job import JobState
from tests.support.processes import wait_for_state

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def mode() -> str:
    return "embedded"


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1280,1400"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def running_engine(start_engine, serve):
    start_engine("worker", "--processes", "1", "--threads", "4")
    return serve(api_token="page-token")


def _open(browser, url: str) -> None:
    """Open the page and give it the token once, as a user would."""
    browser.get(url)
    wait = WebDriverWait(browser, 20)
    field = wait.until(lambda driver: driver.find_element(By.ID, "token-input") if driver.find_element(By.ID, "token-input").is_displayed() else None)
    field.send_keys("page-token")
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait.until(lambda driver: _text(driver, "counts").strip())


def _text(browser, element_id: str) -> str:
    """An element's text, read in the page: the page redraws its elements as it polls."""
    return browser.execute_script("const e = document.getElementById(arguments[0]); return e ? e.textContent : ''", element_id)


def _rows(browser, selector: str) -> int:
    return browser.execute_script("return document.querySelectorAll(arguments[0]).length", selector)


def _progress(browser) -> float:
    return float(browser.execute_script("return document.getElementById('job-progress').value"))


def test_a_running_jobs_progress_bar_moves_without_a_reload(running_engine, browser, tmp_path):
    client = running_engine
    client.token = "page-token"
    job = client.post("/api/jobs", {"actor": "cooperative", "args": [800]}).json
    _open(browser, f"{client.url}/#job={job['id']}")
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    wait.until(lambda driver: _text(driver, "job-state") == "running")
    first = wait.until(lambda driver: _progress(driver) or None)
    browser.save_screenshot(str(tmp_path / "progress-1.png"))
    wait.until(lambda driver: _progress(driver) > first)
    browser.save_screenshot(str(tmp_path / "progress-2.png"))
    assert browser.execute_script("return performance.getEntriesByType('navigation').length") == 1  # no reload
    wait_for_state(job["id"], {JobState.SUCCEEDED}, timeout=60)
    wait.until(lambda driver: _text(driver, "job-state") == "succeeded")
    assert _progress(browser) == 100


def test_a_failed_jobs_retry_button_runs_it_again(running_engine, browser, tmp_path):
    client = running_engine
    client.token = "page-token"
    job = client.post("/api/jobs", {"actor": "hopeless"}).json
    wait_for_state(job["id"], {JobState.FAILED})
    _open(browser, f"{client.url}/#job={job['id']}")
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    wait.until(lambda driver: _text(driver, "job-state") == "failed")
    wait.until(lambda driver: _rows(driver, "#attempts tbody tr") == 1)
    browser.save_screenshot(str(tmp_path / "failed.png"))
    retry = browser.find_element(By.ID, "retry-button")
    assert retry.is_enabled() and not browser.find_element(By.ID, "cancel-button").is_enabled()
    retry.click()
    # it runs again: a second attempt, which fails as the first did
    wait.until(lambda driver: _rows(driver, "#attempts tbody tr") == 2)
    wait.until(lambda driver: _text(driver, "job-state") == "failed")
    assert client.get(f"/api/jobs/{job['id']}").json["attempts"] == 2
    browser.save_screenshot(str(tmp_path / "retried.png"))


def test_the_page_fits_a_phone_and_lists_jobs_and_workers(running_engine, browser, tmp_path):
    client = running_engine
    client.token = "page-token"
    ids = [client.post("/api/jobs", {"actor": "echo", "args": [n]}).json["id"] for n in range(3)]
    browser.set_window_size(390, 844)
    _open(browser, client.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    wait.until(lambda driver: all(job_id in _text(driver, "job-list") for job_id in ids))
    wait.until(lambda driver: "alive" in _text(driver, "worker-list"))
    # nothing wider than the screen but the tables' own scrolling boxes
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390 + 1
    # every form control has a label
    unlabeled = browser.execute_script(
        "return [...document.querySelectorAll('input, select')].filter(e => !e.labels || !e.labels.length).map(e => e.id)"
    )
    assert unlabeled == []
    browser.save_screenshot(str(tmp_path / "phone.png"))


def test_a_schedules_run_now_creates_a_job(running_engine, browser, tmp_path):
    client = running_engine
    client.token = "page-token"
    client.post("/api/schedules", {"name": "hourly-echo", "actor": "echo", "cron": "0 * * * *", "args": ["tick"]})
    _open(browser, f"{client.url}/#schedule=hourly-echo")
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    wait.until(lambda driver: "hourly-echo" in _text(driver, "schedule-list") and _text(driver, "schedule-preview"))
    browser.execute_script("document.querySelector('[aria-label=\"Run now hourly-echo\"]').click()")
    job_id = wait.until(lambda driver: (client.get("/api/jobs?schedule=hourly-echo").json["jobs"] or [None])[0])["id"]
    wait.until(lambda driver: job_id in _text(driver, "notice"))
    wait_for_state(job_id, {JobState.SUCCEEDED})
    browser.execute_script("document.querySelector('[aria-label=\"Pause hourly-echo\"]').click()")
    wait.until(lambda driver: "paused" in _text(driver, "schedule-list"))
    assert client.get("/api/schedules/hourly-echo").json["enabled"] is False
    browser.execute_script("document.getElementById('schedules').scrollIntoView()")
    browser.save_screenshot(str(tmp_path / "schedules.png"))

"""The console in a real browser: Debian's Chromium driven by chromedriver
(Selenium), against the session deployment on Ray Serve and PostgreSQL.

Every page is photographed at 1280×800 and 390×844 into the folder the
run prints (CHRONORAY_SCREENSHOTS, else .run/screenshots)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import SCREENSHOTS

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.browser]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
XSS_OUTPUT = "<img src=x onerror=alert(1)>"
UTC = timezone.utc


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(
        os.environ.get("CHRONORAY_SCREENSHOTS")
        or Path(__file__).resolve().parents[2] / ".run" / "screenshots"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail("Chromium and chromedriver are missing: `make system-deps` installs them")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,800")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, timeout_s: float = 20):
    """Polled pages swap their elements: a stale one is looked up again."""
    return WebDriverWait(
        driver,
        timeout_s,
        poll_frequency=0.1,
        ignored_exceptions=[NoSuchElementException, StaleElementReferenceException],
    )


def photograph(driver, folder: Path, name: str) -> None:
    """The page at both sizes: rendered, not blank, no horizontal scroll
    of the page itself (wide tables scroll inside their card)."""
    for size, (width, height) in SIZES.items():
        driver.set_window_size(width, height)
        wait(driver).until(lambda d: d.execute_script("return document.readyState") == "complete")
        path = folder / f"{name}-{size}.png"
        assert driver.save_screenshot(str(path)) and path.stat().st_size > 5_000
        SCREENSHOTS.append(path)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, f"{name} at {size} scrolls sideways by {overflow}px"
    driver.set_window_size(*SIZES["desktop"])


def sign_in(driver, base: str, token: str) -> None:
    driver.get(f"{base}/ui/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    wait(driver).until(seen.presence_of_element_located((By.ID, "logout")))


def preview_text(driver) -> str:
    """The preview's text; '' while the script swaps it (a stale element)."""
    try:
        return driver.find_element(By.ID, "preview").text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def no_dialog(driver) -> bool:
    try:
        _ = driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_console_end_to_end_in_chromium(deployment, client, browser, shots):
    base = deployment.url
    client.register_script("console-xss.sh", f"echo '{XSS_OUTPUT}'; echo \"X=$X\"")
    client.register_script("console-tick.sh", "date")

    browser.get(f"{base}/ui/tasks")  # no session: the sign-in page
    wait(browser).until(seen.presence_of_element_located((By.ID, "sign-in")))
    photograph(browser, shots, "login")
    sign_in(browser, base, deployment.token)
    photograph(browser, shots, "overview")

    # a task through the form; its page turns succeeded without a reload
    browser.get(f"{base}/ui/tasks")
    Select(browser.find_element(By.ID, "script")).select_by_value("console-xss.sh")
    browser.find_element(By.ID, "variables").send_keys("X=<b>x</b>")
    browser.find_element(By.CSS_SELECTOR, "#submit-task button").click()
    wait(browser).until(seen.presence_of_element_located((By.ID, "task-status")))
    task_url = browser.current_url.split("?")[0]
    browser.execute_script("window.stillTheSamePage = true")
    wait(browser, 30).until(lambda d: d.find_element(By.ID, "task-status").text == "succeeded")
    assert browser.execute_script("return window.stillTheSamePage === true")  # no reload
    output = browser.find_element(By.ID, "output-1")
    assert XSS_OUTPUT in output.text and "X=<b>x</b>" in output.text
    assert browser.find_elements(By.CSS_SELECTOR, "#output-1 img, #variables b") == []
    assert "<b>x</b>" in browser.find_element(By.ID, "variables").text
    assert no_dialog(browser)
    photograph(browser, shots, "task")
    browser.get(f"{base}/ui/tasks")
    photograph(browser, shots, "tasks")

    # a schedule: the preview shows as the expression is typed; then pause it
    browser.get(f"{base}/ui/schedules/new")
    Select(browser.find_element(By.ID, "script")).select_by_value("console-tick.sh")
    browser.find_element(By.ID, "cron").send_keys("*/10 * * * *")
    zone = browser.find_element(By.ID, "timezone")
    zone.clear()
    zone.send_keys("Europe/Berlin")
    # the preview follows the typing (it may show UTC's fires first): wait for Berlin's
    wait(browser).until(lambda d: "CET" in preview_text(d))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#preview-fires li")) == 5
    photograph(browser, shots, "schedule-new")
    cron = browser.find_element(By.ID, "cron")
    cron.send_keys("x")  # not an expression: the preview says why
    wait(browser).until(seen.presence_of_element_located((By.ID, "preview-error")))
    cron.send_keys("\b")
    wait(browser).until(seen.presence_of_element_located((By.ID, "preview-fires")))
    browser.find_element(By.ID, "create-schedule").click()
    wait(browser).until(seen.presence_of_element_located((By.ID, "pause")))
    assert browser.find_element(By.ID, "schedule-state").text == "active"
    browser.find_element(By.ID, "pause").click()
    wait(browser).until(seen.presence_of_element_located((By.ID, "resume")))
    assert browser.find_element(By.ID, "schedule-state").text == "paused"
    photograph(browser, shots, "schedule")
    browser.find_element(By.LINK_TEXT, "Audit another window →").click()
    wait(browser).until(seen.presence_of_element_located((By.ID, "findings")))
    photograph(browser, shots, "audit")
    browser.get(f"{base}/ui/schedules")
    assert browser.find_elements(By.CSS_SELECTOR, "[data-audit]")
    photograph(browser, shots, "schedules")

    for page, marker in [
        ("executors", "tiers"),
        ("scripts", "scripts"),
        ("scripts/console-xss.sh", "script-body"),
        ("dead", "dead"),
    ]:
        browser.get(f"{base}/ui/{page}")
        wait(browser).until(seen.presence_of_element_located((By.ID, marker)))
        photograph(browser, shots, page.replace("/", "-"))
    assert browser.find_elements(By.CSS_SELECTOR, "#script-body img") == []
    browser.get(f"{base}/ui/executors")
    assert browser.find_elements(By.CSS_SELECTOR, "#tiers tbody tr")
    if deployment.settings.zookeeper_hosts:  # the mirror's executors beside the pool's
        pool_ids = {
            row.find_element(By.TAG_NAME, "td").text
            for row in browser.find_elements(By.CSS_SELECTOR, "#pool-executors tbody tr")
        }
        mirrored = {
            row.find_element(By.TAG_NAME, "td").text
            for row in browser.find_elements(By.CSS_SELECTOR, "#mirror-executors tbody tr")
        }
        assert mirrored & pool_ids  # the same executors, seen through ZooKeeper
    else:
        assert browser.find_elements(By.ID, "mirror-off")

    # another user's task is the not-found page
    _, their_token = deployment.new_user("console-other")
    theirs = httpx.post(
        f"{base}/v1/tasks",
        json={"script": "console-tick.sh", "execute_at": datetime.now(UTC).isoformat()},
        headers={"Authorization": f"Bearer {their_token}"},
    )
    if theirs.status_code == 404:  # their own script first
        httpx.put(
            f"{base}/v1/scripts/console-tick.sh",
            content=b"date",
            headers={"Authorization": f"Bearer {their_token}", "content-type": "text/plain"},
        )
        theirs = httpx.post(
            f"{base}/v1/tasks",
            json={"script": "console-tick.sh", "execute_at": datetime.now(UTC).isoformat()},
            headers={"Authorization": f"Bearer {their_token}"},
        )
    browser.get(f"{base}/ui/tasks/{theirs.json()['task_id']}")
    assert browser.find_elements(By.ID, "not-found")
    photograph(browser, shots, "not-found")

    # signing out ends the session: the task page asks for sign-in again
    browser.get(task_url)
    browser.find_element(By.ID, "logout").click()
    wait(browser).until(seen.presence_of_element_located((By.ID, "sign-in")))
    browser.get(task_url)
    wait(browser).until(seen.presence_of_element_located((By.ID, "sign-in")))
    assert browser.get_cookie("cr_session") is None


def test_the_admin_signs_in_to_users_and_issues_a_token(deployment, browser, shots):
    base = deployment.url
    browser.delete_all_cookies()
    sign_in(browser, base, deployment.settings.admin_token)
    assert browser.current_url.endswith("/ui/users")
    browser.find_element(By.ID, "first_name").send_keys("Console")
    browser.find_element(By.ID, "last_name").send_keys("<Admin>")
    browser.find_element(By.CSS_SELECTOR, "#user-form button").click()
    wait(browser).until(lambda d: "Console <Admin>" in d.find_element(By.ID, "users").text)
    browser.find_elements(By.CSS_SELECTOR, "#users form.inline button")[-1].click()
    token = wait(browser).until(seen.presence_of_element_located((By.ID, "issued-token"))).text
    assert token.startswith("cr_") and token not in browser.current_url
    photograph(browser, shots, "users")
    browser.find_element(By.ID, "logout").click()
    wait(browser).until(seen.presence_of_element_located((By.ID, "sign-in")))
    sign_in(browser, base, token)  # the issued token signs its user in
    assert browser.current_url.rstrip("/").endswith("/ui")

"""A real headless Chromium (Debian's ``chromium`` driven through ``chromium-driver`` by
Selenium) against the web application on loopback: the login refuses a wrong password,
unauthenticated pages go to the login, the worklist shows the likely fracture first, the
study page shows its image, a verdict is recorded and shows up in the admin's audit trail,
logout ends the session. Screenshots are kept as test artefacts (``FRACTURE_TRIAGE_ARTIFACTS``
or the test's temporary folder)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver

from tests.test_api_worklist import (
    STUDY_A,
    STUDY_D,
    STUDY_E,
    add_study_with_evidence,
    populate_worklist,
)
from tests.test_cli_results import PATIENT_NAME
from tests.webapp import ADMIN_PASSWORD, PASSWORD, WebApp, serve

pytestmark = pytest.mark.slow


def _driver_paths() -> tuple[str, str]:
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("Debian's chromium and chromium-driver are needed (apt-get install -y ...)")
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _driver_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1000")
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.implicitly_wait(5)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture
def app(tmp_path: Path, dicom_samples: Path) -> Iterator[WebApp]:
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    populate_worklist(url, tmp_path / "objects", dicom_samples)
    with serve(url, tmp_path / "data") as served:
        yield served


STUDY_NEW = "1.2.826.0.1.3680043.8.498.600"


def _add_flagged_study(app: WebApp, study: str, probability: float) -> None:
    from db import repository as repo
    from db.session import make_engine, make_session_factory
    from tests.test_cli_results import _rec

    engine = make_engine(app.settings.resolved_database_url)
    with make_session_factory(engine)() as s:
        inst, _ = repo.record_received(s, _rec(study, 1))
        repo.save_result(
            s, inst.id, repo.Classification(probability, 0.5, True, "mnv2", "1.0", "2.25.7", 1, 1)
        )
        s.commit()
    engine.dispose()


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FRACTURE_TRIAGE_ARTIFACTS", tmp_path / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _log_in(chrome: WebDriver, name: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    chrome.find_element(By.ID, "name").send_keys(name)
    chrome.find_element(By.ID, "password").send_keys(password)
    chrome.find_element(By.ID, "login").click()


@pytest.mark.timeout(300)
def test_radiologist_reads_the_worklist_in_chromium(
    app: WebApp, browser: WebDriver, tmp_path: Path, dicom_samples: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC  # noqa: N812
    from selenium.webdriver.support.ui import WebDriverWait

    c = browser
    shots = _artifacts(tmp_path)
    wait = WebDriverWait(c, 30)

    c.get(f"{app.url}/worklist")
    assert c.current_url.startswith(f"{app.url}/login?next=/worklist")
    _log_in(c, "rad", "not the password")
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "p.error"), "Wrong name"))
    _log_in(c, "rad", PASSWORD)
    wait.until(EC.url_to_be(f"{app.url}/worklist"))
    rows = c.find_elements(By.CSS_SELECTOR, "#worklist tr.study")
    hrefs = [r.get_attribute("data-href") for r in rows]
    assert hrefs[:2] == [f"/studies/{STUDY_A}", f"/studies/{STUDY_D}"]
    assert "likely fracture" in rows[0].text and PATIENT_NAME in rows[0].text
    c.save_screenshot(str(shots / "worklist.png"))

    # A study classified now appears at the top without a reload (the page refreshes its
    # table every 20 s in place).
    marker = c.execute_script("window.fxtMarker = 1; return window.fxtMarker;")
    _add_flagged_study(app, STUDY_NEW, 0.99)
    WebDriverWait(c, 60).until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#worklist tr.study").get_attribute("data-href")
            == f"/studies/{STUDY_NEW}"
        )
    )
    assert c.execute_script("return window.fxtMarker;") == marker  # the same page, not reloaded

    # Keyboard: j moves to the first row, Enter opens it.
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
    c.find_element(By.TAG_NAME, "body").send_keys("j")
    first_row = f'tr[data-href="/studies/{STUDY_NEW}"]'
    wait.until(lambda d: d.switch_to.active_element.get_attribute("data-href") is not None)
    assert c.switch_to.active_element == c.find_element(By.CSS_SELECTOR, first_row)
    c.switch_to.active_element.send_keys(Keys.ENTER)
    wait.until(EC.url_to_be(f"{app.url}/studies/{STUDY_NEW}"))

    c.get(f"{app.url}/studies/{STUDY_E}")
    image = c.find_element(By.CSS_SELECTOR, ".image img")
    # Rendered on the first request (a second or two for a large radiograph).
    loaded = wait.until(
        lambda d: d.execute_script(
            "const i = arguments[0]; return i.complete && i.naturalWidth;", image
        )
    )
    assert int(loaded) > 100, "the preview image did not load"
    assert not c.find_elements(By.CSS_SELECTOR, ".image img.evidence")  # none made for E

    # A classified image with its evidence capture: the two side by side.
    study_f, _ = add_study_with_evidence(app, dicom_samples)
    c.get(f"{app.url}/studies/{study_f}")
    preview = c.find_element(By.CSS_SELECTOR, ".image img.preview")
    evidence = c.find_element(By.CSS_SELECTOR, ".image img.evidence")
    for shown in (preview, evidence):

        def natural_width(d: WebDriver, i: object = shown) -> int:
            return int(
                d.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth;", i)
            )

        assert wait.until(natural_width) > 100, f"{shown.get_attribute('class')} did not load"
    side = c.execute_script(
        "const [a, b] = arguments; const r = a.getBoundingClientRect(),"
        " s = b.getBoundingClientRect(); return s.left >= r.right && s.top < r.bottom;",
        preview,
        evidence,
    )
    assert side, "the evidence is not beside its image"
    c.save_screenshot(str(shots / "study-evidence.png"))
    c.get(f"{app.url}/studies/{STUDY_E}")
    c.find_element(By.ID, "comment").send_keys("scaphoid")
    c.find_element(By.ID, "verdict-fracture").click()
    wait.until(EC.url_contains("#verdicts"))
    wait.until(EC.text_to_be_present_in_element((By.ID, "history"), "scaphoid"))
    assert "rad" in c.find_element(By.ID, "history").text
    c.save_screenshot(str(shots / "study.png"))

    c.find_element(By.ID, "logout").click()
    wait.until(EC.url_to_be(f"{app.url}/login"))
    c.get(f"{app.url}/worklist")
    wait.until(EC.url_contains("/login?next="))

    _log_in(c, "boss", ADMIN_PASSWORD)
    wait.until(EC.url_to_be(f"{app.url}/worklist"))
    c.get(f"{app.url}/admin")
    trail = c.find_element(By.ID, "audit").text
    assert "verdict" in trail and STUDY_E in trail and "login_failed" in trail
    c.save_screenshot(str(shots / "admin.png"))

"""A real headless browser for the page tests: Debian's chromium driven by selenium, with a fake microphone.

Missing pieces fail the test with what to install (``scripts/setup.sh`` installs all three), never a skip.
Screenshots go to the test's tmp folder and, where ``SPLSM_TEST_ARTIFACTS`` names a folder, there too.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

ARTIFACTS_ENV = "SPLSM_TEST_ARTIFACTS"
INSTALL = (
    "the page tests drive Debian's chromium with selenium: apt-get install chromium chromium-driver, and "
    "pip install -e '.[dev]' for selenium (scripts/setup.sh does both)"
)


@contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """A headless chromium (a fake microphone playing a tone, its permission granted) as a selenium driver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL}")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver_bin = shutil.which("chromedriver")
    if binary is None or driver_bin is None:
        missing = " and ".join(
            n for n, b in (("chromium", binary), ("chromedriver", driver_bin)) if b is None
        )
        pytest.fail(f"{missing} not found on PATH: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # given paths: selenium's own manager downloads nothing
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save the page as ``name`` under ``tmp_path`` and under ``$SPLSM_TEST_ARTIFACTS`` where it is set."""
    path = tmp_path / name
    driver.save_screenshot(str(path))
    extra = os.environ.get(ARTIFACTS_ENV)
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path

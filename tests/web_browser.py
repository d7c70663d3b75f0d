"""Driving Debian's Chromium with Playwright, as a landlord's phone would show the page.

Not a test module: tests/test_web_browser.py builds on it. No ``playwright install``: the
browser is the system's ``/usr/bin/chromium`` (scripts/bootstrap.sh installs it).
Screenshots go to a folder under the test's tmp, and also to the folder named by
``PERMITGATE_SCREENSHOTS`` (``docs/img`` refreshes the guide's pictures).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from playwright.sync_api import Browser, BrowserContext, Page, ViewportSize

from tests.web_site import REPO, Building

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage"]
PHONE: ViewportSize = {"width": 390, "height": 844}
LOCALES = {"zh": "zh-CN", "en": "en-US"}


def phone(browser: Browser, lang: str) -> BrowserContext:
    """A new phone-sized browser context whose language is ``lang``."""
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True,
                                  has_touch=True, locale=LOCALES[lang],
                                  ignore_https_errors=True)
    context.set_default_timeout(10_000)
    return context


def no_sideways_scroll(page: Page) -> bool:
    """Whether the page fits the phone's width (nothing to scroll sideways)."""
    return bool(page.evaluate(
        "document.documentElement.scrollWidth <= window.innerWidth"))


class Shots:
    """Screenshots of the pages a landlord sees."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        target = os.environ.get("PERMITGATE_SCREENSHOTS")
        self.copy_to = (Path(target) if Path(target).is_absolute() else REPO / target
                        ) if target else None

    def take(self, page: Page, name: str) -> Path:
        """Save the whole page as ``name``.png (and copy it where asked)."""
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True, animations="disabled")
        if self.copy_to is not None:
            self.copy_to.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.copy_to / path.name)
        return path


def sign_in(page: Page, building: Building, name: str, password: str) -> None:
    """Open the page and sign in with the form."""
    page.goto(building.base + "/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("form[action='/login'] button[type=submit]")

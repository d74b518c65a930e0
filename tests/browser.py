"""Driving the web page in a real Chromium (tests/test_page.py): Playwright for Python with the
system's Chromium, never a browser Playwright downloads (it cannot be downloaded here).

Which Chromium: `SD_REST_CHROMIUM` if set, else the first of `chromium`, `chromium-browser`,
`google-chrome` on the PATH (Debian: `apt-get install chromium`, which .ci/run does). Without
one, or without the playwright package, the tests are skipped and say why.

The server's certificate is the test CA's (conftest `certs`): the browser context ignores
certificate errors rather than trusting that CA, since Chromium on Linux reads its trusted
authorities from an NSS database, not from a file it could be given.

Every page records what its console reported: `Session.assert_clean_console` fails on any
error but the failed requests a test provoked on purpose (Chromium logs a 400 or 401 answer
to fetch as "Failed to load resource"). Every test saves a screenshot for a person to look
at, in `SD_REST_SCREENSHOTS` (default: `screenshots/` at the top of the checkout).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("SD_REST_SCREENSHOTS", ROOT / "screenshots"))

# Flags this machine's Chromium needs (no sandbox as root, no GPU, and nothing that reaches
# for the network by itself). Playwright adds --headless and a fresh temporary profile (its
# own --user-data-dir) to every launch.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

try:
    import playwright.sync_api as _playwright_api  # noqa: F401

    PLAYWRIGHT = True
except ImportError:
    PLAYWRIGHT = False


def find_chromium() -> str | None:
    given = os.environ.get("SD_REST_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not PLAYWRIGHT:
        return "browser tests skipped: the playwright package is missing (pip install -e '.[test]')"
    if find_chromium() is None:
        return (
            "browser tests skipped: no Chromium found (apt-get install chromium, or set "
            "SD_REST_CHROMIUM to its path)"
        )
    return None


FAILED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@dataclass
class Session:
    """One test's page and what it saw."""

    page: Any  # playwright Page
    name: str
    console: list[str] = field(default_factory=list)
    expected: list[tuple[int, str]] = field(default_factory=list)  # (status, url part)

    def expect_failed_request(self, status: int, url_part: str) -> None:
        """A request this test makes fail on purpose: its console line is not an error."""
        self.expected.append((status, url_part))

    def record(self, kind: str, text: str, url: str) -> None:
        if kind != "error":
            return
        failed = FAILED_LOAD.search(text)
        if failed and any(
            int(failed.group(1)) == status and part in url for status, part in self.expected
        ):
            return
        self.console.append(f"{text} ({url})")

    def assert_clean_console(self) -> None:
        assert self.console == [], "errors in the browser console:\n" + "\n".join(self.console)

    def screenshot(self, suffix: str = "") -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.name}{suffix}.png"
        # From the top: the sticky header otherwise lands mid-picture in a full-page shot.
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path), full_page=True)
        return path

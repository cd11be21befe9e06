"""report.html of a model trained here renders in a real browser (headless Chromium): every picture decodes."""

from __future__ import annotations

import re
import shutil

from tests.fixtures.trained_model import digits_dataset, trained_digits  # noqa: F401  (fixtures)
from testkit.browser import Browser
from testkit.local import REPO

SCREENSHOT = REPO / ".state" / "test-artifacts" / "report.png"


async def test_report_renders_every_image_in_headless_chromium(trained_digits, tmp_path):
    report = trained_digits.package_dir / "report.html"
    text = report.read_text()
    assert trained_digits.result.metrics["report_url"] == "report.html"
    assert not re.search(r"""src=['"](?!data:)""", text)  # self-contained: every picture inline
    for heading in ("Training curves", "Reliability before and after calibration", "Auto-accept", "Per class",
                    "Confusion matrix", "Most confidently wrong validation images"):
        assert heading in text
    copy = shutil.copy(report, tmp_path / "report.html")  # the page alone, away from the package
    async with Browser() as browser:
        await browser.open(f"file://{copy}")
        images = await browser.evaluate(
            "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}))")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        screenshot = await browser.screenshot(SCREENSHOT)
    # curves, reliability, confusion matrix, and the grid of confidently wrong images when there is one
    has_wrong = trained_digits.result.metrics["val_accuracy"] < 1.0
    assert len(images) == (4 if has_wrong else 3), images
    assert has_wrong or "every validation image is right" in text
    assert all(image["complete"] and image["width"] > 0 for image in images), images
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"report screenshot: {screenshot} ({len(images)} images)")

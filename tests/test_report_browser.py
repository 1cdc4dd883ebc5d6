"""The HTML report in a real browser: headless Chromium loads the page from disk, renders the
case table and the charts with no console errors, and runs nothing the record smuggled in.

Needs Debian's ``chromium`` package (``.ci/run`` installs it when missing); skipped with the
reason when no Chromium is on PATH. The screenshot is kept under the test's ``tmp_path``.
"""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pytest_llem.report.html import write_html
from pytest_llem.results.models import RunRecord
from tests.test_report_html import PAYLOAD, hostile_record, make_case, make_record

# If either ran, it would mark the page; the test looks for the mark.
PWN_SCRIPT = "<script>document.documentElement.setAttribute('data-pwned','script')</script>"
PWN_IMG = "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','img')\">"

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium executable, or a skip saying why there is none."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "no Chromium on PATH: install Debian's chromium package (apt-get install -y chromium; "
        ".ci/run does) to run the browser test"
    )


def _record() -> RunRecord:
    """Sweep cases (so there are sweep charts) and cases whose id, params, notes and prompt
    source carry markup and scripts."""
    evil = hostile_record().cases
    extra = make_case(20, name=f"test_pwn[{PWN_SCRIPT}]")
    extra = extra.model_copy(
        update={
            "params": {**extra.params, "prompt": PWN_IMG},
            "notes": [PWN_SCRIPT, PWN_IMG],
        }
    )
    return make_record([*make_record().cases, *evil, extra])


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"Chromium did not finish within {TIMEOUT_S} s: {' '.join(command)}")


def _console(stderr: str) -> list[str]:
    """Messages the page wrote to the console (errors, CSP violations, logs)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_renders_in_chromium_and_runs_nothing_injected(
    chromium: str, tmp_path: Path
) -> None:
    record = _record()
    page = write_html(record, tmp_path / "llem-report.html")
    url = page.resolve().as_uri()

    dumped = _run(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    assert not _console(dumped.stderr), _console(dumped.stderr)

    # The report's own script ran to the end and found everything the record promised.
    root = re.search(r"<html[^>]*>", dom)
    assert root is not None
    assert 'data-rendered="true"' in root.group(0), root.group(0)
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title is not None
    charts = dom.count('class="chart"')
    assert title.group(1) == f"pytest-llem report: {len(record.cases)} cases, {charts} charts"
    table = dom.split('<table id="cases"')[1].split("</table>")[0]
    assert table.count("<tr data-outcome=") == len(record.cases)
    assert "<svg" in dom
    assert "test_chat: throughput vs batch_size" in dom
    assert "Energy per output token vs ttft_ms.p50" in dom

    # Nothing injected ran, and the injected text shows, escaped.
    assert "data-pwned" not in root.group(0)
    assert dom.count("<script") == 1
    assert "<img src=x" not in dom
    assert html.escape(PAYLOAD, quote=False) in dom
    assert html.escape(PWN_SCRIPT, quote=False) in dom

    screenshot = tmp_path / "report.png"
    shot = _run(
        chromium,
        tmp_path / "profile-shot",
        f"--screenshot={screenshot}",
        "--window-size=1280,2000",
        url,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert not _console(shot.stderr), _console(shot.stderr)
    assert _png_size(screenshot) == (1280, 2000)
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
    print(f"screenshot of the report: {screenshot}")

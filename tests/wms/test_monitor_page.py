"""The monitoring page in a real headless Chromium against a live ``galaxy-dirac-wms serve``.

Needs Debian's ``chromium`` and PyPI's ``playwright`` (its own browser download is never used). Outside CI a missing
browser is a skip; under CI (``CI`` set) it is a failure.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from galaxy_dirac.wms.db import create_schema, make_engine
from tests.wms.synthetic import build_month

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.slow


def _need_browser() -> None:
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"chromium ({CHROMIUM}; apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing and not os.environ.get("CI"):
        pytest.skip("browser test needs " + " and ".join(missing))
    if missing:
        pytest.fail("CI is set but the browser test cannot run: missing " + " and ".join(missing))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def seeded_server(factory: Any, tmp_path: Path, n_jobs: int) -> Any:
    """A live scheduler over a DB filled with a synthetic month (filled before the server starts)."""
    url = f"sqlite:///{tmp_path / f'month{n_jobs}.sqlite'}"
    engine = make_engine(url)
    create_schema(engine)
    build_month(engine, n_jobs=n_jobs)
    engine.dispose()
    return factory(db=url, maintenance_interval=0)


def sign_in(page: Any, server: Any, token: str) -> None:
    page.goto(f"{server.url}/monitor")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", token)
    page.click("#login-button")
    page.wait_for_selector("#jobs-table tbody tr")


def test_page_filters_jobs_and_shows_history(browser: Any, wms_server_factory: Any, tmp_path: Path) -> None:
    server = seeded_server(wms_server_factory, tmp_path, 3000)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, server, server.token("reader"))
    assert "of 3000" in page.inner_text("#jobs-range")

    # Filter by status: every row is Failed and the pager counts only those.
    page.select_option("#job-filters select[name=status]", "Failed")
    page.wait_for_function("document.querySelector('#jobs-range').textContent.indexOf('of 3000') < 0")
    statuses = page.eval_on_selector_all(
        "#jobs-table tbody tr td:nth-child(3)", "cells => cells.map(c => c.textContent)"
    )
    assert statuses and set(statuses) == {"Failed"}
    assert page.is_visible("#status-chips .chip.active[data-status=Failed]")

    # Open one job: its history ends in Failed and lists every step from Received.
    first = page.inner_text("#jobs-table tbody tr:first-child td:first-child")
    page.click("#jobs-table tbody tr:first-child")
    page.wait_for_selector("#job-detail:not([hidden]) h3")
    assert f"Job {first}" in page.inner_text("#job-detail h3")
    history = page.eval_on_selector_all(
        "#job-history tbody tr td:nth-child(2)", "cells => cells.map(c => c.textContent)"
    )
    assert history[0] == "Received" and history[-1] == "Failed"
    assert "JDL" in page.inner_text("#job-detail")
    assert "[object" not in page.inner_text("#job-detail")

    # The token survives a reload (sessionStorage), and other tabs load.
    page.reload()
    page.wait_for_selector("#jobs-table tbody tr")
    assert page.is_hidden("#login")
    page.click("#tabs button[data-tab=pilots]")
    page.wait_for_selector("#pilot-summary tbody tr")
    page.click("#tabs button[data-tab=accounting]")
    page.select_option("#acct-form select[name=kind]", "jobs-by-site")
    page.fill("#acct-form input[name=since]", "2026-10-01")
    page.fill("#acct-form input[name=until]", "2026-11-01")
    page.click("#acct-form button[type=submit]")
    page.wait_for_function("document.querySelector('#acct-img').naturalWidth === 1200")
    page.wait_for_selector("#acct-table tbody tr")
    page.click("#tabs button[data-tab=jobs]")
    page.wait_for_selector("#jobs-table tbody tr")
    page.select_option("#job-filters select[name=per_page]", "25")
    page.wait_for_function("document.querySelectorAll('#jobs-table tbody tr').length === 25")
    page.select_option("#job-filters select[name=status]", "Failed")
    page.wait_for_function("document.querySelector('#jobs-range').textContent.indexOf('of 3000') < 0")
    page.click("#jobs-table tbody tr:nth-child(3)")
    page.wait_for_selector("#job-detail:not([hidden]) h3")

    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "monitor.png"), full_page=True)
    assert (ARTIFACTS / "monitor.png").stat().st_size > 10_000
    assert not errors, errors

    # A bad token brings the sign-in form back instead of an empty page.
    page.evaluate("sessionStorage.setItem('galaxy-dirac-wms-token', 'garbage')")
    page.reload()
    page.wait_for_selector("#login:not([hidden])")
    assert page.inner_text("#login-error")
    context.close()


def test_page_load_time_with_100k_jobs(browser: Any, wms_server_factory: Any, tmp_path: Path) -> None:
    """Page + its first API calls (facets, first page of jobs) with 100k jobs; written to test-artifacts."""
    n_jobs = int(os.environ.get("GALAXY_DIRAC_MONITOR_JOBS", "100000"))
    server = seeded_server(wms_server_factory, tmp_path, n_jobs)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    sign_in(page, server, server.token("admin"))  # warms the server and stores the token
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        page.reload()
        page.wait_for_selector("#jobs-table tbody tr")
        page.wait_for_function(f"document.querySelector('#jobs-range').textContent.indexOf('of {n_jobs}') >= 0")
        timings.append(time.perf_counter() - started)
    started = time.perf_counter()
    page.select_option("#job-filters select[name=status]", "Done")
    page.wait_for_function(f"document.querySelector('#jobs-range').textContent.indexOf('of {n_jobs}') < 0")
    filter_time = time.perf_counter() - started
    ARTIFACTS.mkdir(exist_ok=True)
    report = (
        f"jobs={n_jobs} page_load_seconds={','.join(f'{t:.3f}' for t in timings)} "
        f"best={min(timings):.3f} filter_seconds={filter_time:.3f}\n"
    )
    (ARTIFACTS / "monitor-load-time.txt").write_text(report)
    print(report)
    context.close()
    assert min(timings) < 5.0, report

"""The pictures render for real: checked-in Mermaid in Mermaid itself, HTML reports in
headless Chromium (offline), a screenshot of each kept in test-artifacts/render/ (ignored).

Needs Debian's `chromium`, Graphviz `dot`, Node.js and `npm ci` in tools/render (real
mermaid.js and playwright-core, pinned by its package-lock.json). Missing any of them,
these tests skip and say which; CLUSTERFSM_REQUIRE_BROWSER=1 (set by .ci/run) turns the
skip into a failure, so CI cannot pass without rendering.

All jobs run in one Chromium started once (tools/render/check.mjs), so the module costs
one browser start plus a second or two per page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from clusterfsm.states.htmlreport import write_html
from clusterfsm.states.tracereport import diagram_source, load_runs
from tests.test_trace_report import good_rank, wrong_key

ROOT = Path(__file__).resolve().parent.parent
RENDER = ROOT / "tools" / "render"
ARTIFACTS = ROOT / "test-artifacts" / "render"
REQUIRE = os.environ.get("CLUSTERFSM_REQUIRE_BROWSER") == "1"
CHECK_TIMEOUT_S = 120


def _missing() -> list[str]:
    missing = []
    if not _chromium():
        missing.append("chromium (apt-get install -y chromium)")
    if shutil.which("dot") is None:
        missing.append("Graphviz dot (apt-get install -y graphviz)")
    if shutil.which("node") is None:
        missing.append("node (Node.js)")
    for pkg in ("mermaid", "playwright-core"):
        if not (RENDER / "node_modules" / pkg / "package.json").exists():
            missing.append(f"{pkg} (run `npm ci` in tools/render)")
    return missing


def _chromium() -> str | None:
    return os.environ.get("CLUSTERFSM_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    missing = _missing()
    if missing:
        reason = "browser render check needs: " + ", ".join(missing)
        if REQUIRE:
            pytest.fail(reason + " (CLUSTERFSM_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("render")
    bad = load_runs(wrong_key(tmp))
    good = load_runs([good_rank(tmp, r, slow_ms=40.0 + 30 * r) for r in range(2)])
    write_html(bad, tmp / "failed-run.html")
    write_html(good, tmp / "good-run.html")
    (tmp / "overlay.mmd").write_text(diagram_source(bad, "mermaid"))
    jobs = [
        {"name": "bootstrap-mmd", "kind": "mermaid",
         "input": str(ROOT / "diagrams" / "bootstrap.mmd")},
        {"name": "failed-run-overlay-mmd", "kind": "mermaid", "input": str(tmp / "overlay.mmd")},
        {"name": "docs-visualizing-mmd", "kind": "mermaid", "text": re.search(
            r"```mermaid\n(.*?)```", (ROOT / "docs" / "visualizing.md").read_text(),
            re.S).group(1)},
        {"name": "broken-mmd", "kind": "mermaid",
         "text": "stateDiagram-v2\n  idle --> : nowhere\n"},
        {"name": "failed-run-report", "kind": "html", "input": str(tmp / "failed-run.html"),
         "expect": "#diagram svg"},
        {"name": "good-run-report", "kind": "html", "input": str(tmp / "good-run.html"),
         "expect": "#diagram svg"},
    ]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps({"chromium": _chromium(), "out": str(ARTIFACTS),
                                "jobs": jobs}))
    done = subprocess.run(["node", str(RENDER / "check.mjs"), str(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"check.mjs failed to run:\n{done.stderr}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {r["name"]: r for r in results}


def _ok(result: dict[str, Any]) -> None:
    assert result["ok"], f"{result['name']} did not render: {result['errors']}"
    assert Path(result["info"]["screenshot"]).stat().st_size > 1000


def test_checked_in_mermaid_renders_in_mermaid(rendered: dict[str, dict[str, Any]]) -> None:
    result = rendered["bootstrap-mmd"]
    _ok(result)
    assert result["info"]["nodes"] >= 27  # every declared state is drawn


def test_the_run_overlay_renders_in_mermaid(rendered: dict[str, dict[str, Any]]) -> None:
    _ok(rendered["failed-run-overlay-mmd"])
    _ok(rendered["docs-visualizing-mmd"])  # the example in docs/visualizing.md


def test_the_check_catches_a_mermaid_error(rendered: dict[str, dict[str, Any]]) -> None:
    result = rendered["broken-mmd"]
    assert not result["ok"]
    assert any(e.startswith("mermaid: ") for e in result["errors"]), result["errors"]


def test_failed_run_report_renders_offline(rendered: dict[str, dict[str, Any]]) -> None:
    result = rendered["failed-run-report"]
    _ok(result)  # includes: no network request, no page or console error
    assert result["info"]["verdict"] == "failed"
    assert result["info"]["width"] > 200 and result["info"]["height"] > 200


def test_good_run_report_renders_offline(rendered: dict[str, dict[str, Any]]) -> None:
    result = rendered["good-run-report"]
    _ok(result)
    assert result["info"]["verdict"] == "ok"


def test_checked_in_dot_lays_out_without_warnings() -> None:
    if shutil.which("dot") is None:
        if REQUIRE:
            pytest.fail("Graphviz dot is required (CLUSTERFSM_REQUIRE_BROWSER=1)")
        pytest.skip("Graphviz dot not installed (apt-get install -y graphviz)")
    done = subprocess.run(["dot", "-Tsvg", str(ROOT / "diagrams" / "bootstrap.dot")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    assert "<svg" in done.stdout

"""report.html in a real browser (issue #25.1): headless Chromium at 1280 px; no horizontal
overflow, every image loads, no console errors; a screenshot is kept as a CI artifact.

Skipped where Chromium is not installed, unless PRIVLM_REQUIRE_BROWSER=1 (.ci/run sets it and
installs Debian's chromium and chromium-driver)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from privlm.api import Simulation
from privlm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE = Path(CHROMIUM).exists() and Path(DRIVER).exists()
if not HAVE and os.environ.get("PRIVLM_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"PRIVLM_REQUIRE_BROWSER=1 but {CHROMIUM} or {DRIVER} is missing (apt-get install chromium "
                       "chromium-driver)")
pytestmark = pytest.mark.skipif(not HAVE, reason="Chromium and ChromeDriver not installed (Debian: chromium "
                                                  "chromium-driver)")


def _browser(width: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_the_report_renders_in_chromium_at_1280px(tmp_path, capsys):
    kind = "banded-mf"  # (the longest guarantee text; with scrub counts, samples, a budget gauge)
    extra = ['privacy.mechanism.kind="banded-mf"', "privacy.mechanism.bands=2"]
    cfg = load_config(None, [
        "data.source=synthetic-clinic", "data.num_clients=24", "data.scrub.enabled=true", "model.n_layer=1",
        "model.n_embd=16", "model.n_head=2", "model.block_size=32", "federation.rounds=4",
        "federation.clients_per_round=6", "client.local_steps=1", "client.batch_size=4", "eval.max_clients=4",
        "privacy.noise_multiplier=1.0", "privacy.max_epsilon=60", "report.max_new_tokens=200", *extra])
    res = Simulation(cfg).run(tmp_path / "run", progress=False)
    driver = _browser(1280)
    try:
        driver.get((res.run_dir / "report.html").as_uri())
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        artifacts = Path(os.environ.get("PRIVLM_ARTIFACTS", ROOT / ".ci" / "artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / f"report-{kind}-1280px.png"
        driver.set_window_size(1280, max(900, driver.execute_script("return document.body.scrollHeight") + 100))
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    with capsys.disabled():
        print(f"\nscreenshot of report.html at 1280 px: {shot}")
    assert overflow <= 0, f"report.html overflows the 1280 px window by {overflow} px"
    assert len(images) == 3 and all(ok for _, ok in images), images
    assert errors == [], errors
    assert shot.stat().st_size > 10_000


def test_the_sweep_report_renders_in_chromium_at_1280px(tmp_path):
    """sweep.html with a wide grid (three keys) and long values still fits 1280 px: the table scrolls."""
    from privlm.sweep import write_outputs

    grid = [("privacy.target_epsilon", ["1", "2", "4", "8", "inf"]), ("privacy.adaptive_clipping", ["false", "true"]),
            ("client.lr", ["0.001", "0.01"])]
    rows = []
    for eps in (1.0, 2.0, 4.0, 8.0, None):
        for clip in ("false", "true"):
            for lr in ("0.001", "0.01"):
                point = {"privacy.target_epsilon": "inf" if eps is None else str(eps),
                         "privacy.adaptive_clipping": clip, "client.lr": lr}
                rows.append({"point": point, "run_dir": str(tmp_path / "sw" / f"{eps}-{clip}-{lr}"), "epsilon": eps,
                             "delta": None if eps is None else 8.5e-5, "eval_accuracy": 0.3 + (eps or 10) / 100,
                             "eval_loss": 2.0, "rounds": 50, "stopped": None})
    (tmp_path / "sw").mkdir()
    write_outputs(rows, grid, tmp_path / "sw")
    driver = _browser(1280)
    try:
        driver.get((tmp_path / "sw" / "sweep.html").as_uri())
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        images = driver.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    finally:
        driver.quit()
    assert overflow <= 0, f"sweep.html overflows the 1280 px window by {overflow} px"
    assert images == [True] and errors == [], (images, errors)

"""The MLflow UI as a user sees it, in headless Chromium: a small pipeline's store opened with `s2r ui`.

One paper's experiment lists one row per trained model (the evaluation nested under it) with its test metric and
hyperparameters as columns; the chart view groups the curves in train / val / test / health sections, and a
training curve has >= 50 points. Chromium and its driver are Debian's `chromium` and `chromium-driver`
(tests/services/chromium.sh installs them; .ci/run calls it). S2R_UI_SCREENSHOTS=DIR keeps the screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, tiny_params_dict
from s2r.cli import main

BROWSER, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER.is_file() and DRIVER.is_file()),
                                reason="headless Chromium is not installed: run tests/services/chromium.sh")
EXPERIMENT = "s2r/paper4-mixing-ratio-mrgan"
SEEDS = (0, 1)
STEPS = 60  # 2 epochs x 30 steps: tracking.log_every auto logs every step


def _invoke(*args: str) -> None:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output


def _small_pipeline(root: Path) -> dict[int, float]:
    """generate -> prepare -> train + evaluate `mixing` for two seeds; returns each seed's test accuracy."""
    raw = tiny_params_dict()
    raw["methods"]["mixing"].update(epochs=2, steps_per_epoch=STEPS // 2)
    raw["tracking"]["system_metrics"] = False  # its sampler thread costs CPU the test does not look at
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    p = ["--params", str(params)]
    _invoke("data", "generate", "digits", "--out", str(root / "bench"), *p)
    _invoke("data", "prepare", str(root / "bench"), "--out", str(root / "prepared"))
    accuracy = {}
    for seed in SEEDS:
        model, out = root / f"model-seed{seed}", root / f"evaluate-seed{seed}.json"
        _invoke("train", "mixing", "--set", f"seed={seed}", "--data", str(root / "prepared"), "--out", str(model),
                "--checkpoints", str(root / f"ckpt-seed{seed}"), *p)
        _invoke("evaluate", "mixing", "--model", str(model), "--data", str(root / "prepared"), "--out", str(out), *p)
        accuracy[seed] = json.loads(out.read_text())["accuracy"]
    return accuracy


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this process when pytest dies, even by os._exit (pytest-timeout): nothing is left running."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Kills the process group named on its command line when it gets SIGTERM: from the browser fixture's teardown or,
# through PR_SET_PDEATHSIG, when pytest dies (Chromium outlives its chromedriver, even a SIGKILLed one).
WATCHDOG = """
import os, signal, sys
def stop(*_):
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except ProcessLookupError:
        pass
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
signal.pause()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A fresh store made by the small pipeline, served by `s2r ui` on a free port (stopped afterwards)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    accuracy = _small_pipeline(tmp_path)
    port = _free_port()
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "s2r.cli", "ui", "--port", str(port)], cwd=tmp_path,
                            env=os.environ | {"PYTHONPATH": str(REPO / "src")}, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)  # on SIGTERM `s2r ui` stops the server's process group
    try:
        deadline = time.monotonic() + 600  # a loaded 2-core machine needs minutes to import the server
        while not _answers(f"http://127.0.0.1:{port}/health"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(1)
        yield {"port": port, "accuracy": accuracy, "log": tmp_path / "ui.log", "shots": tmp_path / "screens"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        keep = os.environ.get("S2R_UI_SCREENSHOTS")
        if keep and (tmp_path / "screens").is_dir():
            shutil.copytree(tmp_path / "screens", keep, dirs_exist_ok=True)


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium as root in a closed network: no sandbox, no background connections, a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(BROWSER)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1800,1200"):
        opts.add_argument(arg)
    service = Service(str(DRIVER), popen_kw={"start_new_session": True})  # driver + browser: one process group
    driver = webdriver.Chrome(service=service, options=opts)
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(service.process.pid)], stdout=subprocess.PIPE,
                                text=True, preexec_fn=_die_with_parent)
    try:
        assert watchdog.stdout is not None and watchdog.stdout.readline().strip() == "ready"
        driver.implicitly_wait(0)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            watchdog.terminate()  # and whatever the quit left of the browser's process group
            watchdog.wait(timeout=60)


def _wait(driver: Any, find: Any, what: str, timeout: float = 180) -> Any:
    """Poll `find(driver)` until it returns something truthy (the UI renders asynchronously)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def probe(d: Any) -> Any:
        try:
            return find(d)
        except (WebDriverException, IndexError):
            return None

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(probe)
    except Exception as e:
        raise AssertionError(f"the UI did not show {what}; page text: "
                             f"{driver.find_element('tag name', 'body').text[:2000]}") from e


def _texts(driver: Any, css: str) -> list[str]:
    return [e.text.strip() for e in driver.find_elements("css selector", css) if e.is_displayed()]


def _close_assistant(driver: Any) -> None:
    for button in driver.find_elements("css selector", "button[aria-label=Close]"):
        if button.is_displayed():
            button.click()


def _show_column(driver: Any, name: str) -> None:
    """Tick one column in the runs table's Columns menu, as a user does (its search, then the exact entry)."""
    from selenium.webdriver.common.keys import Keys

    _wait(driver, lambda d: [b for b in d.find_elements("tag name", "button") if b.text.strip() == "Columns"][0],
          "the Columns button").click()
    search = _wait(driver, lambda d: d.find_element("css selector", "input[placeholder='Search columns']"),
                   "the column search")
    search.clear()
    search.send_keys(name)
    entry = _wait(driver, lambda d: [e for e in d.find_elements("css selector", "[class*=tree-title]")
                                     if e.is_displayed() and e.text.strip() == name][0], f"column {name}")
    entry.click()
    search.send_keys(Keys.ESCAPE)


def _runs_table(driver: Any, url: str, shots: Path) -> list[str]:
    driver.get(url)
    _wait(driver, lambda d: "train@mixing-seed1" in d.find_element("tag name", "body").text, "the runs table")
    _close_assistant(driver)
    for column in ("test/accuracy", "methods.mixing.real_fraction", "seed"):
        _show_column(driver, column)

    def model_rows(d: Any) -> list[str] | None:  # the grid's right part: Models, the picked columns
        rows = [r for r in _texts(d, "[role=row]") if "mixing-seed" in r and "0.25" in r]
        return rows if len(rows) == len(SEEDS) else None

    rows = _wait(driver, model_rows, "one row per model with the picked columns")
    driver.save_screenshot(str(shots / "2-paper4-runs.png"))
    return list(rows)


def _chart_view(driver: Any, shots: Path) -> int:
    """Switch to the chart view; return the number of points the train/loss curve of one run draws."""
    chart = _wait(driver, lambda d: d.find_element("css selector", "input[type=radio][value=CHART]"), "chart toggle")
    driver.execute_script("arguments[0].click()", chart)
    sections = {"train", "val", "test", "health"}  # the chart view's section headers: the key prefix before '/'
    _wait(driver, lambda d: sections <= set(d.find_element("tag name", "body").text.split("\n")), "the sections")
    driver.save_screenshot(str(shots / "3-paper4-charts.png"))
    section = [e for e in driver.find_elements("xpath", "//*[normalize-space(text())='train']") if e.is_displayed()][0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", section)
    title = _wait(driver, lambda d: d.find_elements("xpath", "//*[normalize-space(text())='train/loss']")[0],
                  "the train/loss chart")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", title)
    card = title
    for _ in range(10):  # up from the chart's title to the card that holds its plot
        card = card.find_element("xpath", "..")
        if card.find_elements("css selector", "path.js-line"):
            break
    paths = _wait(driver, lambda d: card.find_elements("css selector", "path.js-line"), "the train/loss curves")
    driver.save_screenshot(str(shots / "4-paper4-train-section.png"))
    return max(p.get_attribute("d").count("L") + 1 for p in paths)  # plotly: M x,y then L x,y per further point


def test_one_paper_experiment_one_row_per_model_and_sectioned_charts(ui: dict[str, Any], browser: Any) -> None:
    shots = ui["shots"]
    shots.mkdir()
    printed = ui["log"].read_text()  # `s2r ui` prints one link per experiment
    link = next(line.split()[-1] for line in printed.splitlines() if line.strip().startswith(EXPERIMENT))
    assert f":{ui['port']}/#/experiments/" in link and link.endswith("/runs?workflowType=machine_learning")

    browser.get(f"http://127.0.0.1:{ui['port']}/#/experiments?workflowType=machine_learning")
    _wait(browser, lambda d: EXPERIMENT in d.find_element("tag name", "body").text, "the experiment list")
    browser.save_screenshot(str(shots / "1-experiments.png"))

    rows = _runs_table(browser, link, shots)  # one row per trained model: its test metric and hyperparameters
    body = browser.find_element("tag name", "body").text
    assert "evaluate@mixing-seed0" not in body  # the evaluation is nested under its model's training run
    for seed in SEEDS:
        (row,) = [r for r in rows if f"mixing-seed{seed}\n" in r + "\n"]
        cells = row.split("\n")
        assert str(ui["accuracy"][seed])[:6] in cells[-3] and cells[-2:] == ["0.25", str(seed)], cells

    points = _chart_view(browser, shots)
    assert points >= 50, points

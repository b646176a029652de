"""`pretrain report`: a self-contained page of a run's plots and summary, opened in headless
Chromium with the network cut: it loads, every plot decodes, nothing is fetched, no console error."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from run_helpers import REPO, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium's own background services (update checks, time, accounts), not the page's requests.
BROWSER_HOSTS = ("google.com", "googleapis.com", "gvt1.com", "gstatic.com")


@pytest.fixture(scope="module")
def run_dir(text_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "gpt"
    run_cli(["fit", "--config", str(REPO / "configs/experiments/gpt-tiny.yaml"), f"data.train={text_corpus['train']}",
             f"data.val={text_corpus['val']}", f"data.tokenizer={text_corpus['tokenizer']}", "data.seq_len=32",
             "data.batch_size=4", "data.num_workers=0", "model.dim=32", "model.depth=1", "model.heads=2",
             "trainer.devices=1", "trainer.max_steps=8", "trainer.log_every_steps=2", "trainer.val_every_steps=4",
             "trainer.val_batches=2", "trainer.checkpoint_every_steps=4", "logging.wandb=disabled", f"run.dir={run}"])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')  # a row cut by a crash
    (run / "preemptions.jsonl").write_text(json.dumps({"time": 0, "signal": "SIGUSR1", "step": 4, "checkpoint": "x"}) + "\n")
    return run


def open_in_chromium(page: Path, tmp_path: Path) -> dict:
    """Load ``page`` headless, network cut: its DOM after load, console lines, requests, a screenshot."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs it as root with apt)")
    net = tmp_path / f"{page.stem}-net.json"
    shot = tmp_path / f"{page.stem}.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*flags, f"--log-net-log={net}", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    subprocess.run([*flags, "--window-size=1300,2400", f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    urls = set(re.findall(r'"url":"([a-z]+://[^"]+)"', net.read_text())) if net.exists() else set()
    external = {u for u in urls if not u.startswith(("file:", "data:"))
                and not any(re.match(rf"[a-z]+://([^/]*\.)?{re.escape(h)}(/|:|$)", u) for h in BROWSER_HOSTS)}
    return {"dom": dom.stdout, "console": [l for l in dom.stderr.splitlines() if ":CONSOLE" in l], "external": external,
            "screenshot": shot}


def test_the_page_loads_offline_with_every_plot_and_nothing_fetched(run_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "report.html"
    printed = run_cli(["report", str(run_dir), "--output", str(out)])
    assert re.search(r"metrics.jsonl line\(s\) \d+ are not JSON", printed)
    page = out.read_text()
    assert "<link" not in page and not re.search(r"""(src|href)=['"]https?:""", page), "nothing to fetch"
    seen = open_in_chromium(out, tmp_path)
    title = re.search(r"<title>plots (\d+)/(\d+)</title>", seen["dom"])
    assert title and title.group(1) == title.group(2) and int(title.group(1)) >= 4, seen["dom"][:300]
    assert seen["console"] == [] and seen["external"] == set()
    image = Image.open(seen["screenshot"]).convert("RGB")
    assert image.size == (1300, 2400) and len(set(image.resize((260, 480)).getdata())) > 50, "a page with plots, not a blank"
    for text in ("train/loss", "val/ppl", "unreadable metrics.jsonl lines", "preemptions / requeues", "Throughput"):
        assert text in page
    from framework.report.runs import read_run

    assert {"optim/lr", "perf/mfu", "data/skipped_samples"} <= set(read_run(run_dir).metrics())  # what the plots draw

    # The same harness catches what it is there to catch.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><img src='http://example.org/x.png'><script>console.error('boom')</script></body></html>")
    caught = open_in_chromium(bad, tmp_path)
    assert any("boom" in line for line in caught["console"]) and any("example.org" in u for u in caught["external"])


def test_two_runs_share_plots_and_list_the_config_keys_that_differ(run_dir, tmp_path):
    from framework.report.page import watch, write_report

    other = tmp_path / "gpt-lr"
    shutil.copytree(run_dir, other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["optim"]["lr"] = 0.5
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    summary = write_report([run_dir, other], tmp_path / "two.html")
    page = (tmp_path / "two.html").read_text()
    assert summary["runs"] == 2 and "<td>optim.lr</td>" in page and "<td>0.5</td>" in page and "run.dir" not in page
    lines = []
    watch([run_dir], tmp_path / "watched.html", interval=0, report=lines.append, rounds=3)
    assert len(lines) == 1, "rendered once: the metrics did not change"


def test_bad_inputs_get_one_line_each(run_dir, tmp_path):
    from framework.errors import ConfigError
    from framework.report.page import write_report
    from framework.report.runs import read_run

    with pytest.raises(ConfigError, match=r"is not a run directory \(no config.yaml and no metrics.jsonl"):
        read_run(tmp_path)
    vision = tmp_path / "simclr"
    shutil.copytree(run_dir, vision)
    config = yaml.safe_load((vision / "config.yaml").read_text())
    config["objective"]["name"] = "simclr"
    (vision / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"runs of different objectives.*\(clm\).*\(simclr\)"):
        write_report([run_dir, vision], tmp_path / "mixed.html")
    assert not (tmp_path / "mixed.html").exists()
    run = read_run(run_dir)
    assert len(run.skipped_lines) == 1 and run.last_step() == 8

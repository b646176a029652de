"""Every user error is one line on stderr, exit code 2, raised before any training starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from framework.cli import main

REPO = Path(__file__).resolve().parents[1]
GPT = str(REPO / "configs/experiments/gpt-tiny.yaml")


def error_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    # one error line, last; before it at most warnings naming skipped inputs
    assert errors == [err[-1]] and all(line.startswith("warning: ") for line in err[:-1]), err
    return err[-1]


def data_overrides(corpus):
    return [f"data.train={corpus['train']}", f"data.val={corpus['val']}", f"data.tokenizer={corpus['tokenizer']}"]


def test_unknown_objective(capsys):
    assert "unknown objective 'gtp'" in error_of(capsys, ["fit", "--config", GPT, "objective.name=gtp"])


def test_config_typo_names_key_and_source(capsys):
    line = error_of(capsys, ["fit", "--config", GPT, "trainer.max_stepz=3"])
    assert "command line" in line and "trainer.max_stepz" in line and "trainer.max_steps" in line


def test_missing_shard_path(capsys, text_corpus, tmp_path):
    line = error_of(capsys, ["fit", "--config", GPT, *data_overrides(text_corpus), f"data.train={tmp_path}/missing", f"run.dir={tmp_path}/r"])
    assert "data.train" in line and "missing" in line


def test_empty_shard_directory(capsys, text_corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    line = error_of(capsys, ["fit", "--config", GPT, *data_overrides(text_corpus), f"data.val={tmp_path}/empty", f"run.dir={tmp_path}/r"])
    assert "data.val" in line and "no shards (*.tar, *.tar.gz, *.tgz) or row files (*.parquet, " in line


def test_missing_tokenizer(capsys, text_corpus, tmp_path):
    line = error_of(capsys, ["fit", "--config", GPT, *data_overrides(text_corpus), f"data.tokenizer={tmp_path}/tok.json", f"run.dir={tmp_path}/r"])
    assert "tokenizer file not found" in line and "tok.json" in line


def test_bad_strategy(capsys, text_corpus, tmp_path):
    line = error_of(capsys, ["fit", "--config", GPT, *data_overrides(text_corpus), "trainer.strategy=fsdpp", f"run.dir={tmp_path}/r"])
    assert "trainer.strategy" in line and "fsdpp" in line


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("")
    line = error_of(capsys, ["shards", "text", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert "empty corpus" in line


def test_resume_never_refuses_to_overwrite(capsys, text_corpus, tmp_path):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "step-00000004.ckpt").write_bytes(b"x")
    line = error_of(capsys, ["fit", "--config", GPT, *data_overrides(text_corpus), f"run.dir={tmp_path}/r", "run.resume=never"])
    assert "already has checkpoints" in line


def test_a_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "framework.cli", "fit", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"

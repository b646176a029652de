"""`pretrain launch slurm` on a real 2-node Slurm cluster on this host (slurm/local-cluster.sh):
a job trains and finishes; a job sent the preemption signal checkpoints, is requeued, resumes and
ends with the uninterrupted weights and one W&B run id; an invalid config fails at submission."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from wandb_offline import history

from launch_helpers import CONFIG, REPO, STEPS, assert_same_weights, cli, final_weights, metric_steps, tiny, wait_for

CLUSTER = REPO / "slurm" / "local-cluster.sh"
SUBMITTED: list = []


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        pytest.skip("the local Slurm cluster needs root (to install and start slurmctld/slurmd/munge)")
    if os.geteuid() == 0 and shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    result = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    if result.returncode == 3:
        pytest.skip(f"the local Slurm cluster cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    yield
    # a job a failed test left queued would hold the nodes: cancel what this module submitted
    subprocess.run(["scancel", *SUBMITTED], capture_output=True)
    # the cluster is left running: later sessions reuse it (slurm/local-cluster.sh stop ends it)


def queued_jobs() -> set:
    """Ids of the jobs in the queue (not the default listing: its TIME column ticks)."""
    if shutil.which("squeue") is None:
        return set()
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())


def job_state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_done(job: str, timeout: float, log: Path) -> dict:
    final = {}

    def done() -> bool:
        final.update(job_state(job))
        return final.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

    try:
        wait_for(done, timeout, f"job {job} to finish", every=0.5)
    except AssertionError:
        subprocess.run(["scancel", job])
        raise AssertionError(f"job {job} did not finish: {final}\n{log.read_text()[-4000:] if log.exists() else ''}")
    assert final["JobState"] == "COMPLETED", f"{final}\n{log.read_text()[-4000:] if log.exists() else ''}"
    return final


def submit(corpus: dict, run_dir: Path, *overrides: str) -> str:
    out = cli("launch", "slurm", "--config", CONFIG, "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1",
              "--max-requeues", "2", *tiny(corpus, run_dir), *overrides).stdout
    match = re.search(r"submitted job (\d+)", out)
    assert match, out
    SUBMITTED.append(match.group(1))
    return match.group(1)


@pytest.mark.timeout(400)
def test_two_node_job_trains_and_finishes(slurm_cluster, text_corpus, tmp_path, reference_run):
    run_dir = tmp_path / "job"
    job = submit(text_corpus, run_dir)
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script and "srun " in script
    wait_done(job, 300, run_dir / f"slurm-{job}.out")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert "on n[1-2]" in log, "one task on each of the two nodes"
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    assert_same_weights(final_weights(run_dir), reference_run["weights"])
    assert not (run_dir / "requeues.jsonl").exists(), "a run that reached its end is not requeued"


@pytest.mark.timeout(500)
def test_preempted_job_checkpoints_requeues_resumes_and_matches(slurm_cluster, text_corpus, tmp_path, reference_run):
    run_dir = tmp_path / "preempted"
    # No periodic checkpoints: the one to resume from is the one the preemption wrote.
    job = submit(text_corpus, run_dir, "trainer.checkpoint_every_steps=1000")
    log = run_dir / f"slurm-{job}.out"
    wait_for(lambda: len(metric_steps(run_dir)) >= 2, 240, "the job to train a few steps")
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # The Preemption callback saves at the next step, rank 0 requeues; Slurm holds a requeued
    # job back (BeginTime, about 2 minutes): start it now.
    wait_for(lambda: (run_dir / "requeues.jsonl").exists(), 120, "the requeue")
    requeued = time.time()
    wait_for(lambda: job_state(job).get("JobState") == "PENDING", 120, "the job to be pending again", every=0.2)
    pending = time.time()
    state = job_state(job)
    held = time.mktime(time.strptime(state["StartTime"], "%Y-%m-%dT%H:%M:%S")) - pending if state.get("StartTime", "").startswith("20") else None
    # That hold is why a restart is safe: slurmd refuses a launch credential issued in the same
    # second as the old run's revocation ("Job credential revoked", the job FAILS). Seen when the
    # old run ended fast and StartTime=now landed within that second; so skip the hold, not the second.
    time.sleep(max(0.0, pending + 2 - time.time()))
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    try:
        wait_for(lambda: "resuming from step-" in (log.read_text() if log.exists() else ""), 240, "the resumed run", every=0.2)
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}: {job_state(job)}\n{log.read_text()[-4000:] if log.exists() else ''}") from None
    resumed = time.time()
    final = wait_done(job, 300, log)
    assert int(final.get("Restarts", "0")) == 1

    preemption = [json.loads(line) for line in (run_dir / "preemptions.jsonl").read_text().splitlines()]
    assert len(preemption) == 1 and preemption[0]["signal"] == "SIGUSR1"
    stopped = preemption[0]["step"]
    assert 0 < stopped < STEPS, "the signal landed mid-run"
    assert f"resuming from step-{stopped:08d}.ckpt" in log.read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == [f"step-{stopped:08d}.ckpt", f"step-{STEPS:08d}.ckpt"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ranks")) == [f"step-{stopped:08d}.ranks", f"step-{STEPS:08d}.ranks"]
    assert metric_steps(run_dir) == list(range(1, STEPS + 1)), "the resumed run continued at the next step"
    assert_same_weights(final_weights(run_dir), reference_run["weights"])

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(Path(r).name.endswith(run_id) for r in runs), runs
    assert all(Path(r, f"run-{run_id}.wandb").exists() for r in runs)
    logged = {row["trainer/global_step"] for r in runs for row in history(Path(r, f"run-{run_id}.wandb")) if "train/loss" in row}
    assert logged == set(range(STEPS)), "both parts of the run logged into the one W&B run"

    timing = {
        "signal_to_requeue_s": round(requeued - signalled, 1),
        "requeue_to_pending_s": round(pending - requeued, 1),
        "start_to_resumed_s": round(resumed - pending, 1),
        "signal_to_resumed_s": round(resumed - signalled, 1),
        "slurm_hold_before_restart_s": None if held is None else round(held),  # skipped with StartTime=now
    }
    (REPO / "runs").mkdir(exist_ok=True)
    (REPO / "runs" / "preemption-cycle.json").write_text(json.dumps(timing, indent=1))
    print("preemption cycle:", timing)


def test_invalid_config_fails_at_submission(tmp_path, text_corpus):
    before = queued_jobs()
    run_dir = tmp_path / "invalid"
    result = cli("launch", "slurm", "--config", CONFIG, "--nodes", "2", *tiny(text_corpus, run_dir), "optim.lr=fast", check=False)
    assert result.returncode == 2 and "optim.lr" in result.stderr and "submitted" not in result.stdout
    result = cli("launch", "slurm", "--config", CONFIG, *tiny(text_corpus, run_dir), "trainer.max_steps=0", check=False)
    assert result.returncode == 2 and "trainer.max_steps" in result.stderr
    assert not (run_dir / "job.sbatch").exists(), "nothing written, nothing queued"
    after = queued_jobs()
    assert before == after


def test_stop_cancels_running_jobs_and_their_steps(slurm_cluster, tmp_path):
    """`local-cluster.sh stop` under a running job: the job is cancelled and its step's processes
    end, instead of training on with no cluster around them. (The cluster is started again after.)"""
    marker = f"sleep {417 + os.getpid() % 1000}"  # a command line no other process has
    job = subprocess.run(["sbatch", "--parsable", "-N", "1", "-o", str(tmp_path / "job.log"), "--wrap", f"srun {marker}"],
                         capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    SUBMITTED.append(job)
    deadline = time.time() + 60
    while job_state(job).get("JobState") != "RUNNING" or not _processes(marker):
        assert time.time() < deadline, f"job {job} did not start its step: {job_state(job)}"
        time.sleep(0.5)
    try:
        result = subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.time() + 30
        while _processes(marker) and time.time() < deadline:
            time.sleep(0.5)
        assert not _processes(marker), "the job's step outlived `stop`"
    finally:
        subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)


def _processes(command: str) -> list:
    found = subprocess.run(["pgrep", "-f", command], capture_output=True, text=True).stdout.split()
    return [pid for pid in found if int(pid) != os.getpid()]

"""SLURM scale-out, tested against a real single-node cluster (tests/minislurm.py: munged, slurmctld
and slurmd from Debian, installed here as root when missing). The cluster runs the testbed pipeline
with 4 scoring shards and 2 K-FAC factor shards and must produce exactly the local run's outputs;
a shard is killed and re-submitted; shards are pre-empted and signalled and resume from their chunks.
The parts that need no cluster (scripts, config, K-FAC shard sums and resume) run everywhere."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from minislurm import MiniSlurm, ensure_slurm

from memcirc.cli import Terminated, main
from memcirc.config import build_config
from memcirc.errors import InputError
from memcirc.slurm.render import RUNNER
from memcirc.slurm.settings import EXPERIMENTS, read_settings
from memcirc.slurm.status import parse_records, task_ids
from memcirc.stages.memorization_score import ScoreConfig

# The testbed pipeline, reduced: scoring (4 shards) -> contrastive pairs, K-FAC (2 factor shards) and
# training dynamics (one array task per testbed checkpoint, circuits included).
CONFIG = """\
pipeline: [memorization_score, contrastive_dataset, kfac_edit, training_dynamics]
model: testbed
dtype: float32
seed: 0
prefix_len: 32
suffix_len: 32
memorization:
  metrics: [exact, lcp, tf_accuracy, suffix_nll, suffix_entropy, token_match, bleu4, levenshtein]
  batch_size: 4
  chunk_size: 4
  exposure_candidates: 100
kfac:
  rhos: [1.0, 0.6]
  factor_tokens: 2000
  ppl_blocks: 4
  batch_size: 4
  chunk_size: 1
slurm:
  partition: gpu
  gpus: 1
  cpus_per_task: 4
  mem: 32G
  time: "00:30:00"
  extra: ["--comment=memcirc-test"]
  setup: ["echo memcirc-test-setup"]
  num_shards: 4
  kfac_edit: {num_shards: 2}
  memorization_score.merge: {cpus_per_task: 1, mem: 2G}
"""
# The shard tests score 400 windows (25 chunks per shard of 4: a shard must still be running when they kill
# it) against a local scoring of the same 400; the cluster-vs-local pipeline runs on 150 (112 random-word
# and 38 template canaries: v2's 400 hold 188 memorized windows and the pipeline ran past its 600 s limit).
FLAGS = ["--device", "cpu", "--limit", "400"]
PIPELINE_FLAGS = ["--device", "cpu", "--limit", "150"]
# High-priority partition whose jobs pre-empt (requeue) the gpu partition's, as on a shared cluster.
PARTITIONS = ("debug", "gpu PriorityTier=1", "high PriorityTier=10")
PREEMPTION = "PreemptType=preempt/partition_prio\nPreemptMode=REQUEUE"


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("slurm_config") / "run.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def cluster():
    why = ensure_slurm()
    if why:
        if os.environ.get("MEMCIRC_REQUIRE_SLURM"):   # .ci/run: a skipped cluster test is a failure there
            pytest.fail(why)
        pytest.skip(why)
    for attempt in (1, 2):   # a free port can be taken between picking it and the daemon binding it
        d = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")   # short: unix socket paths <= 108 bytes
        c = MiniSlurm(d, cpus=16, mem_mb=256000, gpus=4, partitions=PARTITIONS, extra=PREEMPTION)
        try:
            c.start()
            break
        except RuntimeError:
            shutil.rmtree(d, ignore_errors=True)
            if attempt == 2:
                raise
    yield c
    c.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def env(cluster):
    return {**cluster.env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MEMCIRC_SLURM_POLL": "0.5"}


LOCAL_ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _pipeline_cmd(config_file, out, flags, *extra):
    return [str(REPO / "run_pipeline.sh"), "--config", str(config_file), "--output-dir", str(out), *flags, *extra]


def _pipeline(config_file, out, *extra, env=None, timeout=600, flags=FLAGS):
    return subprocess.run(_pipeline_cmd(config_file, out, flags, *extra), env=env or LOCAL_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(config_file, tmp_path_factory, env):
    """(local run dir, cluster run dir, the cluster run's result): the same pipeline run by
    run_pipeline.sh here and through the cluster, at the same time (the cluster's jobs leave a core
    idle between stages)."""
    # one folder name for both: figures print their run's folder name in the corner
    local, remote = tmp_path_factory.mktemp("local") / "run", tmp_path_factory.mktemp("cluster") / "run"
    with subprocess.Popen(_pipeline_cmd(config_file, local, PIPELINE_FLAGS), env=LOCAL_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as here:
        r = _pipeline(config_file, remote, "--slurm", "--wait", env=env, flags=PIPELINE_FLAGS)
        _, err = here.communicate(timeout=600)
    assert here.returncode == 0, err[-3000:]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return local, remote, r


@pytest.fixture(scope="module")
def local_run(runs):
    return runs[0]


@pytest.fixture(scope="module")
def local_scores(config_file, tmp_path_factory):
    """scores.jsonl of the shard tests' 400 windows, scored here in one job."""
    out = tmp_path_factory.mktemp("local_scores") / "run"
    r = _pipeline(config_file, out, "--to-stage", "memorization_score")
    assert r.returncode == 0, r.stderr[-3000:]
    return (out / "memorization" / "scores.jsonl").read_bytes()


@pytest.fixture(scope="module")
def cluster_run(runs):
    return runs[1], runs[2]


def _latest_jobs(run_dir):
    return {j["name"]: j for j in json.loads((run_dir / "slurm" / "jobs.json").read_text())["submissions"][-1]["jobs"]}


def _tasks(cluster, job_id):
    """array task id -> (its job id, state, restarts, reason) from scontrol."""
    out = {}
    for line in cluster.sh("scontrol", "-o", "show", "job", str(job_id)).stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        for i in task_ids(fields.get("ArrayTaskId", "")) or [None]:
            out[i] = (fields["JobId"], fields["JobState"], int(fields["Restarts"]), fields["Reason"])
    return out


def _wait_for(predicate, what, timeout=240):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:  # a deadline for a stuck cluster, not a speed check
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _alive(cluster, job_id, run_dir):
    """True while no task of the array has failed (a failure ends the wait at once, with its log)."""
    for i, (_, state, _, _) in _tasks(cluster, job_id).items():
        log = run_dir / "slurm" / "logs" / f"memorization_score-{job_id}_{i}.out"
        assert state not in ("FAILED", "CANCELLED"), f"task {i} {state}: {log.read_text()[-2000:]}"
    return True


def _restarted(cluster, job_id, run_dir, task):
    """True once `task` was requeued; an assertion error (with its log) if it ended without."""
    _, state, restarts, _ = _tasks(cluster, job_id)[task]
    log = run_dir / "slurm" / "logs" / f"memorization_score-{job_id}_{task}.out"
    assert restarts or state in ("RUNNING", "PENDING"), f"task {task} {state}, not requeued: {log.read_text()[-2000:]}"
    return _alive(cluster, job_id, run_dir) and restarts >= 1


def _unfinished(run_dir, shard):
    """True until the shard has written its done marker (AssertionError after: it can no longer be killed)."""
    done = run_dir / "memorization" / "shards" / f"{shard:05d}" / "done.json"
    assert not done.exists(), f"shard {shard} finished before it could be killed mid-run"
    return True


def _shard_processes(cluster, array, task):
    """The pids of array task `task`'s processes that run memorization_score.py, once it runs (else [])."""
    tasks = _tasks(cluster, array)
    if task not in tasks or tasks[task][1] != "RUNNING":
        return []
    pids = cluster.sh("scontrol", "listpids", tasks[task][0]).stdout.split()
    out = []
    for p in pids:
        try:
            if p.isdigit() and b"memorization_score.py" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(int(p))
        except OSError:   # gone meanwhile
            continue
    return out


def _signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _deadline(run_dir, shard, what, t0, timeout=900):
    _unfinished(run_dir, shard)
    if time.time() - t0 > timeout:  # a deadline for a stuck cluster (a busy one holds a shard pending), not speed
        raise TimeoutError(f"timed out waiting for {what}")


def _stop_when_running(cluster, run_dir, array, shard):
    """SIGSTOP the shard's stage processes as soon as they run (while the model loads: seconds); their pids.
    On an idle machine a testbed chunk takes ~10 ms: the whole shard can finish between two polls."""
    t0 = time.time()
    while not (pids := _shard_processes(cluster, array, shard)):
        _deadline(run_dir, shard, f"shard {shard} to start", t0)
        time.sleep(0.02)
    _signal_all(pids, signal.SIGSTOP)
    return pids


def _step_until_chunks(run_dir, shard, pids, chunks):
    """Let the stopped processes run in 5 ms slices until the shard has written `chunks` chunks."""
    t0 = time.time()
    while _chunks(run_dir, shard) < chunks:
        _deadline(run_dir, shard, f"shard {shard} to write {chunks} chunks", t0)
        _signal_all(pids, signal.SIGCONT)
        time.sleep(0.005)
        _signal_all(pids, signal.SIGSTOP)


def _chunks(run_dir, shard):
    return len(list((run_dir / "memorization" / "shards" / f"{shard:05d}" / "chunks").glob("*.jsonl")))


# -- the pipeline on the cluster equals the local run ----------------------------------------

def test_pipeline_on_the_cluster_equals_a_local_run(local_run, cluster_run, cluster):
    out, result = cluster_run
    jobs = _latest_jobs(out)
    assert list(jobs) == ["memorization_score", "memorization_score.merge", "contrastive_dataset", "kfac_edit",
                          "kfac_edit.merge", "training_dynamics", "training_dynamics.merge", "report"]
    assert jobs["memorization_score"]["tasks"] == 4 and jobs["kfac_edit"]["tasks"] == 2
    from memcirc.dynamics.checkpoints import CheckpointList, resolve_checkpoints
    from memcirc.stages.training_dynamics import DynamicsConfig

    # the testbed's checkpoints, then the final model
    checkpoints = resolve_checkpoints(DynamicsConfig().options(CheckpointList))
    assert jobs["training_dynamics"]["tasks"] == len(checkpoints) == 5
    assert jobs["training_dynamics"]["after"] == ["memorization_score.merge", "contrastive_dataset"]
    for job in jobs.values():   # really run by the cluster, every task
        states = {s for _, s, _, _ in _tasks(cluster, job["job_id"]).values()}
        assert states == {"COMPLETED"}, (job["name"], states)
    # every output file of every stage, byte for byte (manifests hold paths and times; their
    # output lists, hashes included, must agree)
    for stage in ("memorization", "contrastive", "kfac", "dynamics"):
        local = json.loads((local_run / stage / "manifest.json").read_text())
        remote = json.loads((out / stage / "manifest.json").read_text())
        assert remote["status"] == "complete"
        names = [o["path"] for o in local["outputs"]]
        assert names == [o["path"] for o in remote["outputs"]]
        for name in names:
            if name == "summary.json" and stage == "kfac":   # wall times differ; nothing else may
                a, b = (json.loads((d / stage / name).read_text()) for d in (local_run, out))
                a.pop("timings"), b.pop("timings")
                assert a == b
            else:
                assert _sha(local_run / stage / name) == _sha(out / stage / name), f"{stage}/{name}"
    for name in ("memorization/scores.jsonl", "kfac/factors.safetensors"):   # the two the issue names
        assert (out / name).read_bytes() == (local_run / name).read_bytes(), name
    # the merged scoring run has the one-job run's identity (fingerprint and outputs; later stages
    # record their input paths, so theirs differ by the run folder)
    assert (json.loads((out / "memorization" / "manifest.json").read_text())["run_id"]
            == json.loads((local_run / "memorization" / "manifest.json").read_text())["run_id"])
    assert json.loads((out / "memorization" / "manifest.json").read_text())["num_shards"] == 4
    assert json.loads((out / "kfac" / "manifest.json").read_text())["factor_shards"] == 2
    assert not (out / "memorization" / "shards").exists() and not (out / "kfac" / "shards").exists()
    # recorded: the submitted scripts (resources from the slurm: section) and the logs
    scoring = Path(jobs["memorization_score"]["script"]).read_text()
    for line in ("#SBATCH --array=0-3", "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1", "#SBATCH --mem=32G",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --time=00:30:00", "#SBATCH --comment=memcirc-test",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "echo memcirc-test-setup"):
        assert line in scoring.splitlines(), line
    merge = Path(jobs["memorization_score.merge"]["script"]).read_text()
    assert f"#SBATCH --dependency=afterok:{jobs['memorization_score']['job_id']}" in merge
    assert "--gres" not in merge and "#SBATCH --mem=2G" in merge   # the merge reads files only
    assert f"afterok:{jobs['memorization_score.merge']['job_id']}" in Path(jobs["kfac_edit"]["script"]).read_text()
    log = Path(jobs["report"]["log"].replace("%j", jobs["report"]["job_id"])).read_text()
    assert "K-FAC edit (original)" in log and "contrastive (divergence)" in log
    assert "K-FAC edit (original)" in result.stdout   # --wait prints the report last, as a local run
    status = subprocess.run([sys.executable, "-m", "memcirc.slurm", "status", str(out)], env=cluster.env,
                            capture_output=True, text=True)
    assert status.returncode == 0 and "all jobs completed" in status.stdout, status.stdout + status.stderr


# -- a killed shard: no merge, a report naming it, a re-submission that recomputes only it -------

def test_killed_shard_blocks_the_merge_and_resubmission_finishes_the_run(config_file, local_scores, env, cluster,
                                                                         tmp_path):
    out = tmp_path / "killed"
    args = ("--slurm", "--to-stage", "memorization_score")
    first = _pipeline(config_file, out, *args, env=env)
    assert first.returncode == 0, first.stderr
    array = _latest_jobs(out)["memorization_score"]["job_id"]
    pids = _stop_when_running(cluster, out, array, shard=2)   # held while the refusal below is checked
    again = _pipeline(config_file, out, *args, env=env)   # while those jobs run: refused, nothing submitted
    assert again.returncode == 2 and "still queued or running" in again.stderr, again.stderr
    assert len(json.loads((out / "slurm" / "jobs.json").read_text())["submissions"]) == 1
    _step_until_chunks(out, 2, pids, chunks=2)
    assert _alive(cluster, array, out)
    task_job = _tasks(cluster, array)[2][0]
    _signal_all(pids, signal.SIGKILL)             # as the OOM killer does (stopped processes die too)
    waited = subprocess.run([sys.executable, "-m", "memcirc.slurm", "wait", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert waited.returncode == 1, waited.stdout + waited.stderr
    report = waited.stdout
    log = out / "slurm" / "logs" / f"memorization_score-{array}_2.out"
    assert f"shard 2 of 4 failed: array task {array}_2 (job {task_job}) FAILED" in report, report
    assert f"log: {log}" in report and log.is_file()
    assert "memorization_score.merge" in report and "did not run" in report
    assert not (out / "memorization" / "manifest.json").exists()
    assert not (out / "memorization" / "scores.jsonl").exists()
    kept = _chunks(out, 2)
    status = subprocess.run([sys.executable, "-m", "memcirc.slurm", "status", str(out)], env=env,
                            capture_output=True, text=True)
    assert status.returncode == 1 and f"array task {array}_2" in status.stdout

    second = _pipeline(config_file, out, *args, "--wait", env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    array2 = _latest_jobs(out)["memorization_score"]["job_id"]
    logs = {i: (out / "slurm" / "logs" / f"memorization_score-{array2}_{i}.out").read_text() for i in range(4)}
    for i in (0, 1, 3):   # finished shards are not recomputed
        assert f"shard {i}/4 is done for this config" in logs[i] and "resuming" not in logs[i], logs[i]
    assert f"resuming: {kept} of 25 chunks already done" in logs[2], logs[2]
    assert (out / "memorization" / "scores.jsonl").read_bytes() == local_scores
    assert len(json.loads((out / "slurm" / "jobs.json").read_text())["submissions"]) == 2


# -- pre-emption: SIGTERM, requeue, resume from the chunks -----------------------------------

def test_preempted_and_signalled_shards_are_requeued_and_resume(config_file, local_scores, env, cluster, tmp_path):
    """Two shards of 200 windows (50 chunks each): shard 1 gets SIGTERM (as from a time-limit warning
    or an admin), shard 0 is pre-empted by a high-priority job; both are requeued and resume."""
    out = tmp_path / "preempted"
    first = _pipeline(config_file, out, "--slurm", "--to-stage", "memorization_score", "--num-shards", "2", env=env)
    assert first.returncode == 0, first.stderr
    array = _latest_jobs(out)["memorization_score"]["job_id"]
    running = lambda i: _alive(cluster, array, out) and _chunks(out, i) >= 2   # noqa: E731
    _wait_for(lambda: running(0) and running(1), "both shards to write two chunks")
    # shard 1: SIGTERM to the job's processes; the job script requeues the job itself
    cluster.sh("scancel", "--signal=TERM", "--batch", f"{array}_1")
    _wait_for(lambda: _restarted(cluster, array, out, 1), "shard 1 to be requeued")
    # a high-priority job that needs the whole node: SLURM pre-empts shard 0 (SIGTERM) and requeues it
    high = cluster.sh("sbatch", "--parsable", "-p", "high", "-c", "16", "--output", str(tmp_path / "high.out"),
                      "--wrap", "sleep 1").stdout.strip()
    _wait_for(lambda: _restarted(cluster, array, out, 0), "shard 0 to be pre-empted")

    # SLURM holds a requeued job ~2 min (BeginTime); release the hold so the test does not wait it out
    def released():
        tasks = _tasks(cluster, array)
        for job_id, state, restarts, reason in tasks.values():
            if restarts and state == "PENDING" and reason == "BeginTime":
                cluster.sh("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        return all(state == "COMPLETED" for _, state, _, _ in tasks.values())
    _wait_for(released, "the requeued shards to finish")
    waited = subprocess.run([sys.executable, "-m", "memcirc.slurm", "wait", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert cluster.wait(high) == ["COMPLETED"]
    assert {i: r for i, (_, _, r, _) in _tasks(cluster, array).items()} == {0: 1, 1: 1}
    logs = {i: (out / "slurm" / "logs" / f"memorization_score-{array}_{i}.out").read_text() for i in (0, 1)}
    for log in logs.values():
        assert "stopped by SIGTERM" in log and re.search(r"resuming: [1-9]\d* of 50 chunks already done", log), log
        assert "restart 0)" in log and "restart 1)" in log   # one log per task, appended across restarts
    assert "requeueing job" in logs[1]                        # the job script's own scontrol requeue
    assert "DUE TO PREEMPTION" in logs[0] and "requeueing job" not in logs[0]   # SLURM's requeue
    assert (out / "memorization" / "scores.jsonl").read_bytes() == local_scores


# -- the experiment grid on the cluster ------------------------------------------------------

def test_grid_runs_the_experiment_templates(config_file, cluster_run, env):
    out, _ = cluster_run
    r = subprocess.run([sys.executable, "-m", "memcirc.slurm", "grid", "--config", str(config_file),
                        "--output-dir", str(out), "--experiments", "branch_decision", "ablations", "--wait",
                        "--num-shards", "1",   # memorization is complete: one no-op job is enough
                        *(f"--common-arg={a}" for a in PIPELINE_FLAGS)],   # the pipeline run's windows
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = _latest_jobs(out)
    assert list(jobs) == ["memorization_score", "branch_decision", "ablations"]
    assert jobs["branch_decision"]["after"] == ["memorization_score"]
    assert jobs["ablations"]["after"] == ["branch_decision"]
    # the experiment's divergence pairs are the pipeline's (same config, same memorization run)
    assert (out / "branch_decision" / "contrastive" / "pairs.jsonl").read_bytes() == \
           (out / "contrastive" / "pairs.jsonl").read_bytes()
    verify = json.loads((out / "ablations" / "branch_decision" / "verify" / "manifest.json").read_text())
    assert verify["status"] == "complete" and verify["config"]["ablations"] == ["resample", "zero", "mean"]
    log = Path(jobs["ablations"]["log"].replace("%j", jobs["ablations"]["job_id"])).read_text()
    assert "no finished circuit in" in log and "memorization_decision" in log   # not in this grid: skipped


# -- paths sbatch must not split (w07) ----------------------------------------------------------

ODD_DIR = "w07 dir ü #1 100%x"   # space, umlaut, '#' (sbatch: a comment), '%x' (sbatch: the job name)


def test_an_output_dir_with_spaces_umlauts_hash_and_percent_reaches_the_cluster_intact(config_file, env, cluster,
                                                                                       tmp_path):
    """w07: `#SBATCH --output=<dir with space>/...` was unquoted. sbatch parses #SBATCH lines itself
    (double quotes group, an unquoted '#' ends the line, '%' starts a file-name pattern): the quoted,
    %-escaped values must reach slurmd as the very folder, for the log and for the stage's outputs."""
    out = tmp_path / ODD_DIR
    r = subprocess.run([sys.executable, "-m", "memcirc.slurm", "submit", "--config", str(config_file),
                        "--output-dir", str(out), "--stages", "memorization_score", "--num-shards", "1", "--wait",
                        *(f"--common-arg={a}" for a in ("--device", "cpu", "--limit", "8"))],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = _latest_jobs(out)
    assert list(jobs) == ["memorization_score", "report"]
    assert json.loads((out / "memorization" / "manifest.json").read_text())["status"] == "complete"
    for job in jobs.values():
        log = out / "slurm" / "logs" / f"{job['name']}-{job['job_id']}.out"
        assert log.is_file() and "memcirc: job" in log.read_text(), sorted(p.name for p in out.rglob("*.out"))
        assert f"WorkDir={REPO}\n" in cluster.sh("scontrol", "show", "job", job["job_id"]).stdout
    script = Path(jobs["memorization_score"]["script"]).read_text()
    assert f'#SBATCH --output="{out}/slurm/logs/memorization_score-%j.out"'.replace("100%x", "100%%x") in script
    assert f'#SBATCH --chdir="{REPO}"' in script


# -- no cluster needed -----------------------------------------------------------------------

def _slurm_cli(*argv, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "memcirc.slurm", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PATH": "/nonexistent"})   # no sbatch, no squeue


def test_dry_run_prints_the_scripts_and_writes_nothing(config_file, tmp_path):
    out = tmp_path / "dry"
    r = subprocess.run([str(REPO / "run_pipeline.sh"), "--slurm", "--dry-run", "--config", str(config_file),
                        "--output-dir", str(out), *FLAGS, "--num-shards", "3", "--prefix-len", "32"],
                       capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    scripts = re.split(r"^# ---- ", r.stdout, flags=re.M)[1:]
    names = [s.split()[0] for s in scripts]
    assert names == ["memorization_score", "memorization_score.merge", "contrastive_dataset", "kfac_edit",
                     "kfac_edit.merge", "training_dynamics", "training_dynamics.merge", "report"]
    by = dict(zip(names, scripts))
    assert "#SBATCH --array=0-4" in by["training_dynamics"]   # one task per checkpoint, not --num-shards
    assert '--checkpoint-index "$SLURM_ARRAY_TASK_ID"' in by["training_dynamics"]
    assert "#SBATCH --dependency=afterok:<memorization_score.merge>:<contrastive_dataset>" in by["training_dynamics"]
    assert "#SBATCH --array=0-2" in by["memorization_score"] and "#SBATCH --array=0-2" in by["kfac_edit"]
    assert '--num-shards 3 --shard-index "$SLURM_ARRAY_TASK_ID"' in by["memorization_score"]
    assert "--prefix-len 32" in by["memorization_score"] and "--prefix-len" not in by["kfac_edit"]
    assert "--dry-run" not in r.stdout   # the stages run for real when submitted
    assert "#SBATCH --dependency=afterok:<memorization_score>" in by["memorization_score.merge"]
    assert "#SBATCH --dependency=afterok:<memorization_score.merge>" in by["kfac_edit"]
    assert "--merge --num-shards 3" in by["kfac_edit.merge"]
    assert "#SBATCH --kill-on-invalid-dep=yes" in by["report"]
    # the scripts are valid bash
    for text in scripts:
        check = subprocess.run(["bash", "-n"], input=text.split("\n", 1)[1], text=True, capture_output=True)
        assert check.returncode == 0, check.stderr


def test_odd_output_dirs_are_quoted_and_control_characters_refused(config_file, tmp_path):
    """The dry run of an output dir with a space, an umlaut, '#' and '%': every path value quoted, the
    scripts valid bash. A newline (it would end the header comment and start a shell line), another
    control character or a backslash (sbatch drops it from --output) is refused before anything runs."""
    out = tmp_path / ODD_DIR
    r = subprocess.run([str(REPO / "run_pipeline.sh"), "--slurm", "--dry-run", "--config", str(config_file),
                        "--output-dir", str(out), *FLAGS], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    logs = f"{out}/slurm/logs".replace("%", "%%")
    assert f'#SBATCH --output="{logs}/memorization_score-%A_%a.out"' in r.stdout
    assert f'#SBATCH --output="{logs}/report-%j.out"' in r.stdout and f'#SBATCH --chdir="{REPO}"' in r.stdout
    for text in re.split(r"^# ---- ", r.stdout, flags=re.M)[1:]:
        check = subprocess.run(["bash", "-n"], input=text.split("\n", 1)[1], text=True, capture_output=True)
        assert check.returncode == 0, check.stderr
    for name, shown in (("a\nb", r"'\n'"), ("a\rb", r"'\r'"), ("tab\there", r"'\t'"), ("back\\slash", "'\\\\'")):
        bad = tmp_path / name
        for cmd in ([str(REPO / "run_pipeline.sh"), "--slurm", "--dry-run", "--config", str(config_file),
                     "--output-dir", str(bad)],
                    [sys.executable, "-m", "memcirc.slurm", "submit", "--config", str(config_file),
                     "--output-dir", str(bad)]):
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
            assert r.returncode == 2 and r.stderr.count("\n") == 1, (name, r.stderr)
            assert r.stderr.startswith("error: --output-dir") and shown in r.stderr and "job script" in r.stderr
            assert not bad.exists() and r.stdout == ""
    # a value of the slurm: section becomes part of one line too
    bad = tmp_path / "bad.yaml"
    bad.write_text('model: testbed\nslurm:\n  partition: "gpu\\n#SBATCH --x"\n')
    with pytest.raises(InputError, match="'slurm.partition' must be a one-line string"):
        read_settings(str(bad))


def test_stage_runner_requeues_only_a_running_job(tmp_path):
    """The job scripts' run_stage, with squeue/scontrol stand-ins: exit 143 of a RUNNING job -> requeue;
    of a cancelled job -> none; the stage's exit code is the job's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho \"$STATE\"\necho \"$@\" >> {tmp_path}/calls\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho scontrol \"$@\" >> {tmp_path}/calls\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}   # an array task: addressed as 70_3
    for state, rc, requeued in (("RUNNING", 143, True), ("SIGNALING", 143, True), ("COMPLETING", 143, False),
                                ("CANCELLED", 143, False), ("", 143, False), ("RUNNING", 3, False)):
        (tmp_path / "calls").unlink(missing_ok=True)
        script = RUNNER + f"run_stage sh -c 'exit {rc}'\n"
        r = subprocess.run(["bash", "-c", script], env={**env, "STATE": state}, capture_output=True, text=True)
        assert r.returncode == rc
        calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
        assert ("scontrol requeue 70_3" in calls) == requeued, (state, rc, calls, r.stderr)
        assert requeued <= ("-j 70_3" in calls)
    # a SIGTERM to the job script is passed on to the stage, whose exit code (143) the script returns
    script = RUNNER + "run_stage " + sys.executable + " -c " + \
        "'import signal,sys,time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); time.sleep(60)'\n"
    for sig in (signal.SIGTERM, signal.SIGUSR1):   # USR1: the time-limit warning of --signal=B:USR1@SECONDS
        proc = subprocess.Popen(["bash", "-c", script], env={**env, "STATE": "RUNNING"}, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(1.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143 and "requeueing job 70_3" in err, (sig, err)


def test_slurm_section_is_read_and_checked(config_file, tmp_path):
    cfg = build_config(ScoreConfig, ["--config", str(config_file)])   # stages ignore slurm:
    assert cfg.prefix_len == 32
    settings = read_settings(str(config_file))
    assert settings.num_shards("memorization_score", None) == 4 and settings.num_shards("kfac_edit", None) == 2
    assert settings.num_shards("kfac_edit", 8) == 8
    merge = settings.resources("memorization_score.merge")
    assert (merge.gpus, merge.cpus_per_task, merge.mem, merge.partition) == (0, 1, "2G", "gpu")
    cases = {"gpus: -1": "slurm.gpus", "gpu: 1": "unknown config key 'slurm.gpu'",
             "kfac_edit: {gpu: 2}": "slurm.kfac_edit.gpu", "extra: --x": "slurm.extra",
             "mem: [1]": "slurm.mem"}
    for text, message in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"model: testbed\nslurm:\n  {text}\n")
        with pytest.raises(InputError, match=re.escape(message)):
            read_settings(str(bad))
        r = _slurm_cli("submit", "--config", str(bad), "--output-dir", str(tmp_path / "x"), "--dry-run")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
    # a bad stage flag is refused at submission, before anything is written or submitted
    r = _slurm_cli("submit", "--config", str(config_file), "--output-dir", str(tmp_path / "y"),
                   "--stage-arg=memorization_score=--prefix-len=0")
    assert r.returncode == 2 and "prefix_len" in r.stderr and not (tmp_path / "y").exists(), r.stderr
    # without sbatch: one line, exit 2, nothing left behind
    r = _slurm_cli("submit", "--config", str(config_file), "--output-dir", str(tmp_path / "z"),
                   "--stages", "memorization_score", *(f"--common-arg={a}" for a in FLAGS))
    assert r.returncode == 2 and "sbatch not found" in r.stderr, r.stderr
    assert not (tmp_path / "z").exists()


def test_scontrol_records_and_task_ranges():
    line = ("JobId=17 ArrayJobId=15 ArrayTaskId=2 JobName=memcirc-x JobState=FAILED Reason=NonZeroExitCode "
            "Dependency=(null) Restarts=1 ExitCode=137:0 Command=/a b/c.sbatch WorkDir=/w TRES=cpu=4,mem=32G "
            "StdOut=/runs/x/slurm/logs/memorization_score-15_2.out")
    (rec,) = parse_records(line)
    assert (rec["JobId"], rec["ArrayTaskId"], rec["JobState"], rec["ExitCode"]) == ("17", "2", "FAILED", "137:0")
    assert rec["Command"] == "/a b/c.sbatch" and rec["TRES"] == "cpu=4,mem=32G"
    assert rec["StdOut"].endswith("memorization_score-15_2.out")
    assert task_ids("0-3%2") == [0, 1, 2, 3] and task_ids("1,3") == [1, 3]
    assert task_ids("[4-5,7]") == [4, 5, 7] and task_ids("6") == [6]


def test_grid_templates_render_with_the_config_resources(config_file, tmp_path):
    r = _slurm_cli("grid", "--config", str(config_file), "--output-dir", str(tmp_path / "g"), "--dry-run",
                   "--common-arg=--device", "--common-arg=cpu")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "g").exists()
    scripts = dict(s.split(maxsplit=1) for s in re.split(r"^# ---- ", r.stdout, flags=re.M)[1:])
    assert list(scripts) == ["memorization_score", "memorization_score.merge", *EXPERIMENTS]
    for name in EXPERIMENTS:
        text = scripts[name]
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --gres=gpu:1" in text
        assert f"#SBATCH --job-name=memcirc-{name}" in text and text.count("#SBATCH --job-name") == 1
        assert "run_stage() {" in text and "source verify_scripts/common.sh" in text
        assert f"set -- --config {config_file} --output-dir {tmp_path / 'g'}" in text
        assert subprocess.run(["bash", "-n"], input=text.split("\n", 1)[1], text=True).returncode == 0
    assert "afterok:<memorization_score.merge>" in scripts["branch_decision"]
    assert "afterok:<branch_decision>:<memorization_decision>" in scripts["ablations"]
    # the templates also run as plain scripts and as plain sbatch scripts (their own #SBATCH defaults)
    for name in EXPERIMENTS:
        text = (REPO / "verify_scripts" / f"{name}.sh").read_text()
        assert "#SBATCH --requeue" in text and "# memcirc: run_stage" in text
        assert subprocess.run(["bash", "-n", str(REPO / "verify_scripts" / f"{name}.sh")]).returncode == 0


# -- K-FAC factor shards add up to the one-job factors, and resume ---------------------------

KFAC = ["--config", "configs/testbed.yaml", "--limit", "12", "--factor-tokens", "2000", "--rhos", "1.0",
        "--ppl-blocks", "2", "--device", "cpu", "--batch-size", "4"]


def test_kfac_two_factor_shards_merged_equal_one_job(scored, tmp_path):

    mem = ["--input-dir", str(scored / "memorization")]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main("kfac_edit", [*KFAC, *mem, "--output-dir", str(one)]) == 0
    for i in (1, 0):   # any order
        assert main("kfac_edit", [*KFAC, *mem, "--output-dir", str(two), "--num-shards", "2",
                                           "--shard-index", str(i)]) == 0
    assert not (two / "kfac" / "manifest.json").exists()
    shard = two / "kfac" / "shards" / "00001" / "done.json"
    before = shard.read_bytes(), shard.stat().st_mtime_ns
    assert main("kfac_edit", [*KFAC, *mem, "--output-dir", str(two), "--num-shards", "2",
                                       "--shard-index", "1"]) == 0          # a finished shard: no-op
    assert (shard.read_bytes(), shard.stat().st_mtime_ns) == before
    assert main("kfac_edit", [*KFAC, *mem, "--output-dir", str(two), "--merge", "--num-shards", "2"]) == 0
    # exact: labels are drawn per factor block, sums are float64 over the same batches, so the
    # shard sums added in shard order round to the same float32 factors as the one-job run
    assert (one / "kfac" / "factors.safetensors").read_bytes() == (two / "kfac" / "factors.safetensors").read_bytes()
    assert (one / "kfac" / "deltas.safetensors").read_bytes() == (two / "kfac" / "deltas.safetensors").read_bytes()
    a, b = (json.loads((d / "kfac" / "summary.json").read_text()) for d in (one, two))
    a.pop("timings"), b.pop("timings")
    assert a == b and a["factor_tokens"] == 2000
    assert not (two / "kfac" / "shards").exists()
    # a merge with a shard missing is refused, naming it
    three = tmp_path / "three"
    assert main("kfac_edit", [*KFAC, *mem, "--output-dir", str(three), "--num-shards", "2",
                                       "--shard-index", "0"]) == 0
    r = subprocess.run([sys.executable, "kfac_edit.py", *KFAC, *mem, "--output-dir", str(three), "--merge",
                        "--num-shards", "2"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "factor shards [1] of 2 have not finished" in r.stderr, r.stderr


def test_factor_collection_resumes_from_its_last_save(testbed):
    """Stopped by SIGTERM after two saves, the collection continues from the saved float64 sums and
    ends with exactly the sums of an uninterrupted run; a shard of the same blocks adds up too."""
    from memcirc.kfac.factors import Checkpoint, FactorOptions, collect_factors, token_blocks
    from memcirc.kfac.targets import resolve_targets

    vocab = testbed.model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (6 * 128,), generator=torch.Generator().manual_seed(0)).numpy()
    batches = token_blocks(ids, 128, 10_000, 1)
    targets = resolve_targets(testbed.model, testbed.arch, [3], ["mlp_in"])
    opts = FactorOptions(labels="sampled", seed=5, float64=True)
    whole = collect_factors(testbed.model, targets, batches, opts)
    saves = []

    def stop_after_two(n, sums):
        saves.append((n, sums))
        if len(saves) == 2:
            raise Terminated()
    with pytest.raises(Terminated):
        collect_factors(testbed.model, targets, batches, opts, checkpoint=Checkpoint(stop_after_two, every=2))
    n, partial = saves[-1]
    assert n == 4 and partial.n_tokens == 4 * 127
    later = FactorOptions(labels="sampled", seed=5, float64=True, first_block=n)
    resumed = collect_factors(testbed.model, targets, batches[n:], later, initial=partial)
    tail = collect_factors(testbed.model, targets, batches[n:], later)
    head = collect_factors(testbed.model, targets, batches[:n], opts)
    name = targets[0].name
    assert torch.equal(resumed.A[name], whole.A[name]) and torch.equal(resumed.G[name], whole.G[name])
    assert resumed.n_tokens == whole.n_tokens == 6 * 127
    torch.testing.assert_close((head + tail).G[name], whole.G[name], rtol=1e-12, atol=0)   # float64 rounding only
    # the labels depend on the block, not on where a batch starts: other seeds give other factors
    other = collect_factors(testbed.model, targets, batches, FactorOptions(labels="sampled", seed=6, float64=True))
    assert not torch.equal(other.G[name], whole.G[name])

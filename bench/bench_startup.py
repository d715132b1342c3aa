"""Start-up share of the local pipeline: imports and model loads, one process per stage vs one in all.

  OMP_NUM_THREADS=1 python bench/bench_startup.py [--config configs/testbed.yaml] [--repeats 1]
      [--wall SECONDS | --time-log FILE | --run-dir DIR] [--wall-of new|old]

Measured here, each in a fresh subprocess (best of --repeats, wall seconds; CPU seconds beside):
  * per stage: the interpreter plus the imports that stage pays (its module; TransformerLens and
    auto-circuit where its config needs them), then its model load (and TL conversion) alone;
  * the old way (run_pipeline.sh before memcirc.pipeline): `memcirc.config`, `memcirc.preflight`, one
    process per stage and `memcirc.report`, each paying its imports: 8 + 3 processes;
  * the new way (`memcirc pipeline`): `memcirc.config` (the script's stage list), then one process
    importing everything once; model loads are the same (each stage still loads its own model).
The pipeline wall comes from a finished run (nothing is re-run): --wall, the "Elapsed (wall clock)"
line of a `/usr/bin/time -v` log (--time-log), or a run folder's manifests (--run-dir: the span from
the first stage's start to the last one's finish, plus the one-process imports before it; second
resolution). --wall-of says which way that run went (default new); the other way's wall is that wall
with the start-up swapped. The last line is a JSON object: startup_s, pipeline_wall_s, startup_share,
old_startup_s, old_pipeline_wall_s, old_startup_share, bound (0.15: the target share), per-stage rows.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BOUND = 0.15

# Runs in the child: import what `stages` need (timed), then load each stage's model (timed apart).
CHILD = r"""
import json, sys, time, resource
t0 = time.perf_counter(); c0 = time.process_time()
config, stages, load = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
import memcirc.cli, memcirc.preflight, memcirc.report
from memcirc.config import build_config
from memcirc.stages.registry import STAGES
cfgs = {}
for name in stages:
    stage = STAGES[name]
    argv = ["--config", config, "--output-dir", "/nonexistent", "--device", "cpu"]
    cfg = cfgs[name] = build_config(stage.config, argv)
    stage.module
    if stage.needs_tl(cfg):
        import memcirc.models.tl
    if cfg.needs_auto_circuit():
        import auto_circuit, memcirc.circuits.discover
imports, imports_cpu = time.perf_counter() - t0, time.process_time() - c0
loads = {}
if load:
    from memcirc.models import load as load_model, to_hooked_transformer
    for name in stages:
        t1 = time.perf_counter()
        loaded = load_model(cfgs[name].model_spec())
        if STAGES[name].needs_tl(cfgs[name]):
            to_hooked_transformer(loaded)
        loads[name] = time.perf_counter() - t1
print(json.dumps({"imports_s": imports, "imports_cpu_s": imports_cpu, "loads_s": loads}))
"""


def child(config: str, stages: list[str], load: bool) -> dict:
    """One fresh process: its whole wall (interpreter start included) and what it timed inside."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, config, json.dumps(stages), "1" if load else "0"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - started
    return out


def light_process(args: list[str]) -> float:
    """Wall of a helper process the shell script ran (stage list, preflight, report)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, check=True)
    return time.perf_counter() - started


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["process_s"])


def measure(config: str, stages: list[str], repeats: int, run_dir: Path | None) -> dict:
    """Per-stage processes (old way), one process for all (new way), and the helper processes."""
    per_stage = {s: best([child(config, [s], load=True) for _ in range(repeats)]) for s in stages}
    together = best([child(config, stages, load=False) for _ in range(repeats)])
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--config", config, "--output-dir", tmp, "--device", "cpu"]
        helpers = {"config": ["-m", "memcirc.config", "pipeline", config],
                   "preflight": ["-m", "memcirc.preflight", "--stages", *stages, *flags]}
        if run_dir is not None:   # the report imports every stage module (their headline functions)
            helpers["report"] = ["-m", "memcirc.report", str(run_dir), "--no-write"]
        walls = {k: min(light_process(a) for _ in range(repeats)) for k, a in helpers.items()}
    walls.setdefault("report", together["process_s"])   # no run to report on: its imports, measured
    loads = sum(r["loads_s"][s] for s, r in per_stage.items())
    old = sum(walls.values()) + sum(r["process_s"] for r in per_stage.values())
    new = walls["config"] + together["process_s"] + loads
    rows = {s: {"process_s": round(r["process_s"], 3), "imports_s": round(r["imports_s"], 3),
                "imports_cpu_s": round(r["imports_cpu_s"], 3), "load_s": round(r["loads_s"][s], 3)}
            for s, r in per_stage.items()}
    return {"old": old, "new": new, "loads": loads, "together": together["process_s"], "rows": rows,
            "helpers_s": {k: round(v, 3) for k, v in walls.items()}}


def wall_from_time_log(path: Path) -> float:
    """The `Elapsed (wall clock) time (h:mm:ss or m:ss): 1:23.45` line of /usr/bin/time -v."""
    match = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", path.read_text())
    if match is None:
        sys.exit(f"{path}: no 'Elapsed (wall clock) time' line (run the pipeline under /usr/bin/time -v)")
    seconds = 0.0
    for part in match.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def wall_from_run_dir(run_dir: Path, before_first: float) -> float:
    """First stage start to last stage finish from the manifests, plus the start-up before the first."""
    stamps = []
    for manifest in run_dir.glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        stamps += [datetime.strptime(data[k], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
                   for k in ("started_at", "finished_at")]
    if not stamps:
        sys.exit(f"{run_dir}: no stage manifest.json")
    return max(stamps) - min(stamps) + before_first


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "testbed.yaml"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--wall", type=float, help="the pipeline's wall seconds")
    parser.add_argument("--time-log", type=Path, help="a /usr/bin/time -v log of the pipeline")
    parser.add_argument("--run-dir", type=Path, help="a finished run folder (manifest timestamps)")
    parser.add_argument("--wall-of", choices=("new", "old"), default="new")
    args = parser.parse_args()
    from memcirc.config import pipeline_stages

    m = measure(args.config, pipeline_stages(args.config), args.repeats, args.run_dir)
    print(json.dumps({"per_stage": m["rows"], "helpers_s": m["helpers_s"],
                      "one_process_imports_s": round(m["together"], 3)}, indent=1))
    wall = args.wall
    if args.time_log is not None:
        wall = wall_from_time_log(args.time_log)
    elif args.run_dir is not None:
        first = next(iter(m["rows"].values()))
        wall = wall_from_run_dir(args.run_dir, m["helpers_s"]["config"] + m["together"] + first["load_s"])
    result = {"startup_s": round(m["new"], 2), "old_startup_s": round(m["old"], 2),
              "model_loads_s": round(m["loads"], 3), "saved_s": round(m["old"] - m["new"], 2), "bound": BOUND}
    if wall is not None:
        new_wall = wall if args.wall_of == "new" else wall - m["old"] + m["new"]
        old_wall = new_wall - m["new"] + m["old"]
        result.update(pipeline_wall_s=round(new_wall, 2), startup_share=round(m["new"] / new_wall, 4),
                      old_pipeline_wall_s=round(old_wall, 2), old_startup_share=round(m["old"] / old_wall, 4),
                      within_bound=m["new"] / new_wall <= BOUND)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

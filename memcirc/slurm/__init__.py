"""Scale-out on SLURM: the pipeline as job arrays and dependent jobs (`run_pipeline.sh --slurm`).

The stages and what they read come from the stage registry (`memcirc.stages.registry`). A stage
with `array="shards"` (scoring, K-FAC factor collection) runs as a job array of `--num-shards` tasks,
one with `array="checkpoints"` (training_dynamics) as one array task per checkpoint; each array's
merge is a job with `--dependency=afterok` on the array, and every other stage a job that depends on
the final job of its upstream stages. Resources come from the config's `slurm:` section:

    slurm:
      partition: gpu
      gpus: 1                  # --gres=gpu:N
      cpus_per_task: 4
      mem: 32G
      time: "04:00:00"
      account: my-lab
      extra: ["--constraint=a100"]       # more #SBATCH lines
      setup: ["module load cuda/12.4"]   # shell lines run before each stage
      num_shards: 8
      kfac_edit: {num_shards: 2}         # per-job overrides: a stage, <stage>.merge, report, an experiment
      memorization_score.merge: {mem: 4G, time: "00:20:00"}

Every job is requeueable and appends to its log; on SIGTERM a stage keeps its finished chunks and
exits 143, and the job script requeues the job (`scontrol requeue`) unless SLURM is already
requeueing it (pre-emption) or it was cancelled; the requeued job resumes. The submitted scripts
and job ids are recorded under `<run>/slurm/` (`jobs.json`), which `status` reads to say which
shard failed, its array task and its log. A finished shard is a no-op when submitted again, so
re-submitting the same command recomputes only what is missing.

    python -m memcirc.slurm submit --config C --output-dir RUN --stages memorization_score kfac_edit
    python -m memcirc.slurm status RUN        # exit 0 done or running, 1 something failed
    python -m memcirc.slurm wait RUN
    python -m memcirc.slurm grid --config C --output-dir RUN     # verify_scripts/ experiment grid

The modules: settings (the slurm: section), plan (stages -> jobs, from the stage registry), render
(sbatch scripts and the bash stage runner), submit, records (jobs.json), status (scontrol/sacct ->
the report), grid (the experiment grid) and __main__ (the command line).
"""

"""A throw-away single-node SLURM cluster for the tests (docs/slurm.md, "Tests").

Debian bookworm: slurmctld, slurmd, slurm-client and munge (Slurm 22.05, munge 0.5.15); `ensure_slurm`
installs them with apt-get when they are missing and the tests run as root. Everything runs as the
current user, in a fresh short folder, on free ports, with fake GPUs (symlinks to /dev/null), so
production-like `#SBATCH -p gpu --gres=gpu:1 --mem=32G` scripts are accepted on a 2-core machine.

    cluster = MiniSlurm("/tmp/slurm-abcd", cpus=16, mem_mb=256000, gpus=4, partitions=("debug", "gpu")).start()
    ...  # sbatch/squeue/scontrol with SLURM_CONF=cluster.conf (cluster.env)
    cluster.stop()
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
INSTALL = "apt-get install -y --no-install-recommends " + " ".join(PACKAGES)
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"   # the daemons live in /usr/sbin
NODE = "node0"   # fixed name + `slurmd -N node0`: the host's own name does not matter
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}

CONF = """\
ClusterName=testcluster
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={cport}
SlurmdPort={dport}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket.2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait={kill_wait}
GresTypes=gpu
NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem}{gres} State=UNKNOWN
{partitions}
{extra}
"""


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def ensure_slurm() -> str | None:
    """None when the SLURM daemons and clients are there (installing them as root if needed), else why not."""
    if all(which(n) for n in ("munged", "slurmctld", "slurmd", "sbatch")):
        return None
    if os.geteuid() != 0:
        return f"SLURM is not installed and the tests do not run as root to install it ({INSTALL})"
    if not shutil.which("apt-get"):
        return f"SLURM is not installed and there is no apt-get to install it ({INSTALL})"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], INSTALL.split()):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            return f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
    if not all(which(n) for n in ("munged", "slurmctld", "slurmd", "sbatch")):
        return f"`{INSTALL}` ran but the SLURM binaries are still missing"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MiniSlurm:
    """munged + slurmctld + slurmd in foreground, owned by this object (stopped by PID only)."""

    def __init__(self, directory: str | Path, cpus: int = 2, mem_mb: int = 4000, gpus: int = 2,
                 partitions: tuple[str, ...] = ("debug",), kill_wait: int = 30,
                 extra: str = "") -> None:
        self.d = Path(directory).resolve()
        self.cpus, self.mem, self.gpus, self.partitions, self.kill_wait = cpus, mem_mb, gpus, partitions, kill_wait
        self.extra = extra
        self.procs: dict[str, subprocess.Popen] = {}
        self.startup_s = 0.0

    def start(self, timeout: float = 60) -> MiniSlurm:
        d = self.d
        # unix socket paths (munged's, slurmstepd's in the spool) have at most 108 bytes
        assert len(f"{d}/spool/{NODE}_4294967294.4294967294") < 108, "use a short folder such as /tmp/slurm-XXXX"
        for sub in ("etc", "munge", "state", "spool", "log", "run", "dev"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)               # munged: every folder above its socket needs o+x
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        for i in range(self.gpus):       # gres/gpu wants File= character devices
            if not (d / "dev" / f"nvidia{i}").exists():
                os.symlink("/dev/null", d / "dev" / f"nvidia{i}")
        if self.gpus:
            (d / "etc" / "gres.conf").write_text(f"NodeName={NODE} Name=gpu File={d}/dev/nvidia[0-{self.gpus - 1}]\n")
        # a partition is its name, optionally followed by more attributes ("high PriorityTier=10")
        parts = "\n".join(f"PartitionName={p.split()[0]} Nodes=ALL Default={'YES' if i == 0 else 'NO'} "
                           f"MaxTime=INFINITE State=UP {' '.join(p.split()[1:])}".rstrip()
                           for i, p in enumerate(self.partitions))
        self.cport, self.dport = free_port(), free_port()
        self.conf = d / "etc" / "slurm.conf"
        self.conf.write_text(CONF.format(cport=self.cport, dport=self.dport, user=getpass.getuser(), d=d, node=NODE,
                                         cpus=self.cpus, mem=self.mem, partitions=parts, kill_wait=self.kill_wait,
                                         extra=self.extra,
                                         gres=f" Gres=gpu:{self.gpus}" if self.gpus else ""))
        # a clean environment: nothing from an outer allocation, SLURM_CONF names this cluster
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        t0 = time.time()
        log = open(d / "log" / "daemons.out", "ab")  # noqa: SIM115 - the daemons keep it open
        sock = d / "munge" / "munge.socket.2"
        self.procs["munged"] = subprocess.Popen(
            [which("munged"), "-F", f"--socket={sock}", f"--key-file={key}", f"--pid-file={d}/munge/munged.pid",
             f"--seed-file={d}/munge/munged.seed", f"--log-file={d}/log/munged.log"], stdout=log, stderr=log)
        while not sock.exists():
            if self.procs["munged"].poll() is not None:
                raise RuntimeError((d / "log" / "daemons.out").read_text())
            time.sleep(0.02)
        for name, argv in (("slurmctld", ["-D", "-f", str(self.conf)]),
                           ("slurmd", ["-D", "-N", NODE, "-f", str(self.conf)])):
            self.procs[name] = subprocess.Popen([which(name), *argv], stdout=log, stderr=log, env=self.env)
        while time.time() - t0 < timeout:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited rc={p.returncode}; see {d}/log")
            states = self.sh("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if states and states[0] == "idle":
                self.startup_s = time.time() - t0
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"node never idle; see {d}/log")

    def stop(self) -> None:
        # cancel jobs first: with proctrack/linuxproc a running job's processes outlive slurmd
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.sh("scancel", "--user", getpass.getuser(), check=False)
            t0 = time.time()
            while time.time() - t0 < 20 and self.sh("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def sh(self, *argv: str, cwd: str | Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, check=check, env=self.env, cwd=cwd)

    def states(self, job_id: str | int) -> list[str]:
        """One JobState per array task (scontrol keeps finished jobs for MinJobAge seconds)."""
        return re.findall(r"JobState=(\S+)", self.sh("scontrol", "show", "job", str(job_id), check=False).stdout)

    def wait(self, job_id: str | int, timeout: float = 180) -> list[str]:
        t0 = time.time()
        states: list[str] = []
        while time.time() - t0 < timeout:
            states = self.states(job_id)
            if states and all(s in TERMINAL for s in states):
                return states
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {states} after {timeout} s")

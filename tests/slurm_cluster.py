"""A throwaway Slurm cluster on this machine, for the tests of the job scripts under launch/slurm/.

One munged, one slurmctld and two slurmd daemons posing as nodes n1 and n2 of partition `test`, all on this
host (NodeAddr 127.0.0.1, one port per slurmd), everything (config, state, spool, logs, munge key and socket)
under one temporary directory. Run as root with Debian's slurm-wlm and munge installed (`make install-test`).

    cluster = SlurmCluster.start()      # raises ClusterUnavailable(reason) if it cannot come up
    job = cluster.submit("launch/slurm/train.sbatch", ["stage=structbert", ...], env={...}, sbatch_args=[...])
    cluster.wait_for(job, {"COMPLETED"}, timeout=300)
    cluster.stop()                      # kills every daemon it started, even after a failure
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = ("n1", "n2")
# Job states after which the job will not run again by itself (a requeued job goes back to PENDING).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class ClusterUnavailable(RuntimeError):
    """Slurm or munge is missing, or the daemons would not start: the tests skip with this reason."""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]  # held open together, so the n ports differ
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def missing_programs() -> list[str]:
    return [p for p in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun", "scancel") if not shutil.which(p)]


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge", "munge.socket")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del self.env[key]  # pytest itself could run inside a Slurm job: these would leak into ours
        self.procs: list[subprocess.Popen] = []

    # ---- life cycle -------------------------------------------------------------------------------------
    @classmethod
    def start(cls, timeout: float = 60.0) -> "SlurmCluster":
        missing = missing_programs()
        if missing:
            raise ClusterUnavailable(f"Slurm/munge not installed (missing {', '.join(missing)}; `make install-test` installs slurm-wlm and munge as root)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("the throwaway Slurm cluster runs its daemons as root (SlurmUser=root)")
        cluster = cls(tempfile.mkdtemp(prefix="slurm-test-"))
        try:
            cluster._start_munge()
            cluster._write_conf()
            cluster._daemon(["slurmctld", "-D", "-i", "-f", cluster.conf], "slurmctld")
            for node in NODES:
                cluster._daemon(["slurmd", "-D", "-N", node, "-f", cluster.conf], f"slurmd.{node}")
            cluster._wait_idle(timeout)
        except BaseException as e:
            logs = cluster.logs()
            cluster.stop()
            if isinstance(e, ClusterUnavailable):
                raise ClusterUnavailable(f"{e}\n{logs}") from None
            raise
        return cluster

    def _daemon(self, argv: list[str], name: str) -> None:
        out = open(os.path.join(self.root, "log", f"{name}.out"), "w")
        # Own session: stop() can kill a daemon together with anything it forked.
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def _start_munge(self) -> None:
        d = os.path.join(self.root, "munge")
        os.makedirs(d, mode=0o700)
        os.makedirs(os.path.join(self.root, "log"))
        key = os.path.join(d, "munge.key")
        with open(key, "wb") as f:  # a fresh key: nothing outside this cluster has to trust it
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._daemon(["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed", f"--log-file={self.root}/log/munged.log"],
                     "munged")  # fmt: skip
        deadline = time.time() + 15
        while not os.path.exists(self.munge_socket):
            if self.procs[-1].poll() is not None or time.time() > deadline:
                raise ClusterUnavailable("munged did not start")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, d1, d2 = _free_ports(3)
        host, cpus = socket.gethostname(), os.cpu_count() or 1
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.root, sub))
        r = self.root
        lines = [
            "ClusterName=pretraintest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d1}",  # each node overrides it below: two slurmd on one host need two ports
            "SlurmUser=root",
            "SlurmdUser=root",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in a container: track processes through /proc, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "JobRequeue=1",
            "ReturnToService=2",
            # Short timeouts: a test must not wait out production defaults.
            "KillWait=5",
            "MessageTimeout=10",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "MinJobAge=3600",  # no accounting here: a finished job's state and exit code live only in this record
            "WaitTime=0",
            f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={d1} CPUs={cpus} State=UNKNOWN",
            f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={d2} CPUs={cpus} State=UNKNOWN",
            "PartitionName=test Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]  # fmt: skip
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise ClusterUnavailable(f"{' '.join(p.args[:1])} exited with status {p.returncode}")
            proc = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            last = proc.stdout.strip() + proc.stderr.strip()
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"nodes not idle after {timeout:.0f} s: {last!r}")

    def stop(self) -> None:
        """Cancel the jobs, kill every daemon (and its process group) and whatever a job left behind, then remove
        the directory; safe to call twice, and after a failed start."""
        if self.procs and os.path.exists(self.conf):
            self._run(["scancel", "--quiet", "--user", str(os.getuid())], check=False)
            deadline = time.time() + 20
            while time.time() < deadline and self._run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=15)
        self.procs = []
        self._kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """slurmstepd and the job's tasks are not in a daemon's process group; they all carry SLURM_CONF=<our conf>
        in their environment, which nothing outside this cluster does."""
        mark = f"SLURM_CONF={self.conf}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log: what a failed test prints."""
        out = []
        for d in (os.path.join(self.root, "log"),):
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                with open(os.path.join(d, name), errors="replace") as f:
                    lines = f.readlines()[-tail:]
                out.append(f"--- {name}\n" + "".join(lines))
        return "\n".join(out)

    # ---- jobs -------------------------------------------------------------------------------------------
    def _run(self, argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: rc={proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def output_path(self, job_id: int) -> str:
        return os.path.join(self.root, f"job{job_id}.out")

    def submit(self, script: str, args: list[str] = (), env: dict | None = None, sbatch_args: list[str] = ()) -> int:
        """sbatch the script (relative to the repository) with its arguments; returns the job id. `env` is
        exported on top of this process's environment; the job's output (across requeues) goes to
        output_path(job_id)."""
        exports = ",".join(f"{k}={v}" for k, v in (env or {}).items())
        for k, v in (env or {}).items():
            if "," in str(v):
                raise ValueError(f"{k}={v}: --export cannot carry a value with a comma")
        argv = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={self.root}/job%j.out", "--open-mode=append",
                "--export=ALL" + ("," + exports if exports else ""), *sbatch_args, os.path.join(REPO, script), *args]  # fmt: skip
        return int(self._run(argv).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...); {} once it is gone."""
        proc = self._run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", proc.stdout))

    def job_state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def job_exit_code(self, job_id: int) -> tuple[int, int]:
        """(exit status, signal) of the batch script, as scontrol reports it ("1:0")."""
        status, sig = self.job(job_id).get("ExitCode", "0:0").split(":")
        return int(status), int(sig)

    def restarts(self, job_id: int) -> int:
        return int(self.job(job_id).get("Restarts", "0"))

    def output(self, job_id: int) -> str:
        try:
            with open(self.output_path(job_id), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for(self, job_id: int, states: set[str] | str, timeout: float, poll: float = 1.0) -> str:
        """Wait until the job is in one of `states`; fail with its output if it ends elsewhere or time runs out."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            if state in FINISHED:
                break
            time.sleep(poll)
        else:
            self.cancel(job_id)
        raise AssertionError(f"job {job_id}: {state or 'unknown'} after up to {timeout:.0f} s, expected {sorted(states)}\n"
                             f"{self.describe(job_id)}")  # fmt: skip

    def describe(self, job_id: int) -> str:
        info = self.job(job_id)
        keys = ("JobState", "Reason", "ExitCode", "Restarts", "NodeList", "BatchHost")
        return " ".join(f"{k}={info.get(k)}" for k in keys) + f"\n--- job output\n{self.output(job_id)[-6000:]}"

    def cancel(self, job_id: int, *args: str) -> None:
        self._run(["scancel", *args, str(job_id)], check=False)

    def listpids(self, job_id: int) -> list[dict[str, str]]:
        """The job's processes on this host (`scontrol listpids`): rows with PID, JOBID, STEPID, LOCALID, GLOBALID."""
        rows = []
        for node in NODES:  # every slurmd of this host answers for its own node name
            env = dict(self.env, SLURMD_NODENAME=node)
            proc = subprocess.run(["scontrol", "listpids", str(job_id)], env=env, capture_output=True, text=True, timeout=30)
            lines = proc.stdout.split("\n")
            for line in lines[1:]:
                parts = line.split()
                if len(parts) == 5:
                    rows.append(dict(zip(("PID", "JOBID", "STEPID", "LOCALID", "GLOBALID"), parts), node=node))
        return rows

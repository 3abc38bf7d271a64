"""Helpers that segkit's notebook tests share: where the shared test data is, scratch folders, free ports, starting
training processes, and running a command in the test's own process. They are not part of the package (nothing in
`segkit/` imports them, and `nbdev_export` does not write them): they live beside the notebooks, which import them as
`testkit`."""
import contextlib, io, logging, os, shutil, signal, socket, subprocess, tempfile, time
from pathlib import Path

SHARED = Path(os.environ.get("SEGKIT_SHARED_DATA", Path(__file__).resolve().parents[2]/"shared"/"data"))
TEST_ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
TEST_ENV.pop("SEGKIT_ARGS", None)


def shared_data(name: str) -> Path:
    "The shared test data set `name` (voc2012_subset, membrane): ../shared/data beside the project, or $SEGKIT_SHARED_DATA."
    path = SHARED/name
    if not path.is_dir():
        raise FileNotFoundError(f"These tests read the real data set {path}, which is missing. Put the shared data folder beside the "
                                "project (../shared/data, see its SOURCE.md files) or point SEGKIT_SHARED_DATA at it.")
    return path


def voc_sample() -> Path: return shared_data("voc2012_subset")
def membrane() -> Path: return shared_data("membrane")


def scratch() -> Path:
    "A new scratch folder; each notebook removes its own in its last cell (and keeps it when a cell fails, for a look)."
    return Path(tempfile.mkdtemp(prefix="segkit-test-"))


def free_port() -> int:
    "A free TCP port on 127.0.0.1 (for rendezvous and servers in tests)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GLOO_STARTUP_FAILURES = ("connectFullMesh failed",)


def run_torchrun(cmd: list, env: dict | None = None, timeout: float = 600, retries: int = 1):
    "Run a torchrun command line (a list), retrying `retries` times on a gloo start-up failure (two busy cores); returns the CompletedProcess."
    for attempt in range(retries + 1):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env or TEST_ENV)
        if r.returncode == 0 or not any(s in r.stderr for s in GLOO_STARTUP_FAILURES) or attempt == retries: return r
        print(f"torchrun start-up failed (gloo could not connect), retrying once:\n{r.stderr[-800:]}")


def run_command(main, argv) -> subprocess.CompletedProcess:
    """Run a segkit command's `main(argv)` in this process, as `python -m segkit.<command> ARGV` runs it, and return its exit
    code, stdout and stderr as `subprocess.run` would. A process of its own adds 4-5 s of imports (torch, torchvision) and
    nothing that a wrong flag, file or data set could reach, so the batteries of bad input use this; every command is
    still run as a process of its own elsewhere. An exception that escapes the command's error handling fails the test
    with its traceback, where a process would have printed it."""
    segkit_log = logging.getLogger("segkit")
    handlers, out, err = list(segkit_log.handlers), io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try: main([str(a) for a in argv]); code = 0
            except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:                                                      # the command's log handlers write to `err`: remove them
        for h in list(segkit_log.handlers):
            if h not in handlers: segkit_log.removeHandler(h); h.close()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def launch(cmd, log_file, env=None, cwd=None):
    "Start `cmd` in its own process group, its output appended to `log_file` (a pipe nobody reads would fill up and block it)."
    log = open(log_file, "a")
    return subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=log, text=True, env=env or TEST_ENV, cwd=cwd, start_new_session=True)


def stop_group(p, sig=signal.SIGKILL, timeout=60):
    "Send `sig` to the process group of `p` (started by `launch`) and wait for it."
    try: os.killpg(p.pid, sig)
    except ProcessLookupError: pass
    p.wait(timeout=timeout)


def wait_for(predicate, timeout: float, poll: float = 0.02) -> bool:
    "Poll `predicate()` until it is true or `timeout` seconds have passed; returns its last value."
    end = time.time() + timeout
    while time.time() < end:
        if predicate(): return True
        time.sleep(poll)
    return bool(predicate())


def remove(path):
    "Remove a scratch folder."
    shutil.rmtree(path, ignore_errors=True)


# README.md and the notebook session in index.ipynb ----------------------------------------------------------------------

def _text(x) -> str: return "".join(x) if isinstance(x, list) else str(x)


def shown_outputs(outputs) -> list:
    "The outputs of a cell that README.md shows: what it prints (stdout), its value, its pictures; not its log (stderr)."
    keep = []
    for o in outputs:
        kind = o["output_type"]
        if kind == "stream" and o.get("name") == "stdout": keep.append({"output_type": "stream", "name": "stdout", "text": _text(o["text"])})
        elif kind in ("execute_result", "display_data"):
            data = o.get("data", {})
            if "image/png" in data: keep.append({"output_type": "display_data", "data": {"image/png": _text(data["image/png"]).strip()}, "metadata": {}})
            elif "text/plain" in data: keep.append({"output_type": "display_data", "data": {"text/plain": _text(data["text/plain"])}, "metadata": {}})
    return keep


def render_readme(nb_path) -> tuple[str, dict]:
    "README.md from the visible cells of `nb_path` (with their printed outputs and pictures), and the pictures it links to: {file name: PNG bytes}."
    import base64, json
    cells, parts, images = json.loads(Path(nb_path).read_text())["cells"], [], {}
    for c in cells:
        src = "".join(c["source"])
        if src.lstrip().startswith("#| hide"): continue
        if c["cell_type"] == "markdown":
            parts.append(src.strip())
            continue
        code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
        if code: parts.append(f"```python\n{code}\n```")
        for k, o in enumerate(shown_outputs(c.get("outputs", []))):
            if "image/png" in o.get("data", {}):
                name = f"{c['id']}-{k}.png"
                images[name] = base64.b64decode(o["data"]["image/png"])
                parts.append(f"![](nbs/images/{name})")
            else:
                text = o["text"] if o["output_type"] == "stream" else o["data"]["text/plain"]
                parts.append(f"```\n{text.rstrip()}\n```")
    return "\n\n".join(parts) + "\n", images


def run_session(nb_path, cwd) -> dict:
    "Run the visible code cells of `nb_path` in a fresh shell, in folder `cwd`, as a user would; their shown outputs by cell id."
    import json
    from execnb.shell import CaptureShell
    cells = [c for c in json.loads(Path(nb_path).read_text())["cells"]
             if c["cell_type"] == "code" and not "".join(c["source"]).lstrip().startswith("#| hide")]
    old = os.getcwd()
    os.chdir(cwd)
    try:
        shell, out = CaptureShell(), {}
        for c in cells:
            outputs = shell.run("".join(c["source"]))
            if shell.exc: raise RuntimeError(f"README cell {c['id']} failed:\n{''.join(c['source'])}\n{shell.exc!r}")
            out[c["id"]] = shown_outputs(outputs)
        return out
    finally: os.chdir(old)


# Services the cluster tests start on this machine, each stopped by its process id ---------------------------------------

class ServiceUnavailable(Exception):
    "A service a test needs cannot start on this machine (the test says so in one line and is skipped)."


def _alive(pid: int) -> bool:
    try: return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError): return False


def _stop_pids(procs, timeout: float = 10.0):
    "SIGTERM each process (a Popen), wait `timeout` s, SIGKILL what is left."
    for p in procs:
        if p.poll() is None: p.terminate()
    end = time.time() + timeout
    for p in procs:
        try: p.wait(max(0.1, end - time.time()))
        except subprocess.TimeoutExpired: p.kill(); p.wait(5)


class LocalSlurm:
    """A Slurm cluster of one node (this machine, 127.0.0.1), private to a folder of its own (which the munge user can
    enter): its own munge key and socket, slurm.conf, state and logs; nothing under /etc is touched. Needs root and Debian's
    `slurm-wlm` and `munge` (installed with apt-get when missing). `env()` is the environment that reaches it (`SLURM_CONF`);
    `stop()` cancels its jobs, ends its daemons and removes the folder."""
    def __init__(self):
        self.dir, self.procs = Path(tempfile.mkdtemp(prefix="segkit-slurm-")), []
        self.conf = self.dir/"slurm.conf"

    def env(self, base: dict | None = None) -> dict:
        e = {k: v for k, v in (base or TEST_ENV).items() if not k.startswith("SLURM_")}
        return {**e, "SLURM_CONF": str(self.conf)}

    def run(self, *args, **kwargs):
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=self.env(), timeout=60, **kwargs)

    def _spawn(self, argv, **kwargs):
        log = open(self.dir/"log"/f"{Path(argv[0]).name}.out", "ab")
        self.procs.append(subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, env=self.env(), **kwargs))

    def _wait(self, what, ok, timeout=60):
        if not wait_for(lambda: ok() or any(p.poll() is not None for p in self.procs), timeout, poll=0.1) or not ok():
            raise ServiceUnavailable(f"Slurm's {what} did not start (logs in {self.dir/'log'})")

    def start(self) -> "LocalSlurm":
        import pwd, shutil as sh
        if os.geteuid() != 0: raise ServiceUnavailable("a local Slurm needs root")
        if not (sh.which("slurmctld") and sh.which("munged")):
            r = subprocess.run("apt-get install -y -qq slurm-wlm munge", shell=True, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if r.returncode != 0: raise ServiceUnavailable(f"apt-get could not install slurm-wlm and munge: {r.stderr.strip()[-200:]}")
        for sub in ("state", "spool", "log", "munge"): (self.dir/sub).mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        munge, user = self.dir/"munge", pwd.getpwnam("munge")
        (munge/"munge.key").write_bytes(os.urandom(1024)); (munge/"munge.key").chmod(0o600)
        for p in (munge, munge/"munge.key"): os.chown(p, user.pw_uid, user.pw_gid)
        self.socket = munge/"munge.socket.2"
        self._spawn(["munged", "-F", f"--socket={self.socket}", f"--key-file={munge/'munge.key'}", f"--pid-file={munge/'munged.pid'}",
                     f"--log-file={munge/'munged.log'}", f"--seed-file={munge/'munged.seed'}", "--num-threads=2"],
                    user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        self._wait("munged", lambda: self.socket.exists() and subprocess.run(
            f"munge -n -S {self.socket} | unmunge -S {self.socket}", shell=True, capture_output=True).returncode == 0)
        node = dict(t.split("=", 1) for t in subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout.split("\n")[0].split())
        self.node = node["NodeName"]
        d = self.dir
        self.conf.write_text("\n".join([
            f"ClusterName=segkit", f"SlurmctldHost={self.node}(127.0.0.1)", f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire=10",                     # a requeued job restarts after seconds, not minutes
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool", f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SwitchType=switch/none", "MpiDefault=none", "MailProg=/bin/true", "JobRequeue=1", "ReturnToService=2", "MinJobAge=600",
            "KillWait=30", "InactiveLimit=0", "SchedulerParameters=sched_interval=1,bf_interval=1",
            " ".join(f"{k}={v}" for k, v in {**node, "NodeAddr": "127.0.0.1", "State": "UNKNOWN"}.items()),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        self._spawn(["slurmctld", "-D", "-c", "-f", self.conf])
        self._wait("controller", lambda: "is UP" in self.run("scontrol", "ping").stdout)
        self._spawn(["slurmd", "-D", "-f", self.conf, "-N", self.node])
        self._wait("node", lambda: self.run("sinfo", "-h", "-N", "-o", "%t").stdout.split() == ["idle"])
        return self

    def job(self, job_id) -> dict:
        "`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); empty once the job is gone."
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout.split()
        return dict(t.split("=", 1) for t in out if "=" in t)

    def stop(self):
        if self.conf.exists() and all(p.poll() is None for p in self.procs[1:]):
            self.run("scancel", "--full", "--partition", "debug")
            wait_for(lambda: not self.run("squeue", "-h", "-o", "%i").stdout.strip(), 20, poll=0.2)
        _stop_pids(self.procs[::-1])
        shutil.rmtree(self.dir, ignore_errors=True)


def start_mlflow_server(folder: Path, port: int):
    "An `mlflow server` on 127.0.0.1:`port` with its store in `folder` (sqlite); returns its Popen once it answers (stop with `stop_group`)."
    import urllib.request
    folder.mkdir(parents=True, exist_ok=True)
    env = {**TEST_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    p = launch(["mlflow", "server", "--backend-store-uri", f"sqlite:///{folder/'mlflow.db'}", "--artifacts-destination", folder/"artifacts",
                "--host", "127.0.0.1", "--port", port, "--workers", 1], folder/"server.log", env)
    def up():
        try: return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
        except OSError: return False
    if not wait_for(lambda: up() or p.poll() is not None, 120, poll=0.3) or not up():
        stop_group(p, signal.SIGTERM)
        raise ServiceUnavailable(f"mlflow server did not start: {(folder/'server.log').read_text()[-500:]}")
    return p


class SmallDisk:
    "A tmpfs of `size` bytes mounted on `folder` (root only); `fill(free)` leaves `free` bytes; use as a context manager (unmounts)."
    def __init__(self, folder: Path, size: int):
        self.dir, self.size = Path(folder), size
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0: raise ServiceUnavailable("mounting a tmpfs needs root")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.dir)], capture_output=True, text=True)
        if r.returncode != 0: raise ServiceUnavailable(f"mount -t tmpfs failed: {r.stderr.strip()}")
    def __enter__(self): return self
    def __exit__(self, *exc): subprocess.run(["umount", "-l", str(self.dir)])
    def free(self) -> int: return shutil.disk_usage(self.dir).free
    def fill(self, free: int):
        "Leave `free` bytes (to a page) with a filler file."
        filler = self.dir/"filler"
        filler.unlink(missing_ok=True)
        with open(filler, "wb") as f: f.write(b"\0" * max(0, self.free() - free))


# A real browser for the pages segkit writes ---------------------------------------------------------------------------------

def chromium() -> str:
    "The path of Debian's Chromium, installed with apt-get when missing (needs root)."
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found: return found
    r = subprocess.run("apt-get install -y -qq chromium", shell=True, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert r.returncode == 0 and shutil.which("chromium"), f"apt-get could not install chromium: {r.stderr.strip()[-300:]}"
    return shutil.which("chromium")


def render_page(page: Path, screenshot: Path | None = None, timeout: float = 120) -> str:
    """Open `page` in headless Chromium, started here in a process group of its own and killed by its id if it hangs; returns
    the DOM after the page loaded (its scripts run), and with `screenshot`, writes what it drew there as a PNG."""
    browser, outs = chromium(), []
    for extra in (["--dump-dom"], *([[f"--screenshot={screenshot}"]] if screenshot else [])):
        with tempfile.TemporaryDirectory(prefix="segkit-chromium-") as profile:
            p = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                                  f"--user-data-dir={profile}", "--window-size=1280,2000", *extra, Path(page).resolve().as_uri()],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
            try: outs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                stop_group(p)
                raise AssertionError(f"Chromium did not finish rendering {page} in {timeout} s") from None
        assert p.returncode == 0, f"Chromium exited with {p.returncode} on {page}"
    return outs[0]

"""Helpers that segkit's notebook tests share: where the shared test data is, scratch folders, free ports, and
starting training processes. They are not part of the package (nothing in `segkit/` imports them, and `nbdev_export`
does not write them): they live beside the notebooks, which import them as `testkit`."""
import os, shutil, signal, socket, subprocess, tempfile, time
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

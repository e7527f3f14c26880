"""Run model-written Python in a separate, confined process.

Every program runs in a fresh interpreter (``python -I -S``: no site-packages, no user site, no PYTHON*
variables) with a fresh temporary directory as cwd, HOME and TMPDIR, a scrubbed environment, and these
layers, each applied when the machine allows it (``isolation()`` says which are active):

* **rlimits** (always): CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), processes of the user
  (RLIMIT_NPROC), size of any written file (RLIMIT_FSIZE), no core dumps; plus a wall-clock timeout
  after which the whole process group is SIGKILLed.
* **namespaces** (``unshare`` from util-linux, as root or with unprivileged user namespaces): a new
  network namespace (no interface but a down loopback, so nothing can be reached, not even local
  services) and a new PID namespace, so killing its first process kills every descendant, including
  ones that called ``setsid`` to leave the process group.
* **another user** (when we run as root): the program runs as ``nobody`` (uid/gid 65534, no supplementary
  groups), so the file system's own permissions stop it from writing, deleting or reading anything that
  is not world-accessible. RLIMIT_NPROC is not enforced for root, so this layer is also what makes the
  process limit real there.
* **an audit hook** (always, defence in depth, installed before the program's first line): socket
  creation, subprocesses, ``exec*``, signals, ``ctypes`` and writes/deletes/renames outside the
  temporary directory raise ``PermissionError``; reads are limited to the temporary directory and the
  interpreter's standard library. It is in-process, so code determined to escape could find a way
  around it (the audit-hook PEP says so itself); where the layers above are missing it is the only
  barrier against network use and file writes, and ``isolation()`` reports that.

What is not guaranteed: confidentiality of world-readable files when we are not root and user namespaces
are unavailable beyond what the audit hook stops; disk usage is bounded per file (RLIMIT_FSIZE), not in
total; and a program can still burn its CPU/wall budget. Results come back as ``SandboxResult`` with a
reason, never as an exception, so an evaluation carries on with the next sample.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0  # wall clock for the whole program, start-up included
    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU) of each process
    memory_mb: int = 1024  # address space (RLIMIT_AS) of each process
    max_procs: int = 16  # processes the program may add (RLIMIT_NPROC, counted per user)
    max_file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE); also caps captured output
    output_chars: int = 2000  # kept from the end of stdout / stderr in the result


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str  # "passed", or why not: "timeout ...", "memory limit ...", "blocked: network ...", ...
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: str  # the layers that were active, e.g. "netns+pidns,uid=65534,rlimits,audit-hook"

    def record(self) -> dict:
        return {"passed": self.passed, "reason": self.reason, "wall_s": round(self.wall_s, 3)}


class SandboxError(RuntimeError):
    """The sandbox itself cannot run here (not a failure of the program under test)."""


# The runner executes inside the sandbox. It reads a one-time token from stdin, installs the audit hook,
# runs each part in one namespace, and prints the token only if every part finished: a program that
# exits early with status 0 (``sys.exit(0)`` or ``os._exit(0)`` before the tests) does not pass.
_RUNNER = r"""
import sys
def _main():
    token = sys.stdin.readline().strip()
    sys.stdin.close()
    import os
    root = os.path.realpath(os.getcwd())
    paths = [os.path.join(root, name) for name in sys.argv[1:]]
    codes = []
    for i, p in enumerate(paths):
        with open(p, encoding="utf-8") as fh:
            src = fh.read()
        try:
            codes.append(compile(src, os.path.basename(p), "exec"))
        except SyntaxError as e:
            print(f"__SAFEFT_FAIL__ part={i} SyntaxError: {e.msg} (line {e.lineno})", file=sys.stderr)
            sys.exit(1)
    if os.environ.get("SAFEFT_SANDBOX_HOOK") == "1":
        _hook(root)
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    for i, code in enumerate(codes):
        try:
            exec(code, ns)
        except BaseException as e:
            import traceback
            traceback.print_exc()
            if isinstance(e, SystemExit) and e.code in (0, None):
                print(f"__SAFEFT_FAIL__ part={i} exited before the tests finished", file=sys.stderr)
            else:
                print(f"__SAFEFT_FAIL__ part={i} {type(e).__name__}: {e}"[:500], file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
    sys.stdout.flush()
    print(token, flush=True)

def _hook(root):
    import os
    stdlib = tuple(os.path.realpath(p) + os.sep for p in sys.path if p)
    readable = ("/dev/null", "/dev/urandom", "/dev/zero")
    deny = {
        "socket.__new__": "network", "socket.connect": "network", "socket.bind": "network",
        "socket.getaddrinfo": "network", "socket.gethostbyname": "network",
        "subprocess.Popen": "subprocesses", "os.system": "subprocesses", "os.exec": "subprocesses",
        "os.posix_spawn": "subprocesses", "os.spawn": "subprocesses", "os.kill": "signals",
        "os.killpg": "signals", "ctypes.dlopen": "ctypes", "ctypes.dlsym": "ctypes",
        "ctypes.cdata": "ctypes", "os.chroot": "chroot",
    }
    no_import = {"_posixsubprocess", "_ctypes", "ctypes"}
    path_args = {
        "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
        "shutil.rmtree": (0,), "os.chflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
        "os.setxattr": (0,), "os.removexattr": (0,),
    }
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, join, getcwd, fsdecode, sep = os.path.realpath, os.path.join, os.getcwd, os.fsdecode, os.sep

    def inside(p):
        if isinstance(p, int) or p is None:
            return True  # an already-open descriptor: it was checked when it was opened
        full = realpath(join(getcwd(), fsdecode(p)))
        return full == root or full.startswith(root + sep)

    def block(what, event):
        raise PermissionError(f"safeft sandbox: {what} is blocked ({event})")

    def hook(event, args):
        if event in deny:
            block(deny[event], event)
        elif event == "import" and args[0] in no_import:
            block("importing " + args[0], event)
        elif event == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None or inside(path):
                return
            if (mode and any(c in mode for c in "wax+")) or (flags or 0) & wflags:
                block("writing outside the sandbox directory", event)
            full = realpath(join(getcwd(), fsdecode(path)))
            if full not in readable and not (full + sep).startswith(stdlib):
                block("reading outside the sandbox directory", event)
        elif event in path_args:
            for i in path_args[event]:
                if i < len(args) and not inside(args[i]):
                    block("changing files outside the sandbox directory", event)

    sys.addaudithook(hook)

_main()
"""

_FAIL = re.compile(r"^__SAFEFT_FAIL__ part=(\d+) (.*)$", re.MULTILINE)


def run_code(
    parts: str | Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    *,
    hook: bool = True,
    python: str | None = None,
) -> SandboxResult:
    """Run ``parts`` (e.g. ``[solution, tests]``) one after another in one namespace, confined.

    Passes iff every part runs to its end without an exception. ``hook=False`` leaves out the audit
    hook (only for testing that the OS layers hold on their own).
    """
    parts = [parts] if isinstance(parts, str) else list(parts)
    layers = isolation()
    py = python or _python_for(layers["uid"])
    workdir = Path(tempfile.mkdtemp(prefix="safeft-sandbox-"))
    token = secrets.token_hex(16)
    try:
        names = []
        for i, src in enumerate(parts):
            f = workdir / f"part{i}.py"
            f.write_text(src, encoding="utf-8")
            names.append(f.name)
        if layers["uid"] != os.getuid():
            for p in (workdir, *workdir.iterdir()):
                os.chown(p, layers["uid"], layers["uid"])
        cmd = [*layers["prefix"], py, "-I", "-S", "-c", _RUNNER, *names]
        env = {
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "SAFEFT_SANDBOX_HOOK": "1" if hook else "0",
        }
        return _execute(cmd, env, workdir, token, limits, layers, hook)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(
    programs: Sequence[str | Sequence[str]], limits: SandboxLimits = SandboxLimits(), progress: bool = True
) -> list[SandboxResult]:
    """Run each program in its own sandbox, one at a time; a failure never stops the rest."""
    from tqdm.auto import tqdm

    return [run_code(p, limits) for p in tqdm(programs, desc="sandbox", disable=not progress)]


def _execute(cmd, env, workdir: Path, token: str, limits: SandboxLimits, layers: dict, hook: bool) -> SandboxResult:
    nproc = _count_procs(layers["uid"]) + limits.max_procs
    drop = layers["uid"] != os.getuid() and not layers["prefix"]  # no unshare: drop privileges ourselves

    def preexec() -> None:  # runs in the child between fork and exec
        cap = limits.max_file_mb << 20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write((token + "\n").encode())
        inp.seek(0)
        start = time.monotonic()
        # Output goes to files outside the sandbox directory (not pipes): a program that fills a pipe or
        # leaves a child holding it open can neither block us nor tamper with what we read back.
        proc = subprocess.Popen(
            cmd,
            stdin=inp,
            stdout=out,
            stderr=err,
            cwd=workdir,
            env=env,
            # Only setrlimit calls run between fork and exec (no imports, no locks taken), which is what
            # keeps preexec_fn safe although tqdm may have a monitor thread running.
            preexec_fn=preexec,  # noqa: PLW1509
            start_new_session=True,
            close_fds=True,
            # Without unshare, we drop to 'nobody' ourselves (Popen does it in the child before preexec).
            **(dict(user=NOBODY, group=NOBODY, extra_groups=[]) if drop else {}),
        )
        # os.wait4 rather than Popen.wait: its rusage (which includes every descendant the child reaped)
        # tells a CPU-limit kill apart from other deaths, which unshare does not pass on faithfully.
        deadline = start + limits.wall_s
        timed_out, status, usage = False, None, None
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
            elif time.monotonic() > deadline:
                timed_out = True
                _kill_group(proc.pid)
                _, status, usage = os.wait4(proc.pid, 0)
            else:
                time.sleep(0.005)
        _kill_group(proc.pid)  # stragglers outside a PID namespace
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        cpu = usage.ru_utime + usage.ru_stime
        stdout, stderr = _tail(out, limits.output_chars), _tail(err, limits.output_chars)
    rc = None if timed_out else proc.returncode
    passed = not timed_out and rc == 0 and stdout.rstrip().endswith(token)
    if passed:
        stdout = stdout.rstrip()[: -len(token)]
    desc = ",".join([layers["desc"], "rlimits"] + (["audit-hook"] if hook else []))
    reason = "passed" if passed else _reason(timed_out, rc, stderr, limits, cpu)
    return SandboxResult(passed, reason, rc, stdout, stderr, wall, desc)


def _kill_group(pgid: int) -> None:
    # SIGKILL the whole group: with a PID namespace this kills its first process and the kernel then
    # kills every process inside it; without one, the group is all we can reach.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(f, n: int) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")[-n:]


def _reason(timed_out: bool, rc: int | None, stderr: str, limits: SandboxLimits, cpu: float) -> str:
    if timed_out:
        return f"timeout: still running after {limits.wall_s:g} s wall clock (killed)"
    fails = _FAIL.findall(stderr)
    detail = fails[-1][1].strip() if fails else ""
    if not detail and cpu >= limits.cpu_s - 0.05:
        return f"cpu time limit: {cpu:.1f} s used of {limits.cpu_s} s (killed)"
    if rc is not None and rc < 0:
        return f"killed by signal {signal.Signals(-rc).name}"
    if "MemoryError" in detail or (not detail and "MemoryError" in stderr):
        return f"memory limit ({limits.memory_mb} MB): {detail or 'MemoryError'}"
    if "safeft sandbox:" in detail:
        return "blocked: " + detail.split("safeft sandbox:", 1)[1].strip()
    if "Resource temporarily unavailable" in detail or "BlockingIOError" in detail:
        return f"process limit ({limits.max_procs}): {detail}"
    if detail:
        return f"part {fails[-1][0]} failed: {detail}"
    if "File size limit" in stderr or rc == 128 + signal.SIGXFSZ:
        return f"file size limit ({limits.max_file_mb} MB)"
    if rc == 0:
        return "exited before the tests finished"
    return f"exit status {rc}"


def _count_procs(uid: int) -> int:
    """Processes currently owned by ``uid`` (RLIMIT_NPROC counts them all, not only ours)."""
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        m = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
        n += bool(m and int(m.group(1)) == uid)
    return n


@functools.cache
def isolation() -> dict:
    """Which layers this machine allows: ``prefix`` (the unshare command), ``uid`` the program runs as."""
    root = os.getuid() == 0
    uid = NOBODY if root else os.getuid()
    unshare = shutil.which("unshare")
    candidates = []
    if unshare:
        base = [unshare, "--net", "--pid", "--fork", "--kill-child"]
        if root:
            candidates.append((base + ["--setuid", str(NOBODY), "--setgid", str(NOBODY), "--"], "netns+pidns"))
        else:
            candidates.append((base[:1] + ["--map-root-user"] + base[1:] + ["--"], "userns+netns+pidns"))
    for prefix, desc in candidates:
        probe = subprocess.run([*prefix, "/bin/true"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return {"prefix": prefix, "uid": uid, "desc": f"{desc},uid={uid}", "network": "namespace"}
        log.warning("sandbox: %s unavailable (%s)", desc, probe.stderr.decode(errors="replace").strip())
    log.warning("sandbox: no network/PID namespaces here; network use is blocked only by the in-process audit hook")
    return {"prefix": [], "uid": uid, "desc": f"no-namespaces,uid={uid}", "network": "audit-hook"}


@functools.cache
def _python_for(uid: int) -> str:
    """An interpreter ``uid`` can execute (ours may live under /root, which nobody cannot enter)."""
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/local/bin/python3", "/usr/bin/python3"]
    for py in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
        if uid == os.getuid():
            return py
        try:
            drop = {} if isolation()["prefix"] else dict(user=uid, group=uid, extra_groups=[])
            probe = subprocess.run(
                [*isolation()["prefix"], py, "-I", "-S", "-c", "import math, re"],
                capture_output=True,
                timeout=30,
                check=False,
                **drop,
            )
        except OSError:  # the exec itself was refused
            continue
        if probe.returncode == 0:
            return py
    raise SandboxError(
        f"no Python interpreter that uid {uid} may execute (tried {', '.join(candidates)}); the sandbox "
        "runs model code as 'nobody' when safeft runs as root. Install a system python3 or run as a normal user."
    )

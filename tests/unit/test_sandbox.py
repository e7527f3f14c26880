"""The sandbox contains hostile model code: each snippet fails with a reason, and the next sample still runs."""

from __future__ import annotations

import os
import socket
import time

import pytest

from safeft.eval import sandbox
from safeft.eval.sandbox import SandboxLimits, run_code, run_many

# Short limits keep the suite fast; the wall clock is the backstop for everything.
FAST = SandboxLimits(wall_s=2.0, cpu_s=1, memory_mb=256, max_procs=8)
GOOD = ["def add_one(x):\n    return x + 1\n", "assert add_one(1) == 2\n"]


def _procs_of_sandbox_user() -> int:
    return sandbox._count_procs(sandbox.isolation()["uid"])


def _settles_to(n: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _procs_of_sandbox_user() <= n:
            return True
        time.sleep(0.05)
    return False


def test_a_correct_program_passes_and_a_wrong_one_says_why():
    ok = run_code(GOOD, FAST)
    assert ok.passed and ok.reason == "passed" and ok.returncode == 0
    bad = run_code(["def add_one(x):\n    return x\n", GOOD[1]], FAST)
    assert not bad.passed and "part 1 failed: AssertionError" in bad.reason


def test_runs_in_a_fresh_temp_dir_with_a_scrubbed_env(monkeypatch):
    monkeypatch.setenv("SAFEFT_SECRET_TOKEN", "hunter2")
    show = "import os, sys\nfor v in (os.getcwd(), os.environ['HOME'], sorted(os.environ), sys.flags.isolated):\n"
    r = run_code(show + "    print(v)\n", FAST)
    assert r.passed, r.reason
    cwd, home, env, isolated = r.stdout.strip().splitlines()
    assert os.path.basename(cwd).startswith("safeft-sandbox-") and home == cwd
    assert "SAFEFT_SECRET_TOKEN" not in env and isolated.strip() == "1"
    assert not os.path.exists(cwd)  # removed afterwards


def test_infinite_loop_is_killed():
    r = run_code("while True:\n    pass\n", FAST)
    assert not r.passed and (r.returncode is None or r.returncode < 0)
    assert "timeout" in r.reason or "cpu time" in r.reason
    assert r.wall_s < FAST.wall_s + 1.5


def test_fork_bomb_is_contained_and_leaves_no_process_behind():
    before = _procs_of_sandbox_user()
    # The quiet variant swallows the errors, so only the wall clock and process kill stop it.
    loud = "import os\nwhile True:\n    os.fork()\n"
    quiet = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    for bomb in (loud, quiet):
        r = run_code(bomb, FAST)
        assert not r.passed and ("process limit" in r.reason or "timeout" in r.reason), r.reason
    assert _settles_to(before), "forked processes survived the sandbox"


def test_memory_bomb_hits_the_memory_limit():
    r = run_code("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", FAST)
    assert not r.passed and "memory limit" in r.reason


@pytest.mark.parametrize("hook", [True, False], ids=["with-hook", "os-layers-only"])
def test_cannot_write_or_delete_outside_the_temp_dir(tmp_path, hook):
    if not hook and sandbox.isolation()["uid"] == os.getuid():
        pytest.skip("without the audit hook, only running as another user protects the user's files")
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    evil = tmp_path / "written-by-sandbox.txt"
    for snippet in (
        f"open({str(evil)!r}, 'w').write('x')\n",
        f"import os\nos.remove({str(canary)!r})\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"import pathlib\npathlib.Path({str(canary)!r}).write_text('overwritten')\n",
    ):
        r = run_code(snippet, FAST, hook=hook)
        assert not r.passed, snippet
        assert "blocked" in r.reason or "PermissionError" in r.reason or "FileNotFoundError" in r.reason, r.reason
    assert canary.read_text() == "keep me" and not evil.exists()


def test_can_write_inside_its_own_temp_dir():
    r = run_code("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n", FAST)
    assert r.passed and r.stdout.strip() == "ok"


def test_socket_is_blocked_by_the_hook():
    r = run_code("import socket\ns = socket.socket()\n", FAST)
    assert not r.passed and r.reason.startswith("blocked: network")


def test_network_namespace_alone_reaches_nothing():
    """Without the audit hook, a connection to a server on this machine's loopback must still fail."""
    if sandbox.isolation()["network"] != "namespace":
        pytest.skip("no network namespace on this machine: only the audit hook blocks network use")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        call = f"socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')"
        r = run_code(f"import socket\n{call}\n", FAST, hook=False)
        assert not r.passed and ("ConnectionRefused" in r.reason or "OSError" in r.reason), r.reason
        with pytest.raises(TimeoutError):
            srv.accept()
    finally:
        srv.close()


def test_early_exit_with_status_zero_does_not_pass():
    for early in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        r = run_code([early, "assert False\n"], FAST)
        assert not r.passed and "exited before the tests finished" in r.reason


def test_evaluation_carries_on_after_hostile_samples(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    programs = [
        "while True:\n    pass\n",
        "import os\nwhile True:\n    os.fork()\n",
        "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
        f"import os\nos.remove({str(canary)!r})\n",
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
        "def f(:\n",
        GOOD,
    ]
    results = run_many(programs, FAST, progress=False)
    assert [r.passed for r in results] == [False] * 6 + [True]
    assert all(r.reason for r in results) and "SyntaxError" in results[5].reason
    assert canary.exists()


def test_without_namespaces_the_other_layers_still_contain(tmp_path, monkeypatch):
    """Machines without unshare: rlimits, the audit hook and (as root) the 'nobody' user must still hold."""
    real = sandbox.isolation()
    monkeypatch.setattr(
        sandbox,
        "isolation",
        lambda: {"prefix": [], "uid": real["uid"], "desc": f"no-namespaces,uid={real['uid']}", "network": "audit-hook"},
    )
    before = _procs_of_sandbox_user()
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    programs = [
        "import os\nwhile True:\n    os.fork()\n",
        "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
        f"import os\nos.remove({str(canary)!r})\n",
        "import socket\nsocket.socket()\n",
        GOOD,
    ]
    results = run_many(programs, FAST, progress=False)
    assert [r.passed for r in results] == [False] * 4 + [True], [r.reason for r in results]
    assert "process limit" in results[0].reason and "memory limit" in results[1].reason
    assert results[3].reason.startswith("blocked: network") and "no-namespaces" in results[4].isolation
    assert canary.exists() and _settles_to(before)
    if real["uid"] != os.getuid():  # as root, 'nobody' alone (no hook) keeps the user's files safe
        r = run_code(f"import os\nos.remove({str(canary)!r})\n", FAST, hook=False)
        assert not r.passed and canary.exists()


@pytest.mark.parametrize(
    ("snippet", "what"),
    [
        ("print(open('/etc/passwd').read())\n", "reading outside"),
        ("import subprocess\nsubprocess.run(['/bin/true'])\n", "importing _posixsubprocess"),
        ("import os\nos.system('true')\n", "subprocesses"),
        ("import os\nos.execv('/bin/true', ['true'])\n", "subprocesses"),
        ("import ctypes\n", "importing ctypes"),
    ],
)
def test_the_audit_hook_blocks_escape_hatches(snippet, what):
    r = run_code(snippet, FAST)
    assert not r.passed and r.reason.startswith("blocked: ") and what in r.reason, r.reason

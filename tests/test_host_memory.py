"""Huge pages for XLA's per-step blocks: when the launcher adds glibc's tunable, and that glibc honours it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rlhf_jax import host_memory
from rlhf_jax.host_memory import environment

GLIBC = (2, 36)
ON = {"RLHF_JAX_HUGE_PAGES": "on"}


def test_environment_adds_the_tunable_only_where_it_changes_something():
    assert environment(ON, "madvise", GLIBC) == {**ON, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = {**ON, "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert environment(kept, "madvise", GLIBC) == {
        **ON, "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # a new mapping; the caller's is left alone
    for mode in ("always", "never", None):  # every large mapping has them already, or none can
        assert environment(ON, mode, GLIBC) is None
    assert environment(ON, "madvise", (2, 34)) is None  # before the tunable existed
    assert environment(ON, "madvise", None) is None  # not glibc
    for switch in ("off", "0", "False", " no ", ""):
        assert environment({"RLHF_JAX_HUGE_PAGES": switch}, "madvise", GLIBC) is None
    assert environment({}, "madvise", GLIBC) is None  # off unless asked for
    for switch in ("on", "1", " TRUE ", "yes"):
        assert environment({"RLHF_JAX_HUGE_PAGES": switch}, "madvise", GLIBC) is not None
    for users in ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=2", "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=0"):
        assert environment({**ON, "GLIBC_TUNABLES": users}, "madvise", GLIBC) is None  # the user's setting wins


def test_transparent_huge_pages_reads_the_selected_mode(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_pages(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert host_memory.transparent_huge_pages(str(path)) == "always"
    assert host_memory.transparent_huge_pages(str(tmp_path / "missing")) is None


def _applies() -> bool:
    return environment(ON, host_memory.transparent_huge_pages(), host_memory.glibc_version()) is not None


def test_reexec_runs_the_same_command_once_with_the_tunable():
    code = textwrap.dedent("""
        import os, sys
        from rlhf_jax.host_memory import reexec_with_huge_pages
        print("start", sys.argv[1:], flush=True)
        reexec_with_huge_pages()
        print("tunables", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RLHF_JAX_HUGE_PAGES")}
    lines = subprocess.run([sys.executable, "-c", code, "a=1", "b"], env={**env, **ON}, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    if _applies():
        assert lines == ["start ['a=1', 'b']", "start ['a=1', 'b']", "tunables glibc.malloc.hugetlb=1 ['a=1', 'b']"]
    else:
        assert lines == ["start ['a=1', 'b']", "tunables None ['a=1', 'b']"]
    for off in ({}, {"RLHF_JAX_HUGE_PAGES": "off"}):
        lines = subprocess.run([sys.executable, "-c", code], env={**env, **off}, capture_output=True, text=True,
                               check=True).stdout.splitlines()
        assert lines == ["start []", "tunables None []"]


def _launcher_tunables(tmp_path, switch):
    """`python -m rlhf_jax.launch` with RLHF_JAX_HUGE_PAGES=on re-executes itself before it starts JAX: the
    running process's environment (`/proc/<pid>/environ`, which an exec replaces) holds the tunable where it
    applies; without the switch it does not."""
    if not os.path.exists("/proc/self/environ"):
        pytest.skip("reads the launched process's environment from /proc/<pid>/environ, which only Linux has")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RLHF_JAX_HUGE_PAGES")}
    process = subprocess.Popen([sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_sft",
                                f"run_dir={tmp_path / 'run'}"],
                               env={**env, **switch, "RLHF_JAX_COMPILATION_CACHE": "off"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, seen = time.monotonic() + 300, None  # a loaded test machine starts JAX slowly
        while time.monotonic() < deadline and process.poll() is None:
            if (tmp_path / "run").exists():  # the run directory exists: past any re-exec
                seen = host_memory.process_glibc_tunables(process.pid)
                break
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (tmp_path / "run").exists(), "the launcher did not start the run"
    assert seen == ("glibc.malloc.hugetlb=1" if _applies() and switch else None)


def test_process_glibc_tunables_reads_a_running_process(tmp_path):
    if not os.path.exists("/proc/self/environ"):
        pytest.skip("reads a process's environment from /proc/<pid>/environ, which only Linux has")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    for extra, expected in (({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc.malloc.arena_max=2"), ({}, None)):
        process = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
                                   env={**env, **extra}, stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout.readline() == "ready\n"  # running its own program: past the exec
            assert host_memory.process_glibc_tunables(process.pid) == expected
        finally:
            process.kill()
            process.communicate()
    assert host_memory.process_glibc_tunables(process.pid) is None  # gone (reaped): unreadable


@pytest.mark.parametrize("switch", [ON, {}])
def test_the_launcher_runs_with_the_tunable_when_asked(tmp_path, switch):
    _launcher_tunables(tmp_path, switch)


@pytest.mark.skipif(not _applies(), reason="needs glibc 2.35+ and transparent huge pages in `madvise` mode")
def test_glibc_gives_fresh_mappings_huge_pages_with_the_tunable():
    """What the launcher relies on: with the tunable, writing a fresh 256 MiB block from glibc's malloc takes a
    few hundred page faults (2 MiB each) instead of 65,536 (4 KiB each). (ctypes, not numpy: numpy asks for
    huge pages on its own large arrays.)"""
    code = textwrap.dedent("""
        import ctypes, resource
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(libc.malloc(2**28), 1, 2**28)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    small, huge = (int(subprocess.run([sys.executable, "-c", code], env={**env, **setting}, capture_output=True,
                                      text=True, check=True).stdout)
                   for setting in ({}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}))
    assert small >= 2**28 // 4096
    assert huge < small // 16

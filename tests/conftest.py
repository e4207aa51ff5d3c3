"""Shared pytest fixtures.

SLURM fixtures: the tests marked ``@pytest.mark.slurm`` run against the real local cluster that
``bash slurm/local_cluster.sh start`` brings up. They find it through ``<state dir>/env.sh`` (state dir:
``bench.pipeline.slurm.local_cluster_dir``, the script's rule). When the cluster is not up they are
skipped, and counted apart in the summary line (``N skipped: no SLURM cluster``), unless
``TOKENBENCH_REQUIRE_SLURM=1`` (CI), in which case they fail with the reason.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

SLURM_SKIPPED = "skipped: no SLURM cluster"  # the summary line's category for SLURM tests that could not run


def read_env_sh(path: Path) -> dict[str, str]:
    """Parse the ``export KEY=VALUE`` lines that local_cluster.sh writes (values are shell-quoted)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("export "):
            continue
        key, sep, raw = line[len("export ") :].partition("=")
        if sep:
            parts = shlex.split(raw)
            values[key.strip()] = parts[0] if parts else ""
    return values


def _slurm_unavailable(reason: str) -> None:
    hint = "start it with: bash slurm/local_cluster.sh start"
    if os.environ.get("TOKENBENCH_REQUIRE_SLURM") == "1":
        pytest.fail(
            f"TOKENBENCH_REQUIRE_SLURM=1 but the local SLURM cluster is not usable: {reason} ({hint})",
            pytrace=False,
        )
    pytest.skip(f"local SLURM cluster not available: {reason} ({hint})")


@pytest.fixture(scope="session")
def slurm_env():
    """Environment (dict) for subprocesses talking to the local cluster.

    Also sets ``os.environ["SLURM_CONF"]`` for the whole session (restored afterwards): submitit runs
    sbatch/sacct/scancel as subprocesses of this Python and they must find this cluster's slurm.conf.
    """
    from bench.pipeline.slurm import local_cluster_dir

    env_sh = local_cluster_dir() / "env.sh"
    if not env_sh.is_file():
        _slurm_unavailable(f"{env_sh} does not exist")
    values = read_env_sh(env_sh)
    conf = values.get("SLURM_CONF")
    if not conf or not Path(conf).is_file():
        _slurm_unavailable(f"{env_sh} does not name an existing SLURM_CONF")
    for tool in ("sbatch", "sacct", "scontrol", "srun"):
        if shutil.which(tool) is None:
            _slurm_unavailable(f"'{tool}' is not on PATH")

    env = dict(os.environ)
    env.update(values)
    try:
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        _slurm_unavailable("'scontrol ping' timed out")
    if ping.returncode != 0 or "is UP" not in ping.stdout:
        _slurm_unavailable(f"'scontrol ping' says: {(ping.stdout + ping.stderr).strip()!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", conf)
        yield env


@pytest.fixture(scope="session")
def submitit_folder(tmp_path_factory) -> Path:
    """A submitit log folder unique to this test session.

    Never reuse one across sessions: wiping the cluster's state resets job ids to 1, and a reused
    ``<folder>/%j`` would hand back a previous session's results.
    """
    return tmp_path_factory.mktemp("submitit")


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """tokenbench's user-level cache (weights hashes, calibrations) in this session's temporary folder, whatever
    ``TOKENBENCH_CACHE_DIR`` says outside: a test run never writes to a user's cache, nor reads one. Tests that
    need a cache of their own still set one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small test models run fastest on one thread, and tests then share the 2-core machine fairly."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """Ctrl-C is part of what the suite tests: a ``KeyboardInterrupt`` raised in this process, SIGINT sent to the
    run_bench processes it starts. Started with SIGINT ignored (a script's background job without job control,
    ``cmd &``, or ``nohup``), Python raises no ``KeyboardInterrupt`` and its children inherit the ignored signal:
    those tests then failed, or passed when an earlier test had put a handler in place. Put Python's own back."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_teststatus(report, config):
    """A skipped SLURM test is counted as such in the summary line (``12 skipped: no SLURM cluster``)."""
    if report.skipped and "slurm" in report.keywords:
        return SLURM_SKIPPED, "s", ("SKIPPED", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get(SLURM_SKIPPED, [])
    if skipped:
        reason = skipped[0].longrepr[2] if isinstance(skipped[0].longrepr, tuple) else str(skipped[0].longrepr)
        terminalreporter.write_sep("=", f"{len(skipped)} SLURM test(s) did not run", yellow=True)
        terminalreporter.write_line(f"{reason.removeprefix('Skipped: ')}; TOKENBENCH_REQUIRE_SLURM=1 makes them fail")

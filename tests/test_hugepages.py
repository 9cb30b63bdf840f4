"""train.py's re-execution with huge pages for malloc: same PID and arguments, opt-out works."""

import json
import os
import subprocess
import sys

import pytest

from xception_jax.platform import hugepages

SCRIPT = """
import json, os, sys
print("start", os.getpid(), flush=True)
from xception_jax.platform import hugepages
hugepages.reexec_with_hugepages()
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "active": hugepages.active(),
                  "tunables": os.environ.get("GLIBC_TUNABLES")}))
"""


def _run(extra_env):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.pop(hugepages.OPT_OUT_VARIABLE, None)
    env.update(extra_env)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--a", "b c"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    starts = [line for line in out if line.startswith("start")]
    return starts, json.loads(out[-1])


@pytest.mark.skipif(not hugepages.supported(), reason="needs glibc >= 2.35 and THP not 'never'")
def test_reexec_adds_the_tunable_keeps_pid_and_arguments():
    starts, result = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert len(starts) == 2  # the script ran twice: before and after the re-execution
    assert {line.split()[1] for line in starts} == {str(result["pid"])}
    assert result["argv"] == ["--a", "b c"]
    assert result["active"]
    # A tunable the user had set is kept.
    assert result["tunables"] == f"glibc.malloc.arena_max=4:{hugepages.TUNABLE}"


def test_opt_out_and_already_set_do_not_reexec():
    for env in (
        {hugepages.OPT_OUT_VARIABLE: "0"},
        {"GLIBC_TUNABLES": hugepages.TUNABLE},
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's choice stands...
    ):
        starts, result = _run(env)
        assert len(starts) == 1, env
        assert result["tunables"] == env.get("GLIBC_TUNABLES"), env
        # ...and is not reported as huge pages being on.
        assert result["active"] == (env.get("GLIBC_TUNABLES") == hugepages.TUNABLE), env

"""runtime.setup(): the process settings every entry point applies (measured effects, in a fresh process each)."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

# Allocate, write and free a 64 MB buffer ten times; print the page faults of the last nine rounds.
FAULTS = textwrap.dedent("""
    import resource
    from ernie_dpo import runtime  # this checkout's: the process starts in the repository root
    print(runtime._keep_freed_memory())
    for i in range(10):
        if i == 1:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        b = bytearray(64 << 20)  # zero-filled: every page written
        del b
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_memory_is_reused_not_faulted_in_again_and_a_users_malloc_setting_wins():
    kept, faults = _faults({})
    assert kept
    # 9 x 64 MB = 147 456 pages: without the setting each round maps fresh pages (measured ~147 000 faults)
    assert faults < 5_000, faults
    kept, faults = _faults({"MALLOC_ARENA_MAX": "4"})  # any MALLOC_* of the user's: glibc left as it is
    assert not kept
    assert faults > 100_000, faults

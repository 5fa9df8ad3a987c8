"""The CLI's allocator settings: made on glibc, left alone when the operator chose."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minismtp import allocator


def _glibc() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc only")
def test_glibc_takes_the_settings() -> None:
    # In a child process: the settings last for the process, and the test run's is not ours.
    done = subprocess.run(
        [sys.executable, "-c", "from minismtp import allocator; print(allocator.tune({}))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_ARENA_MAX": "2"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
    ],
)
def test_an_operators_own_settings_leave_glibc_alone(environ: dict[str, str]) -> None:
    assert allocator.tune(environ) is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc only")
def test_other_variables_do_not_count() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from minismtp import allocator; print(allocator.tune({'MALLOC': '1', 'PATH': '/'}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "True"

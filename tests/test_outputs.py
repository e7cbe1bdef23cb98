"""What adaptc writes: outputs staged in private temporary files and directories end up with
the permissions of any other new file, and are whole or absent."""
from __future__ import annotations

import os

import pytest

from adaptc.artifact import write_file
from adaptc.cli import main


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_follow_the_umask_not_the_staging_permissions(tmp_path, umask_027):
    out = tmp_path / "dist"
    assert main(["compile", "specs/lora_qv.adapt", "-o", str(out)]) == 0
    assert mode(out) == 0o750  # mkdtemp's staging directory is 0700
    assert mode(out / "spec.adapt") == 0o640 and mode(out / "model") == 0o750
    write_file(tmp_path / "s.adapt", "q_proj: lora\n", force=False)  # import-peft -o
    assert mode(tmp_path / "s.adapt") == 0o640  # NamedTemporaryFile's is 0600

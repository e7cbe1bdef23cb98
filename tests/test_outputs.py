"""What adaptc writes: outputs staged in private temporary files and directories end up with
the permissions of any other new file, and are whole or absent."""
from __future__ import annotations

import os
from pathlib import Path

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
    assert mode(out / "adapters.safetensors") == 0o640  # save_adapters' mkstemp: 0600
    write_file(tmp_path / "s.adapt", "q_proj: lora\n", force=False)  # import-peft -o
    assert mode(tmp_path / "s.adapt") == 0o640  # NamedTemporaryFile's is 0600


def test_force_keeps_the_old_output_when_the_new_one_cannot_be_moved_in(tmp_path, monkeypatch):
    """--force replaces an output whole: the old one is renamed aside, not deleted, until the
    new one is in place (a failing rename used to leave the old one deleted and no output)."""
    import adaptc.artifact
    from adaptc.artifact import atomic_directory
    from adaptc.errors import ArtifactError

    out = tmp_path / "dist"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]

    rename = adaptc.artifact.Path.rename

    def refuse_staging(self, target):
        if self.name.startswith(".dist.tmp-"):
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(adaptc.artifact.Path, "rename", refuse_staging)
    with pytest.raises(ArtifactError, match="dist: cannot write the output: No space left"):
        with atomic_directory(out) as staging:
            (staging / "newer.txt").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]
    assert (out / "new.txt").read_text() == "new" and len(list(out.iterdir())) == 1


def test_sigterm_during_a_write_leaves_no_staging_directory(tmp_path):
    """`kill` while the artifact is being written: exit 143, and neither the output nor its
    staging directory remains (SIGTERM's default action skipped the cleanup)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "serve"
    proc = subprocess.Popen([sys.executable, "-m", "adaptc.cli", "compile", "specs/lora_qv.adapt",
                             "--mode", "infer", "-o", str(out), "--decoder"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".serve.tmp-*")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()
    assert list(tmp_path.iterdir()) == [] and "Traceback" not in proc.stderr.read()


def test_a_signal_inside_an_archive_write_is_raised_when_the_write_ends():
    """The archive writer is C++ calling back into Python: SIGTERM's SystemExit raised there
    aborted the process, so it waits until save_program's write is over."""
    import signal

    from adaptc.export import signals_deferred

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    finished = False
    try:
        with pytest.raises(SystemExit) as exit:
            with signals_deferred():
                signal.raise_signal(signal.SIGTERM)
                finished = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert finished and exit.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is previous

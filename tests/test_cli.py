"""The command line end to end: compile with -o, load the artifact, train, save; errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaptc
import adaptc.errors
from adaptc.cli import main
from helpers import lm_loss, next_token_batch

ROOT = Path(__file__).resolve().parents[1]
CARD = str(ROOT / "specs" / "card.adapt")


def test_compile_artifact_load_train_save(tmp_path, capsys):
    out = tmp_path / "dist"
    assert main(["compile", CARD, "--model", "llama", "--mode", "train", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lora_inserted" not in printed and "mixture_inserted=8" in printed
    assert "adapter_inserted=12" in printed and "trainable params:" in printed
    assert {p.name for p in out.iterdir()} == {"spec.adapt", "model", "adapters.safetensors",
                                                "manifest.json"}
    gm = adaptc.load(out)
    ids = next_token_batch()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = lm_loss(gm, ids) + adaptc.balance_loss(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    adaptc.save_adapters(gm, out / "adapters.safetensors")
    again = adaptc.load(out)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gm.eval(), again.eval()
    assert torch.equal(gm(**x).logits, again(**x).logits)


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compile", "specs/lora_qv.adapt", "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("dump,env", [("out", False), ("out/passes", False), ("out", True)])
def test_dumping_the_passes_into_the_output_is_refused_before_the_work(tmp_path, capsys,
                                                                       monkeypatch, dump, env):
    """It was refused after the work: the dump had made the output non-empty."""
    out = tmp_path / "out"
    if env:
        monkeypatch.setenv("ADAPTC_DUMP", str(tmp_path / dump))
    given = [] if env else ["--dump-passes", str(tmp_path / dump)]
    assert main(["compile", "specs/lora_qv.adapt", "-o", str(out), *given]) == 1
    printed = capsys.readouterr()
    assert f"{out}: the graph dump ({tmp_path / dump}, --dump-passes or ADAPTC_DUMP) writes " \
           "into the output" in printed.err
    assert "compiled" not in printed.out and not out.exists()


def test_force_replaces_the_current_directory_given_as_dot(tmp_path, monkeypatch):
    """`-o .` has no name to stage beside: the staging went inside the output, the rename
    failed with EBUSY after the work, and an empty '..old-*' directory was left behind."""
    out = tmp_path / "here"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    monkeypatch.chdir(out)
    assert main(["compile", str(ROOT / "specs" / "lora_qv.adapt"), "-o", ".", "--force"]) == 0
    assert {p.name for p in out.iterdir()} == {"spec.adapt", "model", "adapters.safetensors",
                                                "manifest.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["here"]


def test_an_output_behind_a_symlink_is_written_where_the_link_points(tmp_path, capsys):
    """`-o LINK` to an (empty or --force) directory renamed the link aside onto a directory
    and failed, 'Is a directory', after the work; a dangling link, 'Not a directory'. The
    link stays and its directory holds the artifact. A spec file's link was replaced by a
    file."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "later")
    for out in ("link", "dangling"):
        assert main(["compile", "specs/lora_qv.adapt", "-o", str(tmp_path / out)]) == 0
        assert "wrote" in capsys.readouterr().out
    for real in ("real", "later"):
        assert {p.name for p in (tmp_path / real).iterdir()} == {
            "spec.adapt", "model", "adapters.safetensors", "manifest.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "later", "link", "real"]
    assert (tmp_path / "link").is_symlink() and (tmp_path / "dangling").is_symlink()
    from adaptc.artifact import write_file  # import-peft -o: the link's file, not the link
    (tmp_path / "s.adapt").symlink_to(tmp_path / "real" / "spec.adapt")
    write_file(tmp_path / "s.adapt", "q_proj: lora\n", force=True)
    assert (tmp_path / "s.adapt").is_symlink()
    assert (tmp_path / "real" / "spec.adapt").read_text() == "q_proj: lora\n"


def test_a_mount_point_as_output_is_refused_before_the_work():
    """`-o /out` on a container's volume: renaming the finished output onto the mount point
    failed, 'Device or resource busy', after the work. `/` is a mount point everywhere."""
    from adaptc.artifact import refuse_existing
    with pytest.raises(adaptc.errors.ArtifactError, match="^/: a mount point, which the finished "
                                                          "output cannot be renamed onto"):
        refuse_existing(Path("/"), force=True)


def test_an_output_whose_parent_is_not_writable_is_refused_before_the_work(tmp_path, capsys,
                                                                           monkeypatch):
    """A writable `-o DIR` in a read-only parent (a directory made for the user): staging
    beside DIR failed after the work. os.access stands in for the permissions (tests may
    run as root, whom they do not stop)."""
    import os
    (tmp_path / "out").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(tmp_path) and access(p, mode))
    assert main(["compile", "specs/lora_qv.adapt", "-o", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr()
    assert printed.err == (f"{tmp_path / 'out'}: {tmp_path} is not writable (the output is "
                           "assembled there and renamed into place)\n")
    assert "compiled" not in printed.out


def test_an_output_that_is_or_holds_an_input_is_refused(tiny, tmp_path, capsys):
    """--force replaced the output directory: `-o` naming the checkpoint (or a directory
    above it, the adapter file or the spec) deleted the input once the artifact was written."""
    base = tmp_path / "base"
    tiny("llama").module.save_pretrained(base)
    spec = tmp_path / "lora.adapt"
    spec.write_text("q_proj: lora r=2\n")
    files = sorted(p.name for p in base.iterdir())
    capsys.readouterr()  # save_pretrained's progress bar
    for out, what in ((base, "is the model checkpoint"), (tmp_path, "contains the model")):
        argv = ["compile", str(spec), "--model", str(base), "-o", str(out), "--force"]
        assert main(argv) == 1
        printed = capsys.readouterr()
        assert printed.err.startswith(f"{out}: the output {what}") and "compiled" not in printed.out
        assert sorted(p.name for p in base.iterdir()) == files and spec.exists()
    assert main(["compile", str(spec), "--model", str(base), "-o", str(tmp_path / "dist")]) == 0
    artifact = tmp_path / "dist"
    capsys.readouterr()
    assert main(["export-peft", str(artifact), str(artifact), "--force"]) == 1
    assert "the output is the artifact" in capsys.readouterr().err
    assert (artifact / "manifest.json").exists()
    peft = tmp_path / "peft"
    assert main(["export-peft", str(artifact), str(peft)]) == 0
    config = (peft / "adapter_config.json").read_text()
    capsys.readouterr()
    assert main(["import-peft", str(peft), "--model", str(base), "-o",
                 str(peft / "adapter_config.json"), "--force"]) == 1
    assert "the output is the PEFT adapter file" in capsys.readouterr().err
    assert (peft / "adapter_config.json").read_text() == config
    holder = tmp_path / "specs"
    holder.mkdir()
    (holder / "s.adapt").write_text("q_proj: lora r=2\n")
    assert main(["compile", str(holder / "s.adapt"), "-o", str(holder), "--force"]) == 1
    assert "contains the spec file" in capsys.readouterr().err
    gm = adaptc.compile(str(base), "q_proj: lora r=2")  # the Python API checks the checkpoint
    with pytest.raises(adaptc.errors.ArtifactError, match="is the model checkpoint"):
        adaptc.write_artifact(gm, adaptc.compiler.as_model(str(base), None), base, force=True)
    assert sorted(p.name for p in base.iterdir()) == files


def test_outputs_that_cannot_be_written_are_errors_not_tracebacks(tmp_path, capsys):
    """A path under a regular file cannot be created (deterministic even as root)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv in (["compile", "specs/lora_qv.adapt", "-o", str(blocker / "out")],
                 ["compile", "specs/lora_qv.adapt", "--mode", "infer", "-o", str(blocker / "out")],
                 ["compile", "specs/lora_qv.adapt", "--dump-passes", str(blocker)]):
        assert main(argv) == 1, argv
        printed = capsys.readouterr()
        err = printed.err
        assert err.startswith(str(blocker)) and "cannot" in err, (argv, err)
        if "-o" in argv:  # refused before compiling, naming the file in the way
            assert f"{blocker} is a file" in err and "compiled" not in printed.out, argv
    from adaptc.artifact import write_file  # import-peft -o
    with pytest.raises(adaptc.errors.ArtifactError, match="s.adapt: cannot write"):
        write_file(blocker / "s.adapt", "q: lora\n", force=False)
    gm = adaptc.compile("llama", "q_proj: lora r=2")
    with pytest.raises(adaptc.errors.WeightsError, match="cannot write adapter weights"):
        adaptc.save_adapters(gm, blocker / "a.safetensors")
    assert blocker.read_text() == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_an_error_naming_the_output(tmp_path, capsys, monkeypatch):
    """Out of space, torch.export.save's writer aborted the process (`terminate called`, exit
    134) and save_pretrained's SafetensorError was a traceback; either is one line naming -o,
    and nothing is left beside it. /dev/full fails every write with ENOSPC."""
    import builtins

    import adaptc.export
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    full = "Error while serializing: I/O error: No space left on device (os error 28)"
    def no_space(*args, **kwargs):
        raise SafetensorError(full)
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", no_space)
        assert main(["compile", "specs/lora_qv.adapt", "-o", str(tmp_path / "train")]) == 1
    assert capsys.readouterr().err == f"{tmp_path / 'train'}: cannot write the output: {full}\n"
    monkeypatch.setattr(adaptc.export, "open", lambda path, mode: builtins.open("/dev/full", mode),
                        raising=False)
    assert main(["compile", "specs/lora_qv.adapt", "--mode", "infer", "-o",
                 str(tmp_path / "infer")]) == 1
    assert capsys.readouterr().err == (f"{tmp_path / 'infer'}: cannot write the output: No space "
                                       "left on device\n")
    assert list(tmp_path.iterdir()) == []


def test_spec_error_exits_1_without_traceback(tmp_path, capsys):
    """In-process (main raises what is not an AdaptcError, which fails the test); the real
    process's exit status and stderr: test_python_dash_m_adaptc_is_the_command."""
    spec = tmp_path / "bad.adapt"
    spec.write_text("q_proj: lora r=8\nv_proj: lora rank=8\n")
    assert main(["compile", str(spec)]) == 1
    err = capsys.readouterr().err
    assert f"{spec}:2:14: error[E202]" in err
    assert "Traceback" not in err and "^^^^" in err


def test_python_dash_m_adaptc_is_the_command(tmp_path):
    """`python -m adaptc` runs the CLI (a venv that is not activated has no `adaptc` on PATH):
    the same exit status and diagnostic as the console script, with no traceback."""
    spec = tmp_path / "bad.adapt"
    spec.write_text("q_proj: lora rank=8\n")
    result = subprocess.run([sys.executable, "-m", "adaptc", "check", str(spec)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and f"{spec}:1:14: error[E202]" in result.stderr
    assert "Traceback" not in result.stderr and "^^^^" in result.stderr


def test_model_time_error_and_unknown_model(tmp_path, capsys):
    """In-process, as test_meta_models_refuse_artifacts_before_work: a spec error's exit
    status and message through `python -m adaptc` are test_python_dash_m_adaptc's."""
    spec = tmp_path / "x.adapt"
    spec.write_text("qproj: lora\n")
    assert main(["compile", str(spec)]) == 1
    err = capsys.readouterr().err
    assert f"{spec}:1:1: error[E301]" in err and "Traceback" not in err
    assert main(["compile", "specs/lora_qv.adapt", "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "Traceback" not in err


def test_inspect_prints_sites_total_and_block(capsys):
    assert main(["inspect", "specs/lora_qv.adapt", "--model", "llama", "--block", "1"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in text
    assert "trainable params: 14,336 || all params: 871,552 || trainable%: 1.6449" in text
    assert "block model.layers.1: original | rewritten" in text
    inserted = [line for line in text.splitlines() if " + " in line]
    assert len(inserted) == 4  # per site: the adapter call and the add
    assert any("+ model_layers_1_self_attn_q_proj_lora = model.layers.1." in line for line in inserted)


def test_check_and_passes(capsys):
    assert main(["check", "specs/card.adapt"]) == 0
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    assert "ok (2 attach statements + mixture)" in text and "insert_lora" in text
    for flag in ("--no-merge", "--fuse-projections"):  # printed the train pipeline
        assert main(["passes", flag]) == 1
        assert "are for --mode infer" in capsys.readouterr().err


def test_check_takes_several_specs_and_reports_each(tmp_path, capsys):
    """`adaptc check specs/*.adapt` (a pre-commit hook): every file is checked, a bad one in
    the middle does not hide the ones after it, and the exit status says one failed."""
    bad = tmp_path / "bad.adapt"
    bad.write_text("q_proj: lora rank=8\n")
    assert main(["check", "specs/lora_qv.adapt", str(bad), "specs/card.adapt"]) == 1
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == [
        "specs/lora_qv.adapt", "specs/card.adapt"]
    assert captured.err.startswith(f"{bad}:1:14: error[E202]")
    assert main(["check", "specs/lora_qv.adapt", "specs/card.adapt"]) == 0


def stdin_bytes(data: bytes):
    import io
    return io.TextIOWrapper(io.BytesIO(data))


def test_spec_from_standard_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", stdin_bytes(b"q_proj: lora r=2\n"))
    assert main(["check", "-"]) == 0
    assert capsys.readouterr().out == "<stdin>: ok (1 attach statement)\n"
    monkeypatch.setattr("sys.stdin", stdin_bytes(b"q_proj: lora r=2\n"))
    assert main(["compile", "-", "-o", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("compiled <stdin> onto llama (LlamaForCausalLM)")
    assert (tmp_path / "out" / "spec.adapt").read_text() == "q_proj: lora r=2\n"
    monkeypatch.setattr("sys.stdin", stdin_bytes(b"q: lora r=x"))
    assert main(["check", "-"]) == 1
    assert capsys.readouterr().err.startswith("<stdin>:1:11: error[E203]")


def test_standard_input_is_read_as_spec_files_are(tmp_path, monkeypatch, capsys):
    """A BOM and CRLF are dropped, a byte that is not UTF-8 is E100 at its line and column
    (text-mode stdin refused the BOM and let the byte through, to a UnicodeEncodeError
    traceback when the artifact's spec.adapt was written). The BOM comes through a real pipe
    (the one subprocess here that reads stdin), the byte in-process."""
    result = subprocess.run([sys.executable, "-m", "adaptc", "check", "-"],
                            input=b"\xef\xbb\xbfq_proj: lora r=2\r\n", capture_output=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout == b"<stdin>: ok (1 attach statement)\n"
    out = tmp_path / "out"
    monkeypatch.setattr("sys.stdin", stdin_bytes(b"q_proj: lora r=2\n# caf\xe9\n"))
    assert main(["compile", "-", "-o", str(out)]) == 1
    assert not out.exists()
    assert capsys.readouterr().err.startswith("<stdin>:2:6: error[E100]: cannot read spec file "
                                              "'<stdin>': it is not UTF-8 text (byte 0xe9)")


def test_unreadable_spec_file_points_at_nothing(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.adapt")]) == 1
    assert capsys.readouterr().err == (f"{tmp_path / 'nope.adapt'}: error[E100]: cannot read "
                                       f"spec file '{tmp_path / 'nope.adapt'}': No such file or "
                                       "directory\n")


def test_spec_file_with_any_extension(tmp_path, capsys):
    spec = tmp_path / "qv.spec"
    spec.write_text("q_proj: lora r=2\n")
    assert main(["compile", str(spec)]) == 0
    assert "lora_inserted=4" in capsys.readouterr().out


def test_meta_models_refuse_artifacts_before_work(tmp_path, capsys):
    """In-process (main raises what is not an AdaptcError, which fails the test), not two
    `python -m adaptc.cli` runs: the subprocess path is covered by the tests above."""
    for mode in ("train", "infer"):
        assert main(["compile", "specs/lora_qv.adapt", "--model", "llama-7b", "--mode", mode,
                     "-o", str(tmp_path / mode)]) == 1
        err = capsys.readouterr().err
        assert "on the meta device" in err
        assert "Traceback" not in err and not (tmp_path / mode).exists()


def test_inspect_block_without_adapters_says_so(capsys, tmp_path):
    spec = tmp_path / "first.adapt"
    spec.write_text("q_proj[0]: lora r=2\n")
    assert main(["inspect", str(spec), "--block", "1"]) == 0
    assert "block 1: no adapted module in this layer" in capsys.readouterr().out
    assert main(["inspect", str(spec), "--block", "-4"]) == 0  # the preset's 4 layers
    assert "block model.layers.0: original | rewritten" in capsys.readouterr().out


@pytest.mark.parametrize("block", [1, "model.layers.1"])
def test_inspect_shows_a_block_that_is_itself_the_adapted_module(block):
    """An adapter on the whole layer: its path is the block's own, not one below it (the path
    form refused it, listing model.layers.1 among the blocks with an adapted module)."""
    text = adaptc.inspect("llama", "model.layers.*: adapter bottleneck=4", block=block)
    assert "block model.layers.1: original | rewritten" in text
    assert "+ model_layers_1_adapter" in text


def test_inspect_block_out_of_range_names_the_layers(capsys):
    assert main(["inspect", "specs/lora_qv.adapt", "--block", "99"]) == 1
    assert "block 99 is out of range: llama has 4 layers (0..3" in capsys.readouterr().err


def test_dtype_and_device_place_the_model(tiny, tmp_path, capsys):
    """--dtype reads the checkpoint in that dtype (the exported program and hf/ are bf16);
    a device that is not there, or a bad spec, fail before any work."""
    from safetensors import safe_open
    tiny("llama").module.save_pretrained(tmp_path / "base")
    base, out = str(tmp_path / "base"), tmp_path / "serve"
    assert main(["compile", "specs/lora_qv.adapt", "--model", base, "--mode", "infer",
                 "--dtype", "bfloat16", "-o", str(out)]) == 0
    ids = torch.randint(0, 100, (2, 5))
    logits = adaptc.load_program(out).module()(input_ids=ids,
                                               attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.bfloat16
    with safe_open(str(out / "hf" / "model.safetensors"), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(["compile", "specs/lora_qv.adapt", "--device", "cuda"]) == 1
        assert "device 'cuda': no CUDA device on this machine" in capsys.readouterr().err
    assert main(["compile", "specs/lora_qv.adapt", "--device", "floppy"]) == 1
    assert "unknown device 'floppy'" in capsys.readouterr().err
    assert main(["generate", "specs/lora_qv.adapt", "--model", "llama-7b", "--device", "cpu",
                 "--prompt", "1 2"]) == 1
    assert "meta device (shapes only): it has no weights to move" in capsys.readouterr().err
    bad = tmp_path / "bad.adapt"
    bad.write_text("q_proj: lora r=0\n")
    assert main(["compile", str(bad), "--model", str(tmp_path / "missing")]) == 1
    assert "error[E204]" in capsys.readouterr().err  # the spec, not the missing model


@pytest.fixture(scope="module")
def lora_qv_artifact(tmp_path_factory) -> Path:
    """`compile specs/lora_qv.adapt --mode train -o DIR` once, for the tests that only read it."""
    out = tmp_path_factory.mktemp("lora_qv") / "run"
    assert main(["compile", "specs/lora_qv.adapt", "--mode", "train", "-o", str(out)]) == 0
    return out


def test_load_places_the_artifact_model(lora_qv_artifact):
    out = lora_qv_artifact
    gm = adaptc.load(out, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in gm.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in gm.parameters() if p.requires_grad} == {torch.float32}  # as PEFT's
    ids = next_token_batch()
    assert gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.dtype == torch.bfloat16
    with pytest.raises(adaptc.ModelError, match="unknown dtype 'bf16'"):
        adaptc.load(out, dtype="bf16")


@pytest.mark.parametrize("argv", [
    ["compile", "specs/lora_qv.adapt", "--mode", "infer", "--adapters", "", "-o", "{out}"],
    ["compile", "specs/lora_qv.adapt", "-o", ""],
    ["compile", "specs/lora_qv.adapt", "--model", "", "-o", "{out}"],
    ["export-peft", "dist", ""],
    ["check", ""],
])
def test_empty_paths_are_argument_errors(argv, tmp_path, capsys):
    """`--adapters ''` compiled the initial weights into the artifact, `-o ''` wrote nothing,
    `--model ''` read the current directory: each is exit 2 naming the argument."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main([arg.format(out=out) for arg in argv])
    assert exited.value.code == 2
    assert ": an empty path" in capsys.readouterr().err.splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["inspect", "specs/lora_qv.adapt", "--model", "llama", "--mode", "infer"],
    ["generate", "specs/lora_qv.adapt", "--mode", "infer", "--prompt", "5"],
])
def test_option_prefixes_are_not_abbreviations(argv, capsys):
    """`inspect` has no --mode: argparse read `--mode infer` as `--model infer` and the error
    was "unknown model 'infer'"; now the option itself is named."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "adaptc: error: unrecognized arguments: --mode infer")


def test_negative_max_new_tokens_names_the_flag(capsys):
    """The library's 'max_new_tokens must be >= 0' named a Python argument; the CLI names its
    flag, before any model loads."""
    with pytest.raises(SystemExit) as exited:
        main(["generate", "specs/lora_qv.adapt", "--prompt", "5", "--max-new-tokens", "-1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "adaptc generate: error: argument --max-new-tokens: must be >= 0, got -1")


def test_a_train_artifact_given_as_adapter_file_names_its_weights(lora_qv_artifact, tmp_path,
                                                                  capsys):
    """`--adapters DIR` with a train artifact's directory: the error names the file in it
    to pass, and nothing is written."""
    art = lora_qv_artifact
    out = tmp_path / "serve"
    assert main(["compile", "specs/lora_qv.adapt", "--mode", "infer", "--adapters", str(art),
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{art}: is a directory, not an adapter weights file" in err
    assert f"it holds a train artifact's weights: pass {art / 'adapters.safetensors'}" in err
    assert not out.exists()


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    """`adaptc passes | head -1`: the write to the closed pipe was a BrokenPipeError
    traceback (and exit 1); now nothing on stderr and 141, as a tool killed by SIGPIPE."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes
    try:
        result = subprocess.run([sys.executable, "-m", "adaptc", "passes"], stdout=write,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


def test_inspect_block_may_name_the_adapted_module_itself(capsys, tmp_path):
    """A prompt adapts the word embedding, which no layer holds: `--block 0` says so, and
    `--block model.embed_tokens` was refused as having 'no adapted module inside it' (as was
    `--block model.layers.0.self_attn.q_proj` for LoRA on it, and `--block classifier` for
    `classifier: train`), so the prompt's graph could not be shown at all."""
    assert main(["inspect", "specs/prompt.adapt", "--block", "model.embed_tokens"]) == 0
    text = capsys.readouterr().out
    assert "block model.embed_tokens: original | rewritten" in text
    assert "+ model_embed_tokens_prompt = model.embed_tokens.prompt(embedding)" in text
    assert main(["inspect", "specs/lora_qv.adapt", "--block",
                 "model.layers.0.self_attn.q_proj"]) == 0
    text = capsys.readouterr().out.split("original | rewritten")[1]
    assert "+ model_layers_0_self_attn_q_proj_lora" in text and "v_proj" not in text
    spec = tmp_path / "s.adapt"
    spec.write_text("attn.q: lora r=4\nlm_head: train\n")
    assert main(["inspect", str(spec), "--block", "lm_head"]) == 0
    assert "block lm_head: original | rewritten" in capsys.readouterr().out
    assert main(["inspect", "specs/prompt.adapt", "--block", "model.layers.0"]) == 1
    assert capsys.readouterr().err == ("block 'model.layers.0': no adapted module inside it "
                                       "(blocks with one: model.embed_tokens)\n")


def test_inspect_block_naming_a_container_is_an_error(capsys):
    """`--block model.layers` (a ModuleList: no op of the graph runs in it) printed the table
    and an empty listing under 'block model.layers: original | rewritten', exit 0."""
    assert main(["inspect", "specs/lora_qv.adapt", "--block", "model.layers"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err == ("block 'model.layers': no operation of the traced graph runs inside "
                           "it (a container such as a ModuleList runs none itself); blocks with "
                           "one: model.layers.0, model.layers.1, model.layers.2, "
                           "model.layers.3\n")


def test_cuda_graph_under_a_gated_spec_says_why(capsys):
    """UniPELT on the llama preset (a causal LM) with --cuda-graph was refused with '--cuda-graph
    is for causal LMs; this model is an encoder-decoder', after loading the model."""
    assert main(["generate", "specs/unipelt.adapt", "--prompt", "5 17", "--cuda-graph"]) == 1
    assert capsys.readouterr().err == (
        "--cuda-graph is for causal LMs' cached decoding; a gated spec decodes without a KV "
        "cache (the whole sequence at each step), so there is no one-token step to replay\n")
    assert main(["generate", "specs/lora_qv.adapt", "--model", "t5", "--prompt", "5",
                 "--cuda-graph"]) == 1
    assert capsys.readouterr().err == ("--cuda-graph is for causal LMs' cached decoding; this "
                                       "model is an encoder-decoder\n")


def test_check_refuses_standard_input_twice(monkeypatch, capsys):
    """`check - -` read the spec for the first '-' and nothing for the second, which failed as
    'the spec has no statements' (exit 1) though the spec was fine."""
    monkeypatch.setattr("sys.stdin", stdin_bytes(b"q: lora\n"))
    with pytest.raises(SystemExit) as exited:
        main(["check", "-", "specs/card.adapt", "-"])
    result = capsys.readouterr()
    assert (exited.value.code, result.out) == (2, "")
    assert result.err.splitlines()[-1] == ("adaptc check: error: argument spec: '-' "
                                           "(standard input) is given 2 times; it can be "
                                           "read once")


def test_inspect_names_a_loramoe_mixture(capsys):
    """LoRAMoE's sites were listed as `moe[6]`, the other mixture kind's name."""
    assert main(["inspect", "specs/loramoe.adapt"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("model.layers.")]
    assert rows and {row[1] for row in rows} == {"loramoe[6]"}
    assert main(["inspect", "specs/card.adapt"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("model.layers.") and "self_attn" in line]
    assert rows and {row[1] for row in rows} == {"moe[4]"}


def test_no_hf_checkpoint_reason_does_not_say_only_lora_merges(tmp_path, capsys):
    """The reason printed and stored in report.json said '(only merged LoRA fits a
    checkpoint)', beside a merged IA3 that would have fit; README: merged updates and trained
    parameters fit."""
    import json

    spec = tmp_path / "s.adapt"
    spec.write_text("attn.q: ia3\nffn: adapter bottleneck=4\n")
    out = tmp_path / "serve"
    assert main(["compile", str(spec), "--mode", "infer", "-o", str(out)]) == 0
    why = ("4 adapters run as fused ops (a checkpoint holds only merged updates and trained "
           "parameters)")
    assert f"no hf/ checkpoint: {why}\n" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["hf_skipped"] == why


def test_export_peft_refuses_an_unknown_task_type_before_loading(tmp_path, capsys, monkeypatch):
    """An unknown --task-type was refused only after the artifact had been loaded (its spec
    recompiled onto its model: minutes for a large one)."""
    import adaptc.artifact

    def no_load(*args, **kwargs):
        raise AssertionError("the artifact was loaded")

    monkeypatch.setattr(adaptc.artifact, "load", no_load)
    assert main(["export-peft", str(tmp_path / "dist"), str(tmp_path / "peft"),
                 "--task-type", "causal_lm"]) == 1
    assert capsys.readouterr().err == (
        "unknown PEFT task type 'causal_lm': PEFT reads only SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, "
        "TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION\n")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("command", [["compile", "specs/lora_qv.adapt", "--mode", "infer", "-o",
                                      "OUT", "--decoder"],
                                     ["generate", "specs/lora_qv.adapt", "--prompt", "5"]])
def test_a_cache_too_short_is_an_argument_error(tmp_path, capsys, command):
    """--max-cache-len 0 was refused as 'max_cache_len must be at least 2' (exit 1) once the
    model had loaded; `compile -o --decoder` first built and checked the whole infer graph.
    In-process: argparse's exit is a SystemExit with its status."""
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--max-cache-len", "1"])
    result = capsys.readouterr()
    assert (exited.value.code, result.out) == (2, "")
    assert result.err.splitlines()[-1] == (f"adaptc {command[0]}: error: argument "
                                              "--max-cache-len: must be >= 2 (a prompt token "
                                              "and a new one), got 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["compile", "specs/lora_qv.adapt", "--mode", "infer"],
                                     ["generate", "specs/lora_qv.adapt", "--prompt", "5"]])
def test_adapters_that_cannot_be_read_are_refused_before_the_model_loads(tmp_path, capsys,
                                                                         monkeypatch, command):
    """A missing --adapters file was found after the model had loaded and (compile -o) the
    train-mode graph had been built: minutes for a large checkpoint."""
    import adaptc.cli

    def no_model(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(adaptc.cli, "placed_model", no_model)
    missing = tmp_path / "a.safetensors"
    assert main([*command, "--adapters", str(missing)]) == 1
    assert capsys.readouterr().err == (f"{missing}: cannot read adapter weights: No such file "
                                       f"or directory: {missing}\n")
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    assert main([*command, "--adapters", str(tmp_path / "junk.safetensors")]) == 1
    assert "junk.safetensors: cannot read adapter weights: " in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["-o", "--weights"])
def test_import_peft_refuses_a_directory_as_output_before_the_work(tmp_path, capsys,
                                                                    monkeypatch, flag):
    """`import-peft DIR -o existing-dir --force` imported the adapter, printed the spec and
    then failed with 'cannot write: Is a directory' (exit 1 after a success's output)."""
    import adaptc.peft_interop

    def no_import(*args, **kwargs):
        raise AssertionError("the adapter was imported")

    monkeypatch.setattr(adaptc.peft_interop, "import_peft", no_import)
    monkeypatch.setattr(adaptc.peft_interop, "spec_from_peft", no_import)
    (tmp_path / "out").mkdir()
    assert main(["import-peft", str(tmp_path / "peft"), flag, str(tmp_path / "out"),
                 "--force"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err == f"{tmp_path / 'out'}: is a directory; -o and --weights write files\n"


def test_generate_reports_a_missing_spec_before_the_tokenizer(tmp_path, capsys):
    """`generate typo.adapt --text ...` (default model llama) said '--text needs a checkpoint
    directory with a tokenizer; 'llama' is a preset without one', not that the spec is missing."""
    missing = tmp_path / "typo.adapt"
    assert main(["generate", str(missing), "--text", "hello"]) == 1
    assert capsys.readouterr().err == (f"{missing}: error[E100]: cannot read spec file "
                                       f"'{missing}': No such file or directory\n")


def test_decoder_for_a_model_without_a_language_model_head_is_refused_before_the_work(
        tmp_path, capsys, monkeypatch):
    """`compile --model bert --mode infer -o DIR --decoder` built the train-mode reference and
    the infer graph before the decoder compiler said BERT has no next token to pick."""
    import adaptc.cli

    def no_work(*args, **kwargs):
        raise AssertionError("the graphs were built")

    monkeypatch.setattr(adaptc.cli, "train_reference", no_work)
    assert main(["compile", "specs/lora_qv.adapt", "--model", "bert", "--mode", "infer", "-o",
                 str(tmp_path / "out"), "--decoder"]) == 1
    assert capsys.readouterr().err == ("BertModel is not a causal language model; decoding "
                                       "needs one\n")
    assert not (tmp_path / "out").exists()


def test_decoder_under_a_gated_spec_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """UniPELT with --decoder: the train reference and the infer graph were built before the
    decoder compiler refused the gate."""
    import adaptc.cli

    def no_work(*args, **kwargs):
        raise AssertionError("the graphs were built")

    monkeypatch.setattr(adaptc.cli, "train_reference", no_work)
    assert main(["compile", "specs/unipelt.adapt", "--mode", "infer", "-o",
                 str(tmp_path / "out"), "--decoder"]) == 1
    assert capsys.readouterr().err.startswith("cached decoding cannot run gated adapter, lora, "
                                              "prefix (UniPELT): a gate averages")
    assert not (tmp_path / "out").exists()

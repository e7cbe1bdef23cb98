"""Infer mode: merged LoRA equals unmerged, fused adapters equal train mode, nothing of the
user's is modified, and the exported program and HF checkpoint reload to the same outputs."""
from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, inputs, main_output, randomize_adapters, save_word_tokenizer
from peft import LoraConfig, get_peft_model
from test_lora_parity import TARGETS, randomize_and_copy

import adaptc
from adaptc.cli import main
from adaptc.errors import ArtifactError
from adaptc.frontend.models import wrap
from adaptc.frontend.trace import trace
from adaptc.passes.accumulate_updates import AccumulateUpdates
from adaptc.passes.bind_ops import bind_ops

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


def trained(model, spec: str, path, seed: int = 0):
    """A train-mode graph whose adapters all have random non-zero weights, saved to `path`."""
    gm = adaptc.compile(model, spec)
    randomize_adapters(gm, 0.1, seed)
    adaptc.save_adapters(gm, path)
    return gm.eval()


def ops(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def fused_ops(gm) -> Counter:
    return Counter(n.target.name() for n in gm.graph.nodes if n.op == "call_function"
                   and getattr(n.target, "namespace", None) == "adaptc")


def max_diff(a, b) -> float:
    return (main_output(a).float() - main_output(b).float()).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged(tiny, tmp_path, family):
    model = tiny(family)
    spec = f"{','.join(TARGETS[family])}: lora r=4 alpha=12"
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    x = inputs(segments=family == "bert")
    assert max_diff(infer(**x), train(**x)) <= TOL
    assert max_diff(infer(**x), model.module(**x)) > 1e-3  # the adapters act
    counts = adaptc.report_of(infer).counts
    assert counts["lora_merged"] == counts["lora_inserted"] > 0
    base = trace(tiny(family))
    AccumulateUpdates().run(base, None)  # as infer graphs add o, down into the residual stream
    bind_ops(base)  # as the infer pipeline's last pass binds the infer graph's ops
    assert ops(infer) == ops(base)  # exactly the operations adaptc runs for the base model
    assert not [n for n in infer.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    assert not any(p.requires_grad for p in infer.parameters())
    folded = adaptc.report_of(infer).counts["prompts_folded"]
    assert folded == (1 if "projection" in spec or "ptuning" in spec else 0)


def test_bf16_merge_no_worse_than_peft(tiny, tmp_path):
    """Merge error = merged weight − exact W₀ + s·B·A (float32). Ours is that sum rounded once
    to bf16, so elementwise no farther from it than PEFT's merge_and_unload of the same bf16
    adapters (which rounds s·B·A to bf16 first, then the sum). On logits the comparison is
    printed, not asserted: on a 2-layer model the bf16 forward's own rounding noise decides
    which max error is larger."""
    model = tiny("llama")
    model.module.to(torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spec = f"{','.join(targets)}: lora r=8 alpha=16"
    train = adaptc.compile(model, spec).eval()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    twin = get_peft_model(copy.deepcopy(model.module), config, autocast_adapter_dtype=False).eval()
    randomize_and_copy(train, twin)
    with torch.no_grad():  # the same bf16 values in both (ours train as float32)
        for tensor in adaptc.adapter_state_dict(train).values():
            tensor.copy_(tensor.to(torch.bfloat16))
    adaptc.save_adapters(train, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    x = inputs()
    with torch.no_grad():
        ours_logits = max_diff(infer(**x), train(**x))
        unmerged = twin(**x)
        merged = twin.merge_and_unload()
        theirs_logits = max_diff(merged(**x), unmerged)
    better = 0
    for path, lora in adaptc.adapters.adapter_modules(train).items():
        name = f"{path.rpartition('.')[0]}.weight"
        exact = model.module.get_parameter(name).float() + lora.delta_weight()
        ours, theirs = infer.get_parameter(name), merged.get_parameter(name)
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, exact.to(torch.bfloat16))
        ours_error, theirs_error = (ours.float() - exact).abs(), (theirs.float() - exact).abs()
        assert (ours_error <= theirs_error).all(), name
        better += (ours_error < theirs_error).sum().item()
    assert better > 0
    print(f"bf16 merged vs unmerged, max abs logits: adaptc {ours_logits:.4g}, PEFT {theirs_logits:.4g};"
          f" {better} merged weights closer to exact than PEFT's, none farther")


def test_user_model_and_train_graph_unchanged(tiny, tmp_path):
    model = tiny("gpt2")
    spec = "attn.qkv,ffn.up,lm_head: lora r=4 alpha=8"  # lm_head: tied to the embeddings
    train = trained(model, spec, tmp_path / "a.safetensors")
    before_user = {k: v.clone() for k, v in model.module.state_dict().items()}
    before_train = {k: v.clone() for k, v in train.state_dict().items()}
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    after_user, after_train = model.module.state_dict(), train.state_dict()
    assert before_user.keys() == after_user.keys() and before_train.keys() == after_train.keys()
    assert all(torch.equal(before_user[k], after_user[k]) for k in before_user)
    assert all(torch.equal(before_train[k], after_train[k]) for k in before_train)
    assert all(p.requires_grad for p in adaptc.adapter_state_dict(train).values())
    merged = infer.meta["adaptc.merged"]
    assert merged["lm_head.weight"] == "lm_head.merged_weight"  # tied: a new name
    assert merged["transformer.h.0.attn.c_attn.weight"] == "transformer.h.0.attn.c_attn.weight"
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= TOL


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_compiling_leaves_the_user_models_requires_grad(tiny, mode):
    """Freezing the base gives the graph frozen aliases of the user's tensors (same storage,
    tied weights still one tensor); it switched off requires_grad in the user's model."""
    model = tiny("gpt2")
    gm = adaptc.compile(model, "attn.qkv: lora r=4", mode)
    assert all(p.requires_grad for p in model.module.parameters())
    wte = gm.get_parameter("transformer.wte.weight")
    assert not wte.requires_grad and wte.data_ptr() == model.module.transformer.wte.weight.data_ptr()
    assert gm.get_parameter("lm_head.weight") is wte
    assert any(p.requires_grad for p in gm.parameters()) == (mode == "train")


MERGED_AND_FUSED = "q_proj: lora r=4; q_proj,mlp: adapter bottleneck=8 placement=parallel activation=silu"
CASES = [("llama", "specs/card.adapt"), ("gpt2", "specs/houlsby.adapt"), ("llama", MERGED_AND_FUSED),
         ("llama", "specs/mov.adapt"), ("gpt2", "attn.c_attn: ia3; mlp.c_proj: ia3 feedforward\n"
                                                 "mixture moe k=2 experts=3")]


@pytest.mark.parametrize("family,spec", CASES)
def test_fused_equals_train(tiny, tmp_path, family, spec):
    spec = str(ROOT / spec) if spec.endswith(".adapt") else spec
    model = tiny(family)
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= TOL
    assert max_diff(infer(**x), model.module(**x)) > 1e-3
    counts = adaptc.report_of(infer).counts
    fused = fused_ops(infer)
    assert fused["adaptc::bottleneck_adapter"] == counts["adapter_fused"]
    assert fused["adaptc::mixture_lora"] + fused["adaptc::mixture_vectors"] == counts["mixture_fused"]
    assert counts["adapter_fused"] == counts["adapter_inserted"]
    assert counts["mixture_fused"] == counts["mixture_inserted"]
    assert sum(fused.values()) > 0


@pytest.mark.parametrize("spec", ["attn.q: lora r=2; mixture moe k=2 experts=65",
                                  "attn.k: ia3; mixture moe k=2 experts=65"])
def test_mixtures_beyond_the_kernels_limits_stay_eager(tiny, tmp_path, spec):
    """The mixture kernels route at most 64 experts: a wider mixture (valid in train mode)
    stays an eager module; fused, its op refused every call (CPU reference included) with
    "`A` holds 65 experts; the router kernel supports 1..64"."""
    model = tiny("llama")
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= TOL
    counts = adaptc.report_of(infer).counts
    assert counts["mixture_fused"] == 0 and counts["kept_eager"] == counts["mixture_inserted"] == 2
    assert not fused_ops(infer)


@pytest.mark.parametrize("spec,merged", [("attn.q,attn.v,ffn.down: lora r=4 alpha=8", True),
                                         ("specs/card.adapt", False)])
def test_export_round_trip(tiny, tmp_path, spec, merged):
    from transformers import AutoModelForCausalLM

    spec = str(ROOT / spec) if spec.endswith(".adapt") else spec
    model = tiny("llama")
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    out = tmp_path / "dist"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    adaptc.write_infer_artifact(infer, model, out, reference=train, force=True)
    assert not (out / "stale.txt").exists()
    x = inputs(seq=9)
    expected = main_output(infer(**x))
    program = adaptc.load_program(out / "program.pt2")
    assert torch.equal(main_output(program.module()(**x)), expected)
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["max_abs_error"] <= TOL
    assert (out / "hf").is_dir() == merged and (report["hf"] == "hf") == merged
    if merged:
        hf = AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True).eval()
        assert (main_output(hf(**x)) - expected).abs().max().item() <= 1e-6
    else:
        assert "fused ops" in report["hf_skipped"]
    assert torch.equal(main_output(adaptc.load_program(out).module()(**x)), expected)  # the dir
    with pytest.raises(ArtifactError, match="an infer artifact .* adaptc.load_program"):
        adaptc.load(out)


def test_bad_program_files_are_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match=r"nope.pt2: no such program file$"):
        adaptc.load_program(tmp_path / "nope.pt2")  # decoding/'s decoder.pt2: no program.pt2 hint
    with pytest.raises(ArtifactError, match=r"program.pt2: no such program file \(an infer"):
        adaptc.load_program(tmp_path)
    (tmp_path / "program.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(ArtifactError, match="program.pt2: cannot load the exported program"):
        adaptc.load_program(tmp_path)


HF_CASES = ["q_proj,v_proj: lora r=4 init=pissa", "q_proj,v_proj: lora r=4 dora",
            "k_proj,v_proj: ia3\ndown_proj: ia3 feedforward", "*norm*: train\nq_proj: lora r=4",
            "*_proj: quantize\n*_proj: lora r=4"]


@pytest.mark.parametrize("spec", HF_CASES)
def test_hf_export_holds_every_merged_or_trained_tensor(tiny, tmp_path, spec):
    """hf/ is the adapted model, not the base: PiSSA residuals, DoRA and IA3 folds, trained
    norms and QLoRA's dequantised merge all reach the checkpoint. Written as
    write_infer_artifact writes hf/ (without exporting the program, which
    test_export_round_trip checks along with the hf/ of a whole artifact)."""
    from transformers import AutoModelForCausalLM

    from adaptc.export import hf_blocker, write_hf

    model = tiny("llama")
    trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    assert hf_blocker(infer, model) is None
    write_hf(infer, model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    x = inputs()
    expected = main_output(infer(**x))
    assert (main_output(hf.eval()(**x)) - expected).abs().max().item() <= 1e-6
    assert (main_output(model.module(**x)) - expected).abs().max().item() > 1e-3


def test_hf_export_of_a_trained_tied_embedding(tiny, tmp_path):
    """GPT-2's wte is also its lm_head: `embed: train` redirects both reads to the trained
    copy, so the checkpoint holds it once, tied, and loads equal to the infer module (the
    export was skipped as 'tied'); LoRA on lm_head alone still cannot be one checkpoint."""
    from transformers import AutoModelForCausalLM

    model = tiny("gpt2")
    for spec, exported in [("embed: train\nattn.qkv: lora r=2", True),
                           ("lm_head: lora r=2", False)]:
        folder = tmp_path / spec.split(":")[0]
        train = trained(model, spec, folder / "a.safetensors")
        infer = adaptc.compile(model, spec, "infer", adapters=folder / "a.safetensors")
        adaptc.write_infer_artifact(infer, model, folder / "dist", reference=train)
        report = json.loads((folder / "dist" / "report.json").read_text())
        assert (folder / "dist" / "hf").is_dir() == exported
        if not exported:
            assert report["hf_skipped"] == ("merged weight 'lm_head.weight' is tied to "
                                            "transformer.wte.weight")
            continue
        hf = AutoModelForCausalLM.from_pretrained(folder / "dist" / "hf", local_files_only=True)
        assert hf.lm_head.weight is hf.transformer.wte.weight
        x = inputs(vocab=hf.config.vocab_size)
        expected = main_output(infer(**x))
        assert (main_output(hf.eval()(**x)) - expected).abs().max().item() <= 1e-6
        assert (main_output(model.module(**x)) - expected).abs().max().item() > 1e-3


def assert_no_hf_export(out: Path, method: str) -> None:
    """`out` holds no hf/ checkpoint: `method`'s adapters compute outside the weights."""
    report = json.loads((out / "report.json").read_text())
    assert not (out / "hf").exists() and report["hf"] is None
    assert report["hf_skipped"].startswith(f"{method} not folded into the base weights")


def test_no_hf_export_while_gated_lora_computes_outside_the_weights(tiny, tmp_path):
    """Prefix and prompt tuning are checked on the artifacts of the two tests below."""
    model = tiny("llama")
    spec = "attn.q: lora r=4 gate"
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    adaptc.write_infer_artifact(infer, model, tmp_path / "dist", reference=train)
    assert_no_hf_export(tmp_path / "dist", "lora")


def test_existing_output_refused_without_force(tmp_path, capsys):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compile", str(ROOT / "specs/lora_qv.adapt"), "--mode", "infer",
                 "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["compile", str(ROOT / "specs/lora_qv.adapt"), "--adapters", "a.safetensors"]) == 1
    assert "--mode infer" in capsys.readouterr().err


def test_infer_graph_runs_under_torch_compile(tiny):
    """The fused custom ops keep the graph compilable: inductor output equals eager."""
    model = tiny("llama")
    gm = adaptc.compile(model, "q_proj: lora r=2; mixture moe k=2 experts=3\n"
                               "ffn: adapter bottleneck=8", mode="infer")
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    compiled = torch.compile(gm, backend="inductor", dynamic=False)
    assert (compiled(**x).logits - gm(**x).logits).abs().max().item() <= 1e-5


def test_tokenizer_files_travel_to_the_hf_export(tiny, tmp_path):
    """A checkpoint directory with a tokenizer gives an hf/ export that has it too, and a
    train artifact's model/ (which had none: an infer artifact compiled from it could not
    encode `--text`), chat templates included (transformers 5 saves them in files of their own)."""
    from transformers import AutoTokenizer

    checkpoint = tmp_path / "ckpt"
    tiny("llama").module.save_pretrained(checkpoint)
    save_word_tokenizer(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    tokenizer.chat_template = {"default": "{{ messages[0].content }}!",  # chat_template.jinja
                               "tool_use": "{{ messages[0].content }}?"}  # its own directory
    tokenizer.save_pretrained(checkpoint)
    assert main(["compile", str(ROOT / "specs/lora_qv.adapt"), "--model", str(checkpoint),
                 "--mode", "infer", "-o", str(tmp_path / "dist")]) == 0
    assert main(["compile", str(ROOT / "specs/lora_qv.adapt"), "--model", str(checkpoint),
                 "-o", str(tmp_path / "train")]) == 0
    for saved in (tmp_path / "dist" / "hf", tmp_path / "train" / "model"):
        tokenizer = AutoTokenizer.from_pretrained(saved, local_files_only=True)
        assert tokenizer("w3 w7 nope")["input_ids"] == [4, 8, 0]
        chat = [{"role": "user", "content": "w3"}]
        assert tokenizer.apply_chat_template(chat, tokenize=False) == "w3!"  # was: no template
        assert tokenizer.apply_chat_template(chat, chat_template="tool_use",
                                             tokenize=False) == "w3?"


@pytest.mark.parametrize("spec", [
    "attn: prefix tokens=4 projection=16; ffn: adapter placement=parallel bottleneck=8 scale=4",
    "attn.q,attn.v: lora r=4 gate; attn: prefix tokens=4 gate; ffn: adapter bottleneck=8 gate",
    "embed: prompt tokens=3; q_proj: lora r=2",
    "embed: ptuning tokens=3 encoder=lstm",
])
def test_mam_unipelt_prompt_in_infer_mode_equal_train(tiny, tmp_path, spec):
    """Scaled and gated adapters run as the fused op (its scale and gate), gated LoRA stays
    unmerged, prefix MLPs and prompt encoders fold into constants: infer equals train."""
    model = tiny("llama")
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    x = inputs()
    train.eval()
    assert (main_output(infer(**x)) - main_output(train(**x))).abs().max().item() <= TOL
    assert not any(p.requires_grad for p in infer.parameters())


@pytest.mark.parametrize("merge", [True, False])
def test_infer_mode_applies_no_dropout(tiny, tmp_path, merge):
    """Adapter dropout is for training: an infer graph is in eval mode, where unmerged VeRA
    and DoRA run as eager modules, and P-tuning v2's prefixes are read as they are."""
    spec = ("q_proj: vera r=16 dropout=0.5; v_proj: lora r=2 dora dropout=0.5; "
            "attn: ptuning2 tokens=3 dropout=0.5")
    model = tiny("llama")
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors",
                           merge=merge)
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= TOL
    assert not infer.training


def test_prompt_infer_graph_exports_with_automatic_dims(tiny, tmp_path):
    """Prompt tuning's graph has a shape guard torch cannot prove over the named ranges; the
    export falls back to Dim.AUTO and the program still takes other batch and sequence sizes.
    No hf/ (the prompt is not in the weights); the report records the CLI's defaults."""
    spec = tmp_path / "p.adapt"
    spec.write_text("embed: prompt tokens=3\n")
    tiny("llama").module.save_pretrained(tmp_path / "ckpt")  # half the preset's layers
    out = tmp_path / "dist"
    assert main(["compile", str(spec), "--model", str(tmp_path / "ckpt"), "--mode", "infer",
                 "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["max_abs_error"] <= TOL
    assert_no_hf_export(out, "prompt")
    recorded = report["compile"]
    assert recorded["adapters"] is None  # the initial weights: no file of the user's
    assert (recorded["merge"], recorded["fuse_projections"]) == (True, False)
    assert (recorded["dtype"], recorded["device"]) == ("float32", "cpu")
    program = adaptc.load_program(out / "program.pt2").module()
    x = inputs(batch=4, seq=13)
    assert main_output(program(**x)).shape == (4, 13, 512)


def test_exported_prefix_program_holds_constants_not_the_mlp(tiny, tmp_path):
    """Infer export of prefix tuning with its reparameterisation MLP: the program carries the
    folded prefixes (no MLP weights) and equals the train-mode graph it came from; no hf/."""
    model = tiny("llama")
    spec = "attn: prefix tokens=4 projection=16"
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    adaptc.write_infer_artifact(infer, model, tmp_path / "dist", reference=train)
    assert_no_hf_export(tmp_path / "dist", "prefix")
    program = adaptc.load_program(tmp_path / "dist" / "program.pt2")
    mlp = [n for n in train.state_dict() if n.startswith("adaptc.prefix_0.") and "weight" in n]
    assert mlp and not any(name in program.state_dict for name in mlp)
    assert "adaptc.prefix_0.prefix" in program.state_dict
    x = inputs()
    assert (main_output(program.module()(**x)) - main_output(train(**x))).abs().max() <= TOL


DEVICE_CASES = [  # (spec, merge, fuse_projections): every infer-mode rewrite
    ("q_proj,v_proj: lora r=4 alpha=8", True, False),
    ("q_proj,k_proj,v_proj,gate_proj,up_proj: lora r=4", False, True),
    ("q_proj: lora r=4 dora; v_proj: ia3", True, False),
    ("attn,ffn: adapter bottleneck=8", True, False),
    ("q_proj,v_proj: lora r=4\nmixture moe k=2 experts=4", True, False),
    ("v_proj: ia3; down_proj: ia3 feedforward\nmixture moe k=2 experts=4", True, False),
    ("attn: prefix tokens=3", True, False),
    ("embed: prompt tokens=3", True, False),
]


@pytest.mark.parametrize("spec,merge,fuse", DEVICE_CASES)
def test_infer_graph_stays_on_the_model_device(tiny, spec, merge, fuse):
    """A model on `meta` (standing in for a GPU: anything but the CPU) compiles to an infer
    graph whose every parameter, buffer and output is on `meta`: no pass creates a tensor on
    the CPU, which on CUDA would fail with a device mismatch."""
    model = wrap(tiny("llama").module.to("meta"))  # example inputs on meta too
    infer = adaptc.compile(model, spec, "infer", merge=merge, fuse_projections=fuse)
    tensors = dict(infer.named_parameters()) | dict(infer.named_buffers())
    assert {name for name, t in tensors.items() if t.device.type != "meta"} == set()
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    logits = infer(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = logits[0] if isinstance(logits, (tuple, list)) else getattr(logits, "logits", logits)
    assert logits.device.type == "meta" and tuple(logits.shape) == (2, 5, 512)


def sha256(path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_report_records_how_the_artifact_was_compiled(tmp_path, monkeypatch):
    """report.json named the spec and the model but not --dtype, --device, the adapter file
    or --no-merge / --fuse-projections: the artifact could not be compiled again from it.
    (The defaults recorded without these options: test_prompt_infer_graph_exports_….)"""
    monkeypatch.chdir(tmp_path)
    spec = "attn.q,attn.v: lora r=4 alpha=8"
    Path("s.adapt").write_text(spec + "\n")
    trained(adaptc.load_model("llama"), spec, tmp_path / "a.safetensors")  # the CLI's preset
    argv = ["compile", "s.adapt", "--mode", "infer", "--adapters", "a.safetensors",
            "--dtype", "bfloat16", "--device", "cpu", "--no-merge", "--fuse-projections",
            "-o", "dist"]
    assert main(argv) == 0
    report = json.loads(Path("dist/report.json").read_text())
    assert report["compile"] == {
        "command": ["adaptc", *argv], "mode": "infer", "merge": False,
        "fuse_projections": True, "dtype": "bfloat16", "device": "cpu",
        "adapters": {"path": "a.safetensors", "sha256": sha256("a.safetensors")}}
    assert report["model"] == "llama" and report["spec_source"] == spec + "\n"
    assert {"adaptc", "torch", "transformers", "python"} <= set(report["versions"])


def test_report_records_the_options_of_a_python_compile(tiny, tmp_path):
    """write_infer_artifact reads them from the compiled module: no command line."""
    model = tiny("gpt2")
    spec = "attn.qkv: lora r=2"
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model.module, spec, "infer", adapters=tmp_path / "a.safetensors",
                           merge=False)
    adaptc.write_infer_artifact(infer, model.module, tmp_path / "dist", reference=train)
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert report["model"] == "GPT2LMHeadModel (Python object)"
    assert report["compile"] == {
        "mode": "infer", "merge": False, "fuse_projections": False, "dtype": "float32",
        "device": "cpu", "adapters": {"path": str(tmp_path / "a.safetensors"),
                                      "sha256": sha256(tmp_path / "a.safetensors")}}

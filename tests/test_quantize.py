"""`quantize` (NF4 + double quantisation): the code equals QLoRA's table, quantise →
dequantise equals a float64 reference written from the paper, QLoRA's output equals a folded
float reference, and the storage is ≈ 4.127 bits per weight."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from statistics import NormalDist

import pytest
import torch

import adaptc
from adaptc.methods.lora import pissa_factors
from adaptc.methods.quantize import Nf4Weight, QuantizeConfig, nf4_code, nf4_linear, quantize_nf4
from helpers import inputs, main_output, perturb_adapters

# bitsandbytes' NF4 table (QLoRA, appendix E)
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def reference_code() -> list[float]:
    """QLoRA §3: 8 positive and 7 negative normal quantiles, 0 exact, scaled to [-1, 1]."""
    offset, ppf = 0.9677083, NormalDist().inv_cdf

    def spaced(n):
        return [offset + (0.5 - offset) * i / (n - 1) for i in range(n - 1)]

    values = sorted([ppf(p) for p in spaced(9)] + [0.0] + [-ppf(p) for p in spaced(8)])
    return [v / max(abs(v) for v in values) for v in values]


def reference_dynamic_map() -> list[float]:
    """bitsandbytes' create_dynamic_map(signed=True): 7 exponents 10^-6 .. 10^0, the i-th with
    2^i mantissas (midpoints of 0.1 .. 1), both signs; and 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = [0.1 + 0.9 * k / 2 ** i for k in range(2 ** i + 1)]
        for a, b in zip(bounds, bounds[1:]):
            values += [(a + b) / 2 * 10.0 ** (i - 6), -(a + b) / 2 * 10.0 ** (i - 6)]
    return sorted(values)


def reference_roundtrip(weight: torch.Tensor, block: int, double: bool, double_block: int):
    """Float64, block by block, as the paper describes (the 8-bit second level as
    bitsandbytes': the dynamic map, per group of constants minus their mean)."""
    code = torch.tensor(reference_code(), dtype=torch.float64)
    flat = weight.double().reshape(-1)
    out = torch.empty_like(flat)
    starts = range(0, flat.numel(), block)
    absmax = torch.tensor([flat[s:s + block].abs().max().item() for s in starts],
                          dtype=torch.float64)
    if double:
        absmax32 = absmax.float().double()
        mean = absmax32.mean()
        levels = torch.tensor(reference_dynamic_map(), dtype=torch.float64)
        for g in range(0, len(absmax), double_block):
            part = absmax32[g:g + double_block] - mean
            scale = part.abs().max()
            nearest = levels[((part / scale)[:, None] - levels).abs().argmin(dim=1)]
            absmax[g:g + double_block] = nearest * scale + mean
    for b, s in enumerate(starts):
        chunk = flat[s:s + block]
        scaled = chunk / chunk.abs().max().clamp_min(1e-300)  # a zero block: codes of 0
        index = (scaled[:, None] - code).abs().argmin(dim=1)
        out[s:s + block] = code[index] * absmax[b]
    return out.view(weight.shape)


def test_nf4_code_is_qlora_table():
    assert torch.allclose(nf4_code(), torch.tensor(BNB_NF4), atol=1e-6)
    assert torch.allclose(torch.tensor(reference_code()).float(), torch.tensor(BNB_NF4),
                          atol=1e-6)


@pytest.mark.parametrize("shape,block,double", [((96, 80), 64, True), ((33, 7), 16, True),
                                                ((128, 64), 64, False), ((700, 300), 64, True)])
def test_roundtrip_equals_float64_reference(shape, block, double):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    config = QuantizeConfig(block=block, double=double, double_block=8 if shape == (33, 7) else 256)
    mine = Nf4Weight(weight, config)()
    expected = reference_roundtrip(weight, block, double, config.double_block)
    assert mine.shape == weight.shape and mine.dtype == weight.dtype
    assert (mine.double() - expected).abs().max().item() <= 1e-6
    relative = ((weight - mine).norm() / weight.norm()).item()
    assert relative < 0.12  # NF4 on normal weights: ~9% relative error


def folded_reference(model, gm):
    """Base model copy: each adapted layer gets merged(dequantised W, b) from a float64
    reference of the NF4 round trip."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for path, adapter in adaptc.adapters.adapter_modules(gm).items():
            layer = folded.get_submodule(path.rsplit(".", 1)[0])
            read = layer.weight
            if adapter.config.init == "pissa":  # the quantised residual W − s·B₀·A₀
                read = pissa_factors(layer.weight, adapter.config.r, adapter.scale)[2]
            config = gm.get_submodule(path.rsplit(".", 1)[0] + ".nf4").config
            dequantised = reference_roundtrip(read, config.block, config.double,
                                              config.double_block).float()
            weight, _ = adapter.merged(dequantised, layer.bias)
            layer.weight.copy_(weight)
    return folded


@pytest.mark.parametrize("lora", ["lora r=4 alpha=8", "lora r=4 alpha=8 dora",
                                  "lora r=4 alpha=8 init=pissa"])
def test_qlora_equals_folded_reference(tiny, lora):
    model = tiny("llama")
    gm = adaptc.compile(model, f"q_proj,down_proj: quantize\nq_proj,down_proj: {lora}")
    perturb_adapters(gm, 0.05)
    x = inputs()
    expected = main_output(folded_reference(model.module, gm)(**x))
    assert (main_output(gm(**x)) - expected).abs().max().item() <= 1e-5


def test_pissa_residual_quantises_with_less_error(tiny):
    """QLoRA + PiSSA quantises W − s·B·A: at init the model is closer to the base."""
    model = tiny("llama")
    x = inputs()
    base = main_output(model.module(**x))
    plain = adaptc.compile(model, "*_proj: quantize\n*_proj: lora r=16 alpha=16")
    pissa = adaptc.compile(model, "*_proj: quantize\n*_proj: lora r=16 alpha=16 init=pissa")
    error = [(main_output(gm(**x)) - base).norm().item() for gm in (plain, pissa)]
    assert error[1] < error[0]


def test_storage_is_about_4_127_bits_per_weight():
    from adaptc.frontend.models import build_preset
    gm = adaptc.compile(build_preset("llama-7b"), "*_proj: quantize\n*_proj: lora r=8 alpha=16")
    counts = adaptc.report_of(gm).counts
    numel = counts["weight_bytes_before"] / 4  # float32 presets
    assert counts["quantize_inserted"] == 224
    assert 8 * counts["weight_bytes_after"] / numel == pytest.approx(4.127, abs=0.002)
    assert counts["weight_bytes_after"] < counts["weight_bytes_before"] / 7.7


def test_all_params_count_quantized_weights_as_peft_does():
    """PEFT counts a packed Params4bit as two parameters per byte: QLoRA on Llama-2-7B is
    PEFT's well-known line, not 282M (the NF4 buffers left out)."""
    from adaptc.frontend.models import build_preset
    gm = adaptc.compile(build_preset("llama-7b"), "*_proj: quantize\n*_proj: lora r=8 alpha=16")
    assert adaptc.report_of(gm).peft_line() == (
        "trainable params: 19,988,480 || all params: 6,758,404,096 || trainable%: 0.2958")


@pytest.mark.parametrize("double", [False, True])
def test_quantized_tensors_own_their_storage(double):
    """No view of the padded block tensor: a saved program would carry the padding, and
    torch.export.save warns that no tensor covers the storage."""
    weight = torch.randn(5, 7)
    state = quantize_nf4(weight, QuantizeConfig(block=4, double=double, double_block=4))
    for name, tensor in state.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


def test_a_second_level_block_wider_than_the_constants_is_not_padded_to():
    """64 block constants: one group whatever double_block is, the same weight; padding the
    group to double_block allocated 400 MB per layer for 1e8 (and overflowed for 1e20)."""
    weight = torch.randn(64, 64)
    usual = Nf4Weight(weight, QuantizeConfig(double_block=256))
    for wide in (10 ** 8, 10 ** 20):
        stored = Nf4Weight(weight, QuantizeConfig(double_block=wide))
        assert torch.equal(stored(), usual())
        assert stored.stored_bytes() == usual.stored_bytes()


def test_quantized_weights_are_buffers_and_the_user_model_is_untouched(tiny):
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    gm = adaptc.compile(model, "q_proj: quantize\nq_proj: lora r=2")
    assert not any("q_proj.weight" in n for n, _ in gm.named_parameters())
    assert {n for n, _ in gm.named_buffers() if "q_proj.nf4" in n} == {
        f"model.layers.{i}.self_attn.q_proj.nf4.{b}" for i in (0, 1)
        for b in ("packed", "absmax_q", "absmax_scale", "absmax_mean", "code", "levels")}
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert set(adaptc.adapter_state_dict(gm)) == {
        f"model.layers.{i}.self_attn.q_proj.lora.{t}" for i in (0, 1) for t in "AB"}


def test_nf4_linear_gives_dense_linear_gradients():
    """Float64 weight and input: output, input gradient and bias gradient of nf4_linear equal
    linear on the dequantised weight (1e-12), the frozen weight gets none; under bfloat16
    autocast the gradients come back in the inputs' float32 as autocast's linear gives them."""
    gen = torch.Generator().manual_seed(0)
    stored = Nf4Weight(torch.randn(13, 10, generator=gen, dtype=torch.float64),
                       QuantizeConfig(block=8, double_block=4))
    x = torch.randn(3, 5, 10, generator=gen, dtype=torch.float64)
    bias = torch.randn(13, generator=gen, dtype=torch.float64)
    up = torch.randn(3, 5, 13, generator=gen, dtype=torch.float64)
    grads = []
    for linear in (nf4_linear, lambda x, w, b: torch.nn.functional.linear(x, w(), b)):
        xs, bs = x.clone().requires_grad_(), bias.clone().requires_grad_()
        out = linear(xs, stored, bs)
        (out * up).sum().backward()
        grads.append((out.detach(), xs.grad, bs.grad))
    for ours, reference in zip(*grads):
        assert (ours - reference).abs().max().item() <= 1e-12
    stored32 = Nf4Weight(stored().float(), QuantizeConfig())
    grads = []
    for linear in (nf4_linear, lambda x, w, b: torch.nn.functional.linear(x, w(), b)):
        xs, bs = x.float().requires_grad_(), bias.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear(xs, stored32, bs)
        (out.float() * up.float()).sum().backward()
        grads.append((xs.grad, bs.grad))
    for ours, reference in zip(*grads):
        assert ours.dtype == reference.dtype == torch.float32
        assert (ours - reference).abs().max().item() <= 2e-2 * reference.abs().max().item()


@pytest.mark.parametrize("family, targets, lora", [("llama", "*_proj", "lora r=4"),
                                                   ("llama", "*_proj", "lora r=4 dora"),
                                                   ("gpt2", "attn.*,ffn.*", "lora r=4")])
def test_qlora_training_keeps_no_dense_weight_for_backward(tiny, family, targets, lora):
    """No tensor autograd saves in the forward pass has a quantised weight's shape (Llama's
    plain linear saved 11 of the 14: all but layer 0's q, k, v, whose input needs no
    gradient; DoRA's weight norm is detached, so it saves none either; GPT-2's Conv1D addmm
    all 8), and the adapter gradients equal those on the dequantised float model (1e-5)."""
    model = tiny(family)
    gm = adaptc.compile(model, f"{targets}: quantize\n{targets}: {lora}")
    perturb_adapters(gm, 0.05)
    dense = copy.deepcopy(model)
    stored = {path.removesuffix(".nf4"): m for path, m in gm.named_modules()
              if isinstance(m, Nf4Weight)}
    assert len(stored) == {"llama": 14, "gpt2": 8}[family]
    with torch.no_grad():
        for path, weight in stored.items():
            dense.module.get_submodule(path).weight.copy_(weight())
    reference = adaptc.compile(dense, f"{targets}: {lora}")
    with torch.no_grad():
        for name, param in adaptc.adapter_state_dict(reference).items():
            param.copy_(adaptc.adapter_state_dict(gm)[name])

    shapes = {m.shape for m in stored.values()} | {m.shape[::-1] for m in stored.values()}
    own = {t.data_ptr() for t in [*gm.parameters(), *gm.buffers()]}  # GPT-2's tied head
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in own:
            saved.append(tensor.shape)
        return tensor

    x = inputs()
    torch.manual_seed(0)  # the same dropout masks (GPT-2's) in both graphs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        main_output(gm(**x)).pow(2).mean().backward()
    assert saved and not [s for s in saved if tuple(s) in shapes]
    torch.manual_seed(0)
    main_output(reference(**x)).pow(2).mean().backward()
    ours, theirs = adaptc.adapter_state_dict(gm), adaptc.adapter_state_dict(reference)
    for name in theirs:
        assert (ours[name].grad - theirs[name].grad).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_weight_that_is_not_finite_is_refused_by_name(tiny, bad):
    """One NaN made the mean of the block constants NaN: every dequantised value NaN."""
    model = tiny("llama")
    with torch.no_grad():
        model.module.model.layers[1].mlp.down_proj.weight[3, 5] = bad
    with pytest.raises(adaptc.errors.ModelError,
                       match=r"'model\.layers\.1\.mlp\.down_proj\.weight' has 1 NaN or infinite"):
        adaptc.compile(model, "down_proj: quantize")


def test_a_tied_lm_head_is_quantised_and_the_embedding_keeps_its_float_weight(tiny):
    """GPT-2's lm_head shares wte's weight: only the head reads NF4 (the input embedding read
    it too, so `lm_head: quantize` quantised the embedding), and the float copy counts."""
    model = tiny("gpt2")
    gm = adaptc.compile(model, "lm_head: quantize").eval()
    x = inputs(vocab=model.module.config.vocab_size)
    weight = model.module.lm_head.weight
    with torch.no_grad():
        hidden = model.module.transformer(**x).last_hidden_state
        expected = hidden.double() @ reference_roundtrip(weight, 64, True, 256).t()
    assert (gm(**x).logits.double() - expected).abs().max().item() <= 1e-5
    counts = adaptc.report_of(gm).counts
    size = weight.numel() * weight.element_size()
    assert counts["weight_bytes_before"] == size
    assert counts["weight_bytes_after"] == size + gm.get_submodule("lm_head.nf4").stored_bytes()


def stored_layer_bytes(gm) -> int:
    """Bytes of the state the module stores as its `*_proj` weights: NF4 buffers (not the
    format's constant tables), merged copies, and fuse_projections' concatenations of them."""
    return sum(t.numel() * t.element_size() for name, t in gm.state_dict().items()
               if ".nf4." in name or name.endswith((".merged_weight", "_proj_weight")))


@pytest.mark.parametrize("options,lora,dense", [
    ({}, "lora r=4", True), ({"fuse_projections": True}, "lora r=4", True),
    ({}, "lora r=4 dora", True), ({"merge": False}, "lora r=4", False)])
def test_weight_bytes_after_are_what_the_infer_module_stores(tiny, options, lora, dense):
    """Merged QLoRA (and DoRA) folds each NF4 weight into a dense copy: the report said 4-bit
    bytes for a module holding float32 weights. Unmerged, the weights stay NF4."""
    model = tiny("llama")
    gm = adaptc.compile(model, f"*_proj: quantize\n*_proj: {lora}", mode="infer", **options)
    counts = adaptc.report_of(gm).counts
    nf4 = [m for m in gm.modules() if isinstance(m, Nf4Weight)]
    assert len(nf4) == (0 if dense else 14)
    assert counts["weight_bytes_after"] == stored_layer_bytes(gm)
    if dense:  # float32 copies, as many bytes as before
        assert counts["weight_bytes_after"] == counts["weight_bytes_before"]
    else:
        assert counts["weight_bytes_after"] == sum(m.stored_bytes() for m in nf4)
        assert counts["weight_bytes_after"] < counts["weight_bytes_before"] / 7


def test_weight_bytes_after_count_a_tied_float_weight_beside_a_merged_head(tiny):
    """GPT-2's quantised lm_head merged with its LoRA: a dense copy, and wte's float weight
    that the input embedding still reads."""
    model = tiny("gpt2")
    gm = adaptc.compile(model, "lm_head: quantize\nlm_head: lora r=4", mode="infer")
    counts = adaptc.report_of(gm).counts
    weight = model.module.lm_head.weight
    assert counts["weight_bytes_after"] == 2 * weight.numel() * weight.element_size()


def test_an_outlier_weight_leaves_the_other_blocks_of_its_group_near_their_scale():
    """One weight of 250σ: the int8 linear second level (step d_g/127) put the block constants
    of its group up to 49% off and doubled the group's error; the dynamic map's precision is
    relative, as QLoRA's FP8 constants."""
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[0, 0] = 5.0
    stored = Nf4Weight(weight, QuantizeConfig())
    expected = reference_roundtrip(weight, 64, True, 256)
    assert (stored().double() - expected).abs().max().item() <= 1e-6
    absmax = weight.reshape(-1, 64).abs().amax(dim=1)
    assert ((stored.absmax_values() - absmax).abs() / absmax).max().item() < 0.04
    group = slice(1, 64)  # the other rows of the outlier's 256 blocks
    single = Nf4Weight(weight, QuantizeConfig(double=False))()
    error = [(w[group] - weight[group]).norm().item() for w in (stored(), single)]
    assert error[0] < 1.01 * error[1]


def test_quantising_a_large_weight_takes_a_few_times_its_bytes():
    """Nearest code by midpoints: a distance to each of the 16 codes took 2.1 GB of peak
    memory for a 64 MB weight (a 70B model's 235M-value layer: 15 GB)."""
    script = ("import resource, torch\n"
              "from adaptc.methods.quantize import QuantizeConfig, quantize_nf4\n"
              "weight = torch.randn(4096, 4096)\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "quantize_nf4(weight, QuantizeConfig())\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert int(done.stdout.split()[-1]) * 1024 < 8 * 4096 * 4096 * 4  # KiB; 8× the weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_zero_block_stays_zero_and_odd_shapes_match_the_reference(dtype):
    """Blocks of 6 across rows of 13 (the last one padded), second-level groups of 2: a block
    of zeros dequantises to exact zeros although its double-quantised constant is not 0."""
    weight = (torch.randn(5, 13, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    weight.view(-1)[6:12] = 0
    out = Nf4Weight(weight, QuantizeConfig(block=6, double_block=2))()
    expected = reference_roundtrip(weight, 6, True, 2).to(dtype)
    assert out.dtype == dtype and torch.equal(out.view(-1)[6:12], weight.new_zeros(6))
    assert (out.double() - expected.double()).abs().max().item() <= 1e-6

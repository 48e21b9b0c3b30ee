"""DoRA (adapter mode and peft backend mode) and peft's mixed-adapter batches (`adapter_names=`) in backend mode,
against unpatched peft: outputs, every gradient, merge, peft-format files, generation, errors."""
import copy
import warnings

import pytest
import torch

import peftops
from peftops import LoraConfig
from peftops.ops import reference
from tiny_models import (ALPHA_PATTERN, BUILDERS, RANK_PATTERN, assert_close, input_ids, loss_of, output,
                         ours_to_peft_name, outputs_match_then_backward, peft_lora_config, randomize_lora,
                         tiny_llama)

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "dense"]}


def randomize_magnitudes(model, seed=3):
    """Magnitudes away from the row norms, so that `magnitude / norm` is not 1 and its gradient is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)


def dora_pair(family, **kwargs):
    """(ours in adapter mode, peft) with DoRA on the same base weights and the same random factors and magnitudes."""
    config = LoraConfig(r=4, alpha=8, use_dora=True, target_modules=TARGETS[family], **kwargs)
    base = BUILDERS[family]()
    ref = peft.get_peft_model(copy.deepcopy(base), peft_lora_config(config, base))
    ours = peftops.patch(base, config)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():  # peft's initialisation: the magnitudes are the row norms of W
        if "lora_magnitude_vector" in name:
            assert torch.equal(p, ref_params[ours_to_peft_name(name)]), name
    randomize_lora(ours)
    randomize_magnitudes(ours)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                ref_params[ours_to_peft_name(name)].copy_(p)
    return ours, ref


def check_outputs_and_grads(ours, ref, to_ref=lambda n: n, ids=None, rtol=1e-5):
    ref_params = outputs_match_then_backward(ours, ref, ids, rtol)
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert {to_ref(n) for n, _ in trained} == {n for n, p in ref_params.items() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n, _ in trained)
    for name, p in trained:
        expected = ref_params[to_ref(name)].grad
        if expected is None:  # BERT's pooler does not feed last_hidden_state
            assert p.grad is None, name
        else:
            assert_close(p.grad, expected, rtol, what=f"grad of {name}")


def spy(monkeypatch, op):
    calls = []
    fused = getattr(peftops.ops, op)

    def record(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(peftops.ops, op, record)
    return calls


# DoRA, adapter mode -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_adapter_dora_matches_peft(family, monkeypatch):
    calls = spy(monkeypatch, "dora_linear")
    ours, ref = dora_pair(family)
    check_outputs_and_grads(ours.train(), ref.train(), ours_to_peft_name)
    assert len(calls) == sum(isinstance(m, peftops.layers.lora.LoraLinear) for m in ours.modules()) > 0


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_adapter_dora_with_rank_and_alpha_patterns_matches_peft(family):
    ours, ref = dora_pair(family, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    assert len({m.r for m in ours.modules() if isinstance(m, peftops.layers.lora.LoraLinear)}) >= 2
    check_outputs_and_grads(ours.train(), ref.train(), ours_to_peft_name)


def test_adapter_dora_dropout_in_eval_and_merge():
    ours, ref = dora_pair("llama", dropout=0.3)
    ids = input_ids()
    ours.eval(), ref.eval()
    expected = output(ref, ids)
    assert_close(output(ours, ids), expected, what="eval with dropout")
    merged_ref = ref.merge_and_unload()
    merged = peftops.merge(ours)
    for name, w in merged_ref.named_parameters():  # peft's merge formula, in the same order: equal to rounding
        assert_close(dict(merged.named_parameters())[name], w, 1e-6, what=name)
    assert_close(output(merged, ids), expected, what="merged")


def test_adapter_dora_merge_conv1d():
    ours, ref = dora_pair("gpt2")
    ids = input_ids()
    expected = output(ref.eval(), ids)
    assert_close(output(peftops.merge(ours).eval(), ids), expected, what="merged GPT-2")
    assert_close(output(ref.merge_and_unload(), ids), expected, what="peft's merge")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_peft_format_both_ways(tmp_path, family):
    ours, ref = dora_pair(family)
    ids = input_ids()
    expected = output(ref, ids)
    peftops.save_adapter(ours, str(tmp_path / "ours"))
    loaded = peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "ours")
    assert_close(output(loaded, ids), expected, what="peft loads ours")
    ref.save_pretrained(tmp_path / "ref")
    saved, peft_saved = (peftops.io.read_weights(str(tmp_path / d)) for d in ("ours", "ref"))
    assert saved.keys() == peft_saved.keys() and any(k.endswith("lora_magnitude_vector") for k in saved)
    fresh = peftops.patch(BUILDERS[family](), LoraConfig(r=4, alpha=8, use_dora=True, target_modules=TARGETS[family]))
    peftops.load_adapter(fresh, str(tmp_path / "ref"))
    assert_close(output(fresh, ids), expected, what="ours loads peft's")
    plain = peftops.patch(BUILDERS[family](), LoraConfig(r=4, alpha=8, target_modules=TARGETS[family]))
    with pytest.raises(ValueError, match="use_dora: file True, model False"):
        peftops.load_adapter(plain, str(tmp_path / "ref"))


# DoRA, backend mode -----------------------------------------------------------------------------------------------
def peft_dora(family="llama", **kwargs):
    """(patched, reference): one peft DoRA model twice, random factors and magnitudes; only the first is patched."""
    ref = peft.get_peft_model(BUILDERS[family](), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2", **kwargs))
    randomize_lora(ref)
    randomize_magnitudes(ref)
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftops.patch(ours)
    return ours, ref


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_backend_dora_matches_peft(family, monkeypatch):
    calls = spy(monkeypatch, "dora_linear")
    ours, ref = peft_dora(family, bias="lora_only")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_outputs_and_grads(ours.train(), ref.train())
    assert len(calls) == sum(isinstance(m, peft.tuners.lora.layer.Linear) for m in ours.modules()) > 0


def test_backend_dora_dropout():
    ours, ref = peft_dora(lora_dropout=0.3)
    ids = input_ids()
    assert_close(output(ours.eval(), ids), output(ref.eval(), ids), what="eval with dropout")
    ours.train()  # our own dropout mask: only reproducibility under a seed and that dropout changes the output
    torch.manual_seed(1)
    first = output(ours, ids)
    torch.manual_seed(1)
    assert torch.equal(first, output(ours, ids))
    assert not torch.allclose(first, output(ours.eval(), ids))


class KernelsDropout(torch.nn.Module):
    """What the op draws, as a module standing in for peft's nn.Dropout: one seed from torch's generator per call and
    the Philox mask of that seed."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return reference.apply_dropout(x, self.p, reference.draw_seed(x.device, self.p, True))


def test_backend_dora_dropout_is_peft_s_under_the_kernels_mask():
    # peft's own DoRA layers in training, their dropout drawing the op's mask: the patched model's outputs and every
    # gradient (dropout's placement, and the base output of the dropped input that peft recomputes)
    ours, ref = peft_dora(lora_dropout=0.3)
    for layer in ref.modules():
        if isinstance(layer, peft.tuners.lora.layer.Linear):
            layer.lora_dropout["default"] = KernelsDropout(0.3)
    ids = input_ids()
    outs = []
    for model in (ours.train(), ref.train()):
        torch.manual_seed(4)
        outs.append(output(model, ids))
        loss_of(outs[-1]).backward()
    assert_close(*outs, what="outputs")
    assert not torch.allclose(outs[0], output(ours.eval(), ids))  # dropout was on
    ref_params = dict(ref.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n, _ in trained)
    for name, p in trained:
        assert_close(p.grad, ref_params[name].grad, what=f"grad of {name}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_backend_dora_merges_as_peft(family):
    # peftops.merge of a patched peft model unpatches and lets peft merge; either way the merge is peft's, intact
    ours, ref = peft_dora(family)
    ids = input_ids()
    expected = output(ref.eval(), ids)
    for merged in (peftops.merge(copy.deepcopy(ours)), copy.deepcopy(ours).merge_and_unload()):
        assert not any(isinstance(m, peft.tuners.lora.layer.LoraLayer) for m in merged.modules())
        assert_close(output(merged.eval(), ids), expected, what="merged")


def test_backend_dora_bf16_loosely():
    ours, ref = peft_dora()
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    ids = input_ids()
    out, expected = output(ours, ids).float(), output(ref, ids).float()
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()


def test_backend_dora_with_two_active_adapters_falls_back():
    ours, ref = peft_dora()
    for model in (ours, ref):
        model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
        model.base_model.set_adapter(["default", "other"])
    peftops.patch(ours)
    with pytest.warns(UserWarning, match="DoRA with several active adapters"):
        out = output(ours, input_ids())
    assert_close(out, output(ref, input_ids()), what="fallback")


def test_a_base_weight_made_trainable_gets_its_gradient():
    # as for LoRA (test_patch_lora.py): the layer runs peft's DoRA in plain PyTorch, so the weight gets peft's gradient
    ours, ref = dora_pair("llama", dropout=0.0)
    name = "model.layers.0.self_attn.q_proj.base_layer.weight"
    ours.get_parameter(name).requires_grad_(True)
    ref.get_parameter(ours_to_peft_name(name)).requires_grad_(True)
    with pytest.warns(UserWarning, match="base weight is trainable"):
        check_outputs_and_grads(ours, ref, ours_to_peft_name)
    assert ours.get_parameter(name).grad.abs().sum() > 0


# Mixed-adapter batches, backend mode ------------------------------------------------------------------------------
def many_adapters(n, family="llama"):
    """(patched, reference) peft models with adapters a0..a{n-1} of ranks 1..8 on partly different layers."""
    targets = TARGETS[family]
    ref = None
    for i in range(n):
        config = peft.LoraConfig(r=1 + i % 8, lora_alpha=2 + i, target_modules=targets if i % 3 else targets[:2],
                                 fan_in_fan_out=family == "gpt2")
        if ref is None:
            ref = peft.get_peft_model(BUILDERS[family](), config, adapter_name="a0")
        else:
            ref.add_adapter(f"a{i}", config)
    randomize_lora(ref)
    ours = copy.deepcopy(ref)
    peftops.patch(ours)
    return ours.eval(), ref.eval()  # peft takes adapter_names only for inference


def mixed(model, ids, names, grad=False):
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back
        return output_with(model, ids, names)


def output_with(model, ids, names):
    out = model(input_ids=ids, adapter_names=names)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("n, names", [
    (1, ["a0", "__base__", "a0"]),
    (3, ["a2", "a2", "a2", "a2", "a2", "a0", "__base__"]),  # skewed; a1 absent: an empty segment
    (16, [f"a{i}" for i in (15, 3, 3, 0, 9, 12, 7)] + ["__base__"]),
])
def test_mixed_batches_match_peft(n, names, monkeypatch):
    ours, ref = many_adapters(n)
    calls = spy(monkeypatch, "multi_lora_linear")
    ids = input_ids(batch=len(names), seq=5)
    expected = output_with(ref, ids, names)
    assert_close(mixed(ours, ids, names), expected, what="mixed batch")
    layers = [m for m in ours.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    involved = [m for m in layers if set(names) & set(m.lora_A)]
    assert len(calls) == len(involved) > 0
    # each row equals that adapter alone (or the base), so the batch is really mixed
    row = names.index(names[0])
    ref.set_adapter(names[0])
    assert_close(expected[row], output(ref, ids)[row], what="row vs single adapter")
    assert_close(mixed(ours, ids, names, grad=True), expected, what="with grad enabled")


def test_mixed_batches_gpt2_and_bert():
    for family in ("gpt2", "bert"):
        ours, ref = many_adapters(3, family)
        ids = input_ids(batch=4)
        names = ["a1", "__base__", "a2", "a1"]
        assert_close(mixed(ours, ids, names), output_with(ref, ids, names), what=family)


def test_mixed_batches_follow_weight_updates():
    ours, ref = many_adapters(3)
    ids, names = input_ids(batch=3), ["a0", "a1", "a2"]
    mixed(ours, ids, names)
    with torch.no_grad():
        for model in (ours, ref):
            for name, p in model.named_parameters():
                if "lora_B.a1" in name:
                    p.mul_(-2)
    assert_close(mixed(ours, ids, names), output_with(ref, ids, names), what="after an in-place update")
    for model in (ours, ref):  # `.data =` moves no version counter: the storage changes
        for name, p in model.named_parameters():
            if "lora_A.a2" in name:
                p.data = p.data * 3
    assert_close(mixed(ours, ids, names), output_with(ref, ids, names), what="after replacing .data")
    for model in (ours, ref):  # in place through .data: neither the storage nor any version counter changes
        for name, p in model.named_parameters():
            if "lora_B.a0" in name:
                p.data.mul_(3)
    assert_close(mixed(ours, ids, names), output_with(ref, ids, names), what="after an in-place edit of .data")


def test_mixed_bf16_loosely():
    ours, ref = many_adapters(3)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    ids, names = input_ids(batch=3), ["a2", "__base__", "a1"]
    out, expected = mixed(ours, ids, names).float(), output_with(ref, ids, names).float()
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()


def test_generate_with_adapter_names_matches_peft(monkeypatch):
    ours, ref = many_adapters(3)
    calls = spy(monkeypatch, "multi_lora_linear")
    ids = input_ids(batch=4, seq=4)
    names = ["a1", "__base__", "a2", "a0"]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=4,
                  do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tokens = ours.generate(**kwargs)
    assert torch.equal(tokens, ref.generate(**kwargs))
    assert len(calls) == 6 * 4  # the prompt, then one step per further token


def test_bad_adapter_names_raise():
    ours, _ = many_adapters(2)
    ids = input_ids(batch=2)
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        ours(input_ids=ids, adapter_names=["a0", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        ours(input_ids=ids, adapter_names=["a0"])
    with pytest.raises(ValueError, match="training mode"):
        ours.train()(input_ids=ids, adapter_names=["a0", "a1"])
    dora, _ = peft_dora()
    with pytest.raises(ValueError, match="DoRA"):
        dora.eval()(input_ids=ids, adapter_names=["default", "__base__"])


def test_mixed_layer_level_with_dropout_in_training_falls_back():
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5))
    ours = peftops.patch(copy.deepcopy(ref))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    with pytest.warns(UserWarning, match="dropout in training mode"):
        layer.train()(x, adapter_names=["default", "__base__"])
    ref_layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    names = ["default", "__base__"]
    assert_close(layer.eval()(x, adapter_names=names), ref_layer.eval()(x, adapter_names=names), what="eval")


"""IA3: adapter mode against peft's IA3 (outputs, every gradient, merge), backend mode on peft IA3 models (outputs,
gradients and peft's API), and adapter files in peft's format both ways."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

import peftops
from ia3_helpers import ia3_pair, ours_to_peft_name, peft_ia3_config, randomize_ia3, with_random_biases
from peftops import IA3Config
from peftops.layers import Ia3Linear
from tiny_models import (BUILDERS, assert_close, input_ids, output, outputs_match_then_backward, tiny_bert,
                         tiny_llama, with_own_forwards)

peft = pytest.importorskip("peft")

EXPLICIT = {"llama": IA3Config(target_modules=["q_proj", "o_proj", "up_proj"], feedforward_modules=["up_proj"]),
            "gpt2": IA3Config(target_modules=r".*\.(c_attn|c_fc)", feedforward_modules=r".*\.c_fc"),
            "bert": IA3Config(target_modules=["query", "intermediate.dense"], feedforward_modules=[])}


@pytest.fixture
def op_calls(monkeypatch):
    """Each fused IA3 call's feedforward flag (ia3_glu_linear: a Llama MLP's down projection, feedforward)."""
    calls = []
    fused, gated = peftops.ops.ia3_linear, peftops.ops.ia3_glu_linear

    def spy(*args, **kwargs):
        calls.append(kwargs.get("feedforward", False))
        return fused(*args, **kwargs)

    def gated_spy(*args):
        calls.append(True)
        return gated(*args)

    monkeypatch.setattr(peftops.ops, "ia3_linear", spy)
    monkeypatch.setattr(peftops.ops, "ia3_glu_linear", gated_spy)
    return calls


def check_same(ours, ref, name_map=lambda n: n, ids=None, rtol=1e-5):
    """Outputs and the gradient of every trainable parameter of `ours` against `ref`'s (named by name_map)."""
    ref_params = outputs_match_then_backward(ours, ref, ids, rtol)
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert trained and {name_map(n) for n, _ in trained} == {n for n, p in ref_params.items() if p.requires_grad}
    for name, p in trained:
        assert_close(p.grad, ref_params[name_map(name)].grad, rtol, what=f"grad of {name}")
    ours.zero_grad()
    ref.zero_grad()


def ia3_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peftops.layers.Ia3Linear)}


def peft_ia3_layers(model) -> dict:
    """peft's IA3 layers under the base model's module names."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.ia3.layer.Linear)}


@pytest.mark.parametrize("explicit", [False, True], ids=["defaults", "explicit"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_adapter_mode_matches_peft(family, explicit, op_calls):
    ours, ref = ia3_pair(with_random_biases(BUILDERS[family]), EXPLICIT[family] if explicit else None)
    layers, peft_layers = ia3_layers(ours), peft_ia3_layers(ref)
    assert layers.keys() == peft_layers.keys()
    assert {n: m.feedforward for n, m in layers.items()} == {n: m.is_feedforward for n, m in peft_layers.items()}
    assert any(m.feedforward for m in layers.values()) == (family != "bert" or not explicit)
    check_same(ours.train(), ref.train(), ours_to_peft_name)
    assert len(op_calls) == len(layers)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_exclude_modules_as_peft(family):
    # peft's family defaults less one module kind (and layer 0's everything, by regex on the other families)
    exclude = {"llama": ["down_proj"], "gpt2": r".*\.0\..*", "bert": ["attention.self.key"]}[family]
    ours, ref = ia3_pair(with_random_biases(BUILDERS[family]), IA3Config(exclude_modules=exclude))
    layers = ia3_layers(ours).keys()
    assert layers == peft_ia3_layers(ref).keys()
    assert layers and layers < ia3_layers(ia3_pair(BUILDERS[family])[0]).keys()
    check_same(ours.train(), ref.train(), ours_to_peft_name)


def test_llama_mlp_keeps_no_copy_of_its_product_and_unpatch_restores_it():
    from op_helpers import SavedTensors
    ours, ref = ia3_pair(tiny_llama)  # defaults: k_proj, v_proj, and down_proj as a feed-forward module
    mlps = [m for m in ours.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps and all("forward" in m.__dict__ for m in mlps)  # taken over: ops.ia3_glu_linear
    ids = input_ids(batch=3, seq=11)
    saved = []
    for model in (ours, ref):
        with SavedTensors(exclude=list(model.parameters())) as s:
            output(model, ids)
        saved.append(s.nbytes)
    product = len(mlps) * ids.numel() * ours.config.intermediate_size * 4  # act * up per layer, float32
    assert saved[0] <= saved[1] - product  # peft keeps that product for its scale's gradient; we do not
    before = output(ours, ids)
    peftops.unpatch(ours)
    assert not any("forward" in m.__dict__ for m in mlps)
    assert not torch.equal(output(ours, ids), before)  # the base model again (the IA3 vectors were random)


def test_only_ia3_vectors_train_and_unpatch_restores():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # a flag of the caller's that unpatch must give back
    before = {n: p.clone() for n, p in model.state_dict().items()}
    peftops.patch(model, IA3Config())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(".ia3_l") for n in trained)
    assert peftops.trainable_parameters(model)[0] == 2 * (16 + 16 + 48)  # k_proj, v_proj (out 16), down_proj (in 48)
    with pytest.raises(ValueError, match="already patched"):
        peftops.patch(model, IA3Config())
    with pytest.raises(ValueError, match="already patched"):
        peftops.patch(model, peftops.LoraConfig())
    peftops.unpatch(model)
    assert not any(isinstance(m, peftops.layers.Ia3Linear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: n != "lm_head.weight" for n, _ in model.named_parameters()}
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_merge_matches_peft_merge(family):
    ours, ref = ia3_pair(with_random_biases(BUILDERS[family]))
    ids = input_ids()
    expected = output(ours, ids)
    merged_ref = ref.merge_and_unload()
    assert peftops.merge(ours) is ours
    assert not any(isinstance(m, peftops.layers.Ia3Linear) for m in ours.modules())
    assert all(torch.equal(p, merged_ref.state_dict()[n]) for n, p in ours.state_dict().items())
    assert_close(output(ours, ids), expected, what="merged against unmerged")
    assert all(p.requires_grad for p in ours.parameters())  # the base's own flags are back


@pytest.mark.parametrize("config, match", [
    (IA3Config(target_modules=["nope"]), "nope"),
    (IA3Config(target_modules=["embed_tokens"]), "IA3 cannot adapt"),
    (IA3Config(target_modules=["q_proj"]), None),  # the llama default feed-forward list is fine when unused
])
def test_targets(config, match):
    model = tiny_llama()
    if match is None:
        peftops.patch(model, config)
        assert [m.feedforward for m in model.modules() if isinstance(m, peftops.layers.Ia3Linear)] == [False] * 2
        return
    with pytest.raises(ValueError, match=match):
        peftops.patch(model, config)
    assert all(p.requires_grad for p in model.parameters())


def test_no_family_default_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules=None"):
        peftops.patch(model, IA3Config())
    with pytest.raises(ValueError, match="feedforward_modules=None"):
        peftops.patch(model, IA3Config(target_modules=["0"]))
    peftops.patch(model, IA3Config(target_modules=["0"], feedforward_modules=["0"]))
    assert model[0].feedforward
    with pytest.raises(ValueError, match="feedforward_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


# Backend mode ------------------------------------------------------------------------------------------------------
def peft_pair(family="llama", **kwargs):
    """(patched, reference): the same peft IA3 model twice, with random vectors; only the first is patched."""
    ref = peft.get_peft_model(with_random_biases(BUILDERS[family])(), peft.IA3Config(**kwargs))
    randomize_ia3(ref)
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back on a plain IA3 model
        assert peftops.patch(ours) is ours
    return ours, ref


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_backend_matches_peft(family, op_calls):
    ours, ref = peft_pair(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_same(ours.train(), ref.train())
    layers = [m for m in ours.modules() if isinstance(m, peft.tuners.ia3.layer.Linear)]
    assert len(op_calls) == len(layers) > 0 and any(op_calls)
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_backend_several_adapters_and_set_adapter(op_calls):
    ours, ref = peft_pair()
    other = peft.IA3Config(target_modules=["k_proj", "q_proj", "down_proj"], feedforward_modules=["down_proj"])
    for model in (ours, ref):
        model.add_adapter("other", other)
        randomize_ia3(model, seed=7)
    peftops.patch(ours)  # idempotent: patches only the q_proj layers add_adapter created
    assert sum("_peftops_saved_forward" in m.__dict__ for m in ours.modules()) == 8
    for model in (ours, ref):
        model.set_adapter("other")
    check_same(ours, ref)
    for model in (ours, ref):  # two adapters active at once: their vectors multiply
        model.base_model.set_adapter(["default", "other"])
        for n, p in model.named_parameters():  # peft's set_adapter leaves only the first name trainable; train both
            p.requires_grad_(".ia3_l." in n)
    op_calls.clear()
    check_same(ours, ref)
    assert len(op_calls) == 8


def test_backend_disable_merge_and_unmerge():
    ours, ref = peft_pair(family="gpt2")
    ids = input_ids()
    with ours.disable_adapter(), ref.disable_adapter():
        base = output(ref, ids)
        assert_close(output(ours, ids), base, what="disabled")
    assert not torch.allclose(output(ours, ids), base)
    ours.base_model.merge_adapter()
    ref.base_model.merge_adapter()
    assert_close(output(ours, ids), output(ref, ids), what="merged adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that IA3 unmerging is inexact
        ours.base_model.unmerge_adapter()
        ref.base_model.unmerge_adapter()
    check_same(ours, ref, ids=ids)


def test_backend_merge_and_unload_and_peftops_merge():
    ours, ref = peft_pair(family="bert")
    ids = input_ids()
    expected = output(ref, ids)
    assert_close(output(copy.deepcopy(ours).merge_and_unload(), ids), expected, what="merge_and_unload")
    merged = peftops.merge(ours)
    assert not any(isinstance(m, peft.tuners.ia3.IA3Layer) for m in merged.modules())
    assert_close(output(merged, ids), expected, what="peftops.merge")


def test_backend_save_pretrained_and_unpatch(tmp_path):
    ours, ref = peft_pair()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    saved = peftops.io.read_weights(str(tmp_path / "ours"))
    expected = peftops.io.read_weights(str(tmp_path / "ref"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert peftops.unpatch(ours) is ours
    assert not any("forward" in m.__dict__ for m in ours.modules())
    ids = input_ids()
    assert torch.equal(output(ours, ids), output(ref, ids))


def test_backend_mixed_dtypes_fall_back_with_one_warning(op_calls):
    # peft keeps IA3 vectors in float32 over a bf16 base and rounds its float32 product once; the fused op, one dtype
    # throughout, cannot, so peft's forward runs (exactly peft's numbers); under autocast the op runs
    ref = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.IA3Config())
    assert ref.base_model.model.model.layers[0].self_attn.k_proj.ia3_l["default"].dtype == torch.float32
    randomize_ia3(ref)
    ours = copy.deepcopy(ref)
    peftops.patch(ours)
    ids = input_ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [output(ours, ids) for _ in range(2)][0]
    messages = [str(w.message) for w in caught if "peftops" in str(w.message)]
    assert len(messages) == 1 and "dtypes" in messages[0] and not op_calls
    assert torch.equal(out, output(ref, ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output(ours, ids)
    layers = [m for m in ours.modules() if isinstance(m, peft.tuners.ia3.layer.Linear)]
    assert len(op_calls) == len(layers) > 0


# Adapter files in peft's format -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_peft_loads_what_we_save(tmp_path, family):
    base = BUILDERS[family]()
    fresh = copy.deepcopy(base)
    ours = peftops.patch(base, IA3Config())
    randomize_ia3(ours)
    peftops.save_adapter(ours, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    ids = input_ids()
    assert_close(output(loaded, ids), output(ours, ids), what="peft-loaded")
    ref = peft.get_peft_model(BUILDERS[family](), peft_ia3_config())
    ref.save_pretrained(tmp_path / "peft")
    mine, theirs = peftops.io.read_weights(str(tmp_path)), peftops.io.read_weights(str(tmp_path / "peft"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_we_load_what_peft_saves(tmp_path, family):
    _, ref = ia3_pair(BUILDERS[family], EXPLICIT[family], seed=5)
    ref.save_pretrained(tmp_path)
    ours = peftops.patch(BUILDERS[family](), EXPLICIT[family])
    assert peftops.load_adapter(ours, str(tmp_path)) is ours
    ids = input_ids()
    assert_close(output(ours, ids), output(ref, ids), what="loaded from peft")
    # and into a peft IA3 model in backend mode
    target = peftops.patch(peft.get_peft_model(BUILDERS[family](), peft_ia3_config(EXPLICIT[family])))
    assert peftops.load_adapter(target, str(tmp_path)) is target
    assert_close(output(target, ids), output(ref, ids), what="loaded into peft")


def test_mismatched_files_are_refused(tmp_path):
    square = IA3Config(target_modules=["k_proj", "o_proj"], feedforward_modules=["o_proj"])  # o_proj is 32x32
    saved = peftops.patch(tiny_llama(), square)
    randomize_ia3(saved)
    peftops.save_adapter(saved, str(tmp_path / "ia3"))
    target = peftops.patch(tiny_llama(), IA3Config(target_modules=["k_proj", "o_proj"], feedforward_modules=[]))
    before = {n: p.clone() for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match="o_proj: file feed-forward"):
        peftops.load_adapter(target, str(tmp_path / "ia3"))
    other = peftops.patch(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="unexpected keys"):
        peftops.load_adapter(other, str(tmp_path / "ia3"))
    lora = peftops.patch(tiny_llama(), peftops.LoraConfig(r=2))
    peftops.save_adapter(lora, str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="LORA adapter"):
        peftops.load_adapter(target, str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="IA3 adapter"):
        peftops.load_adapter(lora, str(tmp_path / "ia3"))
    peft_model = peft.get_peft_model(tiny_llama(), peft_ia3_config(IA3Config(target_modules=["k_proj", "o_proj"],
                                                                             feedforward_modules=[])))
    with pytest.raises(ValueError, match="o_proj: file feed-forward"):
        peftops.load_adapter(peft_model, str(tmp_path / "ia3"))
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())
    config = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["o_proj"]


def test_merged_adapter_is_not_saved(tmp_path):
    model = peftops.patch(tiny_bert(), IA3Config())
    for m in model.modules():
        if isinstance(m, peftops.layers.Ia3Linear):
            m.merge()
    with pytest.raises(ValueError, match="merged"):
        peftops.save_adapter(model, str(tmp_path))


def test_half_precision_model_keeps_float32_vectors_as_peft():
    # peft's autocast_adapter_dtype: IA3 vectors over a bf16 base are float32 parameters, cast for each forward
    base = tiny_llama().to(torch.bfloat16)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config())
    ours = peftops.patch(base, IA3Config())
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in ref.parameters() if p.requires_grad)
    ids = input_ids()
    out = output(ours, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), output(ref, ids).float(), rtol=0.02, atol=0.02)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)


def test_a_base_layer_with_its_own_forward_or_hooks_is_called_as_peft_calls_it():
    # the fused ops (ia3_glu_linear in Llama's MLP too) read the weight and would skip a subclass's forward or a hook
    config = IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours, ref = ia3_pair(lambda: with_own_forwards(tiny_llama()), config)
    with pytest.warns(UserWarning, match=r"base layer \(ScaledLinear\) has a forward of its own or hooks"):
        check_same(ours.train(), ref.train(), ours_to_peft_name)


@pytest.mark.parametrize("feedforward", [False, True])
def test_a_base_weight_made_trainable_gets_its_gradient(feedforward):
    layer = Ia3Linear(nn.Linear(12, 10), feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 12)
    with pytest.warns(UserWarning, match="base weight is trainable"):
        layer(x).square().sum().backward()
    w, l, b = (t.detach().clone().requires_grad_() for t in (layer.base_layer.weight, layer.ia3_l, layer.base_layer.bias))
    y = torch.nn.functional.linear(x * l, w, b) if feedforward else torch.nn.functional.linear(x, w, b) * l.view(-1)
    y.square().sum().backward()
    for ours, ref in ((layer.base_layer.weight, w), (layer.ia3_l, l), (layer.base_layer.bias, b)):
        torch.testing.assert_close(ours.grad, ref.grad)

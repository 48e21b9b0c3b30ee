"""Backend mode: peftops.patch(peft_model) routes peft's LoRA Linear layers through the fused op, keeping peft's
parameters, names and API; outputs and gradients match unpatched peft."""
import copy
import warnings

import pytest
import torch

import peftops
from tiny_models import (ALPHA_PATTERN, BUILDERS, RANK_PATTERN, assert_close, input_ids, loss_of, output,
                         outputs_match_then_backward, randomize_lora, tiny_llama)

peft = pytest.importorskip("peft")


def lora_config(family="llama", **kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    return peft.LoraConfig(fan_in_fan_out=family == "gpt2", **kwargs)


def peft_pair(family="llama", **kwargs):
    """(patched, reference): the same peft model twice, with random LoRA factors; only the first is patched."""
    ref = peft.get_peft_model(BUILDERS[family](), lora_config(family, **kwargs))
    randomize_lora(ref)
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back on a plain LoRA model
        assert peftops.patch(ours) is ours
    return ours, ref


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    fused = peftops.ops.lora_linear

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(peftops.ops, "lora_linear", spy)
    return calls


def check_same(ours, ref, ids=None, rtol=1e-5):
    ref_params = outputs_match_then_backward(ours, ref, ids, rtol)
    assert list(ref_params) == [n for n, _ in ours.named_parameters()]
    for name, p in ours.named_parameters():
        assert p.requires_grad == ref_params[name].requires_grad, name
        if ref_params[name].grad is not None:
            assert_close(p.grad, ref_params[name].grad, rtol, what=f"grad of {name}")
    ours.zero_grad()
    ref.zero_grad()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_matches_peft(family, op_calls):
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "dense"]}
    ours, ref = peft_pair(family, target_modules=targets[family], bias="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_same(ours.train(), ref.train())
    layers = sum(isinstance(m, peft.tuners.lora.layer.Linear) for m in ours.modules())
    assert len(op_calls) == layers > 0
    assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_rank_and_alpha_patterns_match_peft(family, op_calls):
    ours, ref = peft_pair(family, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, use_rslora=True)
    assert len({m.r["default"] for m in ours.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}) >= 2
    check_same(ours.train(), ref.train())
    assert op_calls


def test_dropout_eval_matches_and_train_reproduces():
    ours, ref = peft_pair(lora_dropout=0.2)
    ids = input_ids()
    assert_close(output(ours.eval(), ids), output(ref.eval(), ids), what="eval with dropout")
    ours.train()
    torch.manual_seed(3)
    first = loss_of(output(ours, ids))
    torch.manual_seed(3)
    assert torch.equal(first, loss_of(output(ours, ids)))


def test_several_adapters_set_adapter_and_add_adapter(op_calls):
    ours, ref = peft_pair()
    other = lora_config(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"])
    for model in (ours, ref):
        model.add_adapter("other", other)
        randomize_lora(model, seed=7)
    # add_adapter on the patched model patched the k_proj layers it created (patch again: idempotent, nothing new)
    assert sum("_peftops_saved_forward" in m.__dict__ for m in ours.modules()) == 6
    peftops.patch(ours)
    assert sum("_peftops_saved_forward" in m.__dict__ for m in ours.modules()) == 6
    for model in (ours, ref):
        model.set_adapter("other")
    check_same(ours, ref)
    for model in (ours, ref):  # two adapters active at once: the first fused with the base, the second added
        model.base_model.set_adapter(["default", "other"])
    op_calls.clear()
    check_same(ours, ref)
    assert len(op_calls) == 6


def test_peft_load_adapter_on_new_modules_computes_fused(tmp_path, op_calls):
    # peft's own load_adapter of an adapter on other target modules, on the patched model: its new layers are fused
    # too; unpatch takes the relay off and leaves peft's method
    ours, ref = peft_pair()
    source = peft.get_peft_model(BUILDERS["llama"](), lora_config(target_modules=["k_proj", "o_proj"]))
    randomize_lora(source, seed=5)
    source.save_pretrained(tmp_path)
    for model in (ours, ref):
        model.load_adapter(str(tmp_path), adapter_name="other")
        model.set_adapter("other")
    op_calls.clear()
    check_same(ours, ref)
    assert len(op_calls) == 4  # k_proj and o_proj of both layers
    peftops.unpatch(ours)
    assert "load_adapter" not in ours.__dict__ and "add_adapter" not in ours.__dict__
    check_same(ours, ref)


def test_disable_adapter_and_merged_state():
    ours, ref = peft_pair()
    ids = input_ids()
    with ours.disable_adapter(), ref.disable_adapter():
        base = output(ref, ids)
        assert_close(output(ours, ids), base, what="disabled")
    assert not torch.allclose(output(ours, ids), base)
    ours.base_model.merge_adapter()
    ref.base_model.merge_adapter()
    assert_close(output(ours, ids), output(ref, ids), what="merged adapter")
    ours.base_model.unmerge_adapter()
    ref.base_model.unmerge_adapter()
    check_same(ours, ref, ids)


def test_merge_and_unload():
    ours, ref = peft_pair(family="gpt2")
    ids = input_ids()
    expected = output(ref, ids)
    assert_close(output(ours.merge_and_unload(), ids), expected, what="merge_and_unload")
    ours, _ = peft_pair(family="gpt2")
    merged = peftops.merge(ours)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    assert_close(output(merged, ids), expected, what="peftops.merge")


def test_save_pretrained_round_trip(tmp_path):
    ours, ref = peft_pair()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    saved = peftops.io.read_weights(str(tmp_path / "ours"))
    expected = peftops.io.read_weights(str(tmp_path / "ref"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    peftops.patch(loaded)
    ids = input_ids()
    assert_close(output(loaded, ids), output(ours, ids), what="reloaded")


def test_unpatch_restores_peft_forwards():
    ours, ref = peft_pair()
    assert peftops.unpatch(ours) is ours
    assert not any("forward" in m.__dict__ or "_peftops_saved_forward" in m.__dict__ for m in ours.modules())
    ids = input_ids()
    assert torch.equal(output(ours, ids), output(ref, ids))
    with pytest.raises(ValueError, match="not patched"):
        peftops.unpatch(ours)


def test_deepcopy_of_a_patched_model_uses_its_own_parameters():
    ours, ref = peft_pair()
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.mul_(2)
    ids = input_ids()
    assert_close(output(ours, ids), output(ref, ids), what="original after copy")
    assert not torch.allclose(output(twin, ids), output(ours, ids))


def record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if "peftops" in str(w.message)]


def test_uncovered_option_falls_back_to_peft_with_one_warning(op_calls):
    # DoRA and adapter_names= are fused (test_dora_multi_lora.py); what the ops lack, e.g. a base weight's
    # gradient, runs peft's forward.
    ours, ref = peft_pair()
    for model in (ours, ref):
        for m in model.modules():
            if isinstance(m, peft.tuners.lora.layer.Linear):
                m.base_layer.weight.requires_grad_(True)
    ids = input_ids()
    _, messages = record(lambda: [output(ours, ids) for _ in range(2)])
    assert len(messages) == 1 and "trainable base weight" in messages[0]
    assert not op_calls
    check_same(ours, ref, ids)


@pytest.mark.parametrize("where", ["base_layer", "lora_A", "lora_dropout", "offload"])
def test_layers_whose_modules_run_more_than_forward_fall_back(where):
    # The fused ops read the weights and never call the base layer or the factors: a hook there, or a forward that
    # accelerate's offload puts on the instance (it loads the weight from the meta device), must still run.
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Halve(ModelHook):
        def post_forward(self, module, output):
            return output * 0.5

    ours, ref = peft_pair()
    for model in (ours, ref):
        if where == "offload":
            from accelerate import cpu_offload
            cpu_offload(model.base_model.model, execution_device=torch.device("cpu"))
            continue
        for m in model.modules():
            if isinstance(m, peft.tuners.lora.layer.Linear):
                module = m.base_layer if where == "base_layer" else getattr(m, where)["default"]
                if where == "lora_dropout":  # a plain hook, torch's own kind
                    module.register_forward_hook(lambda mod, args, out: out * 0.5)
                else:
                    add_hook_to_module(module, Halve())
    ids = input_ids()
    _, messages = record(lambda: output(ours, ids))
    assert messages and any(word in messages[0] for word in ("hooks", "meta"))
    assert_close(output(ours, ids), output(ref, ids), 1e-6, what="output")


def test_a_device_hook_that_moves_nothing_keeps_the_fused_op(op_calls):
    # a device_map over several devices puts accelerate's AlignDevicesHook (no offload) on every layer: with x and
    # the weights already on its execution device it would move nothing, so the layer stays fused
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    ours, ref = peft_pair()
    for m in ours.modules():
        if isinstance(m, peft.tuners.lora.layer.Linear):
            for module in (m.base_layer, m.lora_A["default"], m.lora_B["default"]):
                add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    _, messages = record(lambda: check_same(ours, ref))
    assert op_calls and not messages


def test_other_layer_types_keep_peft_forward():
    ref = peft.get_peft_model(tiny_llama(), lora_config(target_modules=["embed_tokens", "q_proj"]))
    randomize_lora(ref)
    ours = copy.deepcopy(ref)
    _, messages = record(lambda: peftops.patch(ours))
    assert len(messages) == 1 and "Embedding" in messages[0]
    check_same(ours, ref)


def test_backend_mode_errors():
    with pytest.raises(ValueError, match="peft.PeftModel"):
        peftops.patch(tiny_llama())
    ours, _ = peft_pair()
    with pytest.raises(ValueError, match="without a config"):
        peftops.patch(ours, peftops.LoraConfig())
    # the transformers model inside it holds peft's layers: adapter mode would stack on them (all-linear would wrap
    # their lora_A and lora_B too)
    inner = ours.base_model.model
    for config in (peftops.LoraConfig(target_modules="all-linear"), peftops.IA3Config(), peftops.BitFitConfig()):
        with pytest.raises(ValueError, match="holds peft adapter layers"):
            peftops.patch(inner, config)
    assert not any(isinstance(m, (peftops.layers.LoraLinear, peftops.layers.Ia3Linear)) for m in inner.modules())


def test_bfloat16_base_with_float32_factors(op_calls):
    # peft keeps the LoRA factors in float32 over a bf16 base; the fused path casts them and stays close to peft.
    ref = peft.get_peft_model(tiny_llama().to(torch.bfloat16), lora_config())
    assert ref.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    randomize_lora(ref)
    ours = copy.deepcopy(ref)
    peftops.patch(ours)
    ids = input_ids()
    out_ours, out_ref = output(ours, ids), output(ref, ids)
    assert op_calls and out_ours.dtype == torch.bfloat16
    torch.testing.assert_close(out_ours.float(), out_ref.float(), rtol=0.05, atol=0.05)
    loss_of(out_ours).backward()
    loss_of(out_ref).backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32
            assert torch.nn.functional.cosine_similarity(p.grad.flatten(), grads[name].flatten(), dim=0) > 0.99, name


def test_trainable_base_weight_falls_back_so_it_gets_its_gradient():
    ours, ref = peft_pair()
    for model in (ours, ref):
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    _, messages = record(lambda: check_same(ours, ref))
    assert len(messages) == 1 and "trainable base weight" in messages[0]


def test_autocast_runs_the_fused_op_like_peft(op_calls):
    ours, ref = peft_pair("llama")
    ids = input_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to peft's forward: inputs that autocast made 16-bit too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ours, out_ref = output(ours, ids), output(ref, ids)
    layers = [m for m in ours.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    assert len(op_calls) == len(layers) > 0, "every LoRA layer ran the fused op under autocast"
    assert_close(out_ours.float(), out_ref.float(), 5e-2, what="bf16 autocast outputs")

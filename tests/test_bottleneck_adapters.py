"""Bottleneck adapters (AdapterConfig) on tiny Llama, GPT-2 and BERT: identity at init, only adapter parameters
train, outputs and gradients equal to a plain-PyTorch re-implementation of AdapterHub's placements
(tests/bottleneck_reference.py), save/load, merge refused, unpatch restores."""
import copy
import json
import math
import os

import pytest
import torch

import peftops
from peftops import AdapterConfig
from peftops.layers import BottleneckAdapter
from peftops.patch.adapter import get_state
from peftops.patch.bottleneck import CHILD, adapter_parameters
from bottleneck_reference import install
from tiny_models import BUILDERS, assert_close, input_ids, loss_of, output, outputs_from_threads

FAMILIES, PLACEMENTS = sorted(BUILDERS), ("pfeiffer", "houlsby", "parallel")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
# Modules that get an adapter, per family and placement, for layer 0 (the tiny models have 2 layers).
WHERE = {
    ("llama", "pfeiffer"): ["model.layers.0"], ("llama", "houlsby"): ["model.layers.0.self_attn", "model.layers.0.mlp"],
    ("llama", "parallel"): ["model.layers.0.mlp"], ("gpt2", "pfeiffer"): ["transformer.h.0"],
    ("gpt2", "houlsby"): ["transformer.h.0.attn", "transformer.h.0.mlp"], ("gpt2", "parallel"): ["transformer.h.0.mlp"],
    ("bert", "pfeiffer"): ["encoder.layer.0.output"],
    ("bert", "houlsby"): ["encoder.layer.0.attention.output", "encoder.layer.0.output"],
    ("bert", "parallel"): ["encoder.layer.0.output"],
}


def randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # std 1/sqrt(fan_in) keeps the adapter's change of the order of h
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def forward_backward(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    loss_of(out).backward()
    return out.detach(), embeds.grad


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_and_only_adapters_train(family, placement):
    model = BUILDERS[family]()
    ids = input_ids()
    before = output(model, ids)
    config = AdapterConfig(bottleneck=4, placement=placement)
    assert peftops.patch(model, config) is model
    assert torch.equal(output(model, ids), before)
    state = get_state(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(adapter_parameters(model, state))
    layers = 2 * (2 if placement == "houlsby" else 1)
    assert peftops.trainable_parameters(model)[0] == layers * (2 * 32 * 4 + 4 + 32)
    assert {n.rpartition("." + CHILD)[0] for n in trained if ".0." in n} == set(WHERE[family, placement])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_gradients_equal_the_reference(family, placement, activation):
    base = BUILDERS[family]()
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    ours = peftops.patch(base, AdapterConfig(bottleneck=5, placement=placement, activation=activation, scale=0.7))
    randomize(ours)
    state = get_state(ours)
    weights = {name: {k: getattr(ours.get_submodule(name), CHILD).get_parameter(k).detach().clone()
                      .requires_grad_(True) for k in ("down", "down_bias", "up", "up_bias")}
               for name in state.layer_names}
    install(ref, placement, weights, activation, 0.7)
    ids = input_ids()
    out, grad_x = forward_backward(ours, ids)
    ref_out, ref_grad_x = forward_backward(ref, ids)
    assert (out - output(BUILDERS[family](), ids)).abs().max() > 1e-2  # the adapters do change the model
    assert_close(out, ref_out, 1e-5, "output")
    assert_close(grad_x, ref_grad_x, 1e-5, "input gradient")
    for name, w in weights.items():
        for k, t in w.items():
            assert_close(getattr(ours.get_submodule(name), CHILD).get_parameter(k).grad, t.grad, 1e-5, f"{name}.{k}")
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, placement, tmp_path):
    config = AdapterConfig(bottleneck=4, placement=placement, activation="gelu", scale=2.0)
    ours = peftops.patch(BUILDERS[family](), config)
    randomize(ours)
    peftops.save_adapter(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_model.safetensors", "bottleneck_config.json"]
    assert json.loads((tmp_path / "bottleneck_config.json").read_text()) == {
        "format": "peftops-bottleneck", "version": 1, "bottleneck": 4, "placement": placement, "activation": "gelu",
        "scale": 2.0, "base_model_name_or_path": None, "model_type": family}
    assert sorted(peftops.io.read_weights(str(tmp_path))) == sorted(
        n for n, p in ours.named_parameters() if p.requires_grad)
    fresh = peftops.patch(BUILDERS[family](), config)
    assert peftops.load_adapter(fresh, str(tmp_path)) is fresh
    ids = input_ids()
    assert torch.equal(output(fresh, ids), output(ours, ids))


@pytest.mark.parametrize("change, match", [
    (dict(placement="houlsby"), "placement"), (dict(bottleneck=8), "bottleneck"), (dict(activation="relu"),
                                                                                  "activation"),
    (dict(scale=1.0), "scale"),
])
def test_load_refuses_other_configs_and_leaves_the_model(change, match, tmp_path):
    config = AdapterConfig(bottleneck=4, placement="pfeiffer", activation="gelu", scale=2.0)
    ours = peftops.patch(BUILDERS["llama"](), config)
    randomize(ours)
    peftops.save_adapter(ours, str(tmp_path))
    other = peftops.patch(BUILDERS["llama"](), AdapterConfig(**{**vars(config), **change}))
    before = _params(other)
    with pytest.raises(ValueError, match=match):
        peftops.load_adapter(other, str(tmp_path))
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())


def test_load_refuses_bad_files_and_leaves_the_model(tmp_path):
    from safetensors.torch import load_file, save_file
    config = AdapterConfig(bottleneck=4)
    ours = peftops.patch(BUILDERS["bert"](), config)
    randomize(ours)
    peftops.save_adapter(ours, str(tmp_path))
    target = peftops.patch(BUILDERS["bert"](), config)
    before = _params(target)

    def refused(exc, match, path=tmp_path):
        with pytest.raises(exc, match=match):
            peftops.load_adapter(target, str(path))
        assert all(torch.equal(before[n], p) for n, p in target.named_parameters())

    refused(FileNotFoundError, "bottleneck_config.json", tmp_path / "nothing")
    gpt2 = peftops.patch(BUILDERS["gpt2"](), config)
    with pytest.raises(ValueError, match="bert model"):
        peftops.load_adapter(gpt2, str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "encoder.layer.1.output.bottleneck_adapter.up"
    save_file({**tensors, key: tensors[key][:, :3].contiguous()}, str(tmp_path / "adapter_model.safetensors"))
    refused(ValueError, "wrong shapes.*layer.1.output.bottleneck_adapter.up")
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / "adapter_model.safetensors"))
    refused(ValueError, "missing keys.*layer.1.output.bottleneck_adapter.up")
    save_file({**tensors, "extra": tensors[key].clone()}, str(tmp_path / "adapter_model.safetensors"))
    refused(ValueError, "unexpected keys.*extra")
    bitfit = tmp_path / "bitfit"
    peftops.save_adapter(peftops.patch(BUILDERS["bert"](), peftops.BitFitConfig()), str(bitfit))
    refused(FileNotFoundError, "bottleneck_config.json", bitfit)
    (tmp_path / "bottleneck_config.json").write_text(json.dumps({"format": "peftops-bitfit", "version": 1}))
    refused(ValueError, "not a peftops-bottleneck version 1 file")


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_is_refused_and_unpatch_restores(family, placement):
    model = BUILDERS[family]()
    model.get_input_embeddings().weight.requires_grad_(False)  # a flag unpatch must restore as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys, ids = list(model.state_dict()), input_ids()
    before = output(model, ids)
    peftops.patch(model, AdapterConfig(bottleneck=4, placement=placement))
    randomize(model)
    assert not torch.equal(output(model, ids), before)
    with pytest.raises(ValueError, match="bottleneck adapters cannot be merged"):
        peftops.merge(model)
    assert peftops.unpatch(model) is model
    assert list(model.state_dict()) == keys and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(CHILD in n or "_peftops" in str(vars(m).keys()) for n, m in model.named_modules())
    assert torch.equal(output(model, ids), before)
    peftops.patch(model, AdapterConfig(bottleneck=4))  # patchable again after unpatch


def test_patching_twice_and_unsupported_models_are_clear_errors():
    model = peftops.patch(BUILDERS["llama"](), AdapterConfig(bottleneck=4))
    with pytest.raises(ValueError, match="already patched"):
        peftops.patch(model, AdapterConfig(bottleneck=4))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Llama, GPT-2 and BERT"):
        peftops.patch(plain, AdapterConfig(bottleneck=2))
    assert all(p.requires_grad for p in plain.parameters())


def test_training_step_moves_the_adapter_only():
    model = peftops.patch(BUILDERS["gpt2"](), AdapterConfig(bottleneck=4, placement="parallel"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = input_ids()
    before = output(model, ids).detach()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_of(output(model, ids)).backward()
    opt.step()
    assert not torch.allclose(output(model, ids), before)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pfeiffer_on_pre_ln_layers_keeps_no_copy_of_the_layer_output(family):
    # The adapter on a pre-LN layer's output keeps that output (which the next norm keeps anyway) in place of its
    # input: per layer, the [tokens, hidden] input is not kept; outputs and gradients are unchanged.
    from peftops.profiling import saved_bytes
    model = peftops.patch(BUILDERS[family](), AdapterConfig(bottleneck=4, placement="pfeiffer"))
    randomize(model)
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert adapters and all(a.save_output for a in adapters)
    ids = input_ids()
    results = {}
    for keep_output in (True, False):
        for a in adapters:
            a.save_output = keep_output
        model.zero_grad()
        out, saved = saved_bytes(lambda: output(model, ids), exclude=list(model.parameters()))
        loss_of(out).backward()
        results[keep_output] = out, saved, [a.up.grad.clone() for a in adapters] + [a.down.grad.clone() for a in adapters]
    (out, saved, grads), (out_h, saved_h, grads_h) = results[True], results[False]
    assert torch.equal(out, out_h)
    for g, g_h in zip(grads, grads_h):
        assert_close(g, g_h, 1e-5, "adapter grad")
    hidden = model.config.hidden_size
    assert saved_h - saved == len(adapters) * ids.numel() * hidden * 4


def test_pfeiffer_output_saving_holds_under_autocast_and_stays_off_in_16_bit():
    # The input's recovery in backward is never autocast (forward outside a region, backward inside); a 16-bit
    # model keeps the input instead (the output's rounding would carry into it).
    model = peftops.patch(BUILDERS["llama"](), AdapterConfig(bottleneck=4, placement="pfeiffer"))
    randomize(model)
    ids = input_ids()
    loss_of(output(model, ids)).backward()
    expected = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            loss = loss_of(output(model, ids))
        loss.backward()
    for g, e in zip([p.grad for p in model.parameters() if p.requires_grad], expected):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6)  # the model's own backward ran under autocast
    from peftops.profiling import saved_bytes
    half = model.to(torch.bfloat16)
    adapters = [m for m in half.modules() if isinstance(m, BottleneckAdapter)]
    saved = []
    for flag in (True, False):
        for a in adapters:
            a.save_output = flag
        saved.append(saved_bytes(lambda: output(half, ids), exclude=list(half.parameters()))[1])
    assert saved[0] == saved[1]


def test_parallel_on_gemma_style_layers_reads_the_mlp_norms_input():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    peftops.patch(model, AdapterConfig(bottleneck=4, placement="parallel"))
    assert [n.rsplit(".", 1)[-1] for n in get_state(model).relay_names] == ["pre_feedforward_layernorm"] * 2


def test_parallel_on_a_moe_block_that_returns_router_logits():
    # transformers 4.57's Qwen2-MoE block returns (hidden, router_logits): the adapter goes on the hidden states
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2)).eval()
    if isinstance(model.model.layers[0].mlp(torch.randn(1, 2, 32)), torch.Tensor):
        pytest.skip("this transformers' MoE block returns a tensor (4.57's, run by CI's interop leg, a tuple)")
    ids = input_ids(vocab=100)
    before = output(model, ids)
    peftops.patch(model, AdapterConfig(bottleneck=4, placement="parallel"))
    assert torch.equal(output(model, ids), before)  # the identity at init
    randomize(model)
    assert not torch.equal(output(model, ids), before)
    loss_of(output(model, ids)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_placement_whose_module_a_layer_lacks_is_refused_before_any_change():
    # StableLM with a parallel residual has no norm between attention and MLP (post_attention_layernorm = None)
    from transformers import StableLmConfig, StableLmForCausalLM
    model = StableLmForCausalLM(StableLmConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               use_parallel_residual=True))
    with pytest.raises(ValueError, match="parallel bottleneck adapters need post_attention_layernorm"):
        peftops.patch(model, AdapterConfig(bottleneck=4, placement="parallel"))
    assert all(p.requires_grad for p in model.parameters())
    peftops.patch(model, AdapterConfig(bottleneck=4, placement="houlsby"))  # which that layer has


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("attention_bias", [False, True])
def test_houlsby_on_llama_attention_keeps_the_projection_input(monkeypatch, activation, attention_bias):
    # o_proj runs the attention's adapter and backward keeps o_proj's input (the attention output, which SDPA keeps
    # anyway) instead of h: per layer one [tokens, hidden] tensor less, and the same outputs and gradients as the
    # adapter on the attention's output. An attention with an o_proj bias exercises its term in the down
    # projection's weight gradient.
    import importlib
    bottleneck = importlib.import_module("peftops.patch.bottleneck")  # (peftops.patch is the function)
    from transformers import LlamaConfig, LlamaForCausalLM
    from peftops.profiling import saved_bytes

    def build(fused):
        monkeypatch.setattr(bottleneck, "_PLAIN_OUTPUT_ATTENTIONS", bottleneck._PLAIN_OUTPUT_ATTENTIONS if fused else ())
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, attention_bias=attention_bias,
                                             attn_implementation="sdpa"))
        peftops.patch(model, AdapterConfig(bottleneck=4, placement="houlsby", activation=activation))
        randomize(model)
        if attention_bias:  # (transformers initialises biases to zero)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.o_proj.bias.copy_(torch.randn(32, generator=g))
        return model

    fused, plain = build(True), build(False)
    assert all(bottleneck.is_replaced(layer.self_attn.o_proj) and not bottleneck.is_replaced(layer.self_attn)
               for layer in fused.model.layers)
    assert not any(bottleneck.is_replaced(layer.self_attn.o_proj) for layer in plain.model.layers)
    ids = input_ids(vocab=64)
    results = []
    for model in (fused, plain):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out, saved = saved_bytes(lambda: model(inputs_embeds=embeds).logits, exclude=list(model.parameters()))
        loss_of(out).backward()
        results.append((out.detach(), saved, embeds.grad, {n: p.grad for n, p in model.named_parameters()
                                                          if p.requires_grad}))
    (out, saved, dx, grads), (out_p, saved_p, dx_p, grads_p) = results
    assert_close(out, out_p, 1e-5, "output")
    assert_close(dx, dx_p, 1e-5, "input grad")
    assert grads.keys() == grads_p.keys() and len(grads) == 2 * 2 * 4
    for name in grads:
        assert_close(grads[name], grads_p[name], 1e-5, name)
    # one h per layer (2 layers, hidden 32, float32); torch 2.6's CPU SDPA does not keep its output, so there o_proj's
    # input costs what h saves
    one_h_per_layer = 2 * ids.numel() * 32 * 4
    assert saved_p - saved == one_h_per_layer or (torch.__version__ < "2.14" and saved_p == saved)
    peftops.unpatch(fused)
    assert not any(CHILD in vars(m) or bottleneck.is_replaced(m) for m in fused.modules())


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_adapters_are_float32_over_a_bfloat16_model(placement):
    # as peft's adapters and peftops' LoRA: float32 parameters, cast to the model's dtype in each forward, so that a
    # small optimizer step is not rounded away; the outputs stay close to the float32 model's with the same weights
    model = peftops.patch(BUILDERS["llama"](), AdapterConfig(bottleneck=4, placement=placement))
    randomize(model)
    ids = input_ids()
    expected = output(model, ids)
    half = model.to(torch.bfloat16)
    for m in half.modules():
        if isinstance(m, BottleneckAdapter):
            m.float()
    trained = [p for p in half.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    out = output(half, ids)
    assert out.dtype == torch.bfloat16 and (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
    loss_of(out).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    fresh = peftops.patch(BUILDERS["llama"]().to(torch.bfloat16), AdapterConfig(bottleneck=4, placement=placement))
    assert all(p.dtype == torch.float32 for p in fresh.parameters() if p.requires_grad)


def test_the_projected_adapter_runs_on_the_meta_device():
    # shape inference (device="meta") has no autocast state to ask about
    adapter = BottleneckAdapter(8, 4).to("meta")
    x, w = torch.empty(2, 3, 6, device="meta"), torch.empty(8, 6, device="meta")
    assert adapter.projected(x, w, None).shape == (2, 3, 8)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_parallel_adapter_serves_threads_and_survives_export(family):
    # the pre-LN norm hands its input to the MLP's adapter: a slot per thread, read through the norm itself
    model = peftops.patch(BUILDERS[family](), AdapterConfig(bottleneck=8, placement="parallel"))
    randomize(model)
    model.eval()
    inputs = [torch.randint(64, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        serial = [output(model, ids) for ids in inputs]
    results = outputs_from_threads([lambda i=i: output(model, inputs[i]) for i in range(4)], 5)
    assert all(len(results[i]) == 5 and all(torch.equal(y, serial[i]) for y in results[i]) for i in range(4))
    try:
        torch.export.export(BUILDERS[family]().eval(), (), {"input_ids": inputs[0], "use_cache": False})
    except Exception as e:  # transformers 4.57's causal masks use vmap over .item(), which torch 2.6 cannot trace
        pytest.skip(f"this torch and transformers cannot export the unpatched model: {str(e).splitlines()[0][:80]}")
    program = torch.export.export(model, (), {"input_ids": inputs[0], "use_cache": False})
    assert_close(program.module()(input_ids=inputs[0], use_cache=False).logits, serial[0], 1e-5, "exported")
    with torch.no_grad():
        assert torch.equal(output(model, inputs[1]), serial[1])  # the model itself still runs after the export

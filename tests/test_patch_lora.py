"""Adapter mode: peftops.patch with a LoraConfig against peft on the same weights, and its error paths."""
import copy
import math

import pytest
import torch
from torch import nn

import peftops
from peftops import LoraConfig
from peftops.layers import LoraLinear
from tiny_models import (ALPHA_PATTERN, BUILDERS, RANK_PATTERN, assert_close, input_ids, loss_of, minilm, output,
                         ours_to_peft_name, patched_pair, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama,
                         with_own_forwards)

peft = pytest.importorskip("peft")


def frozen(layer: nn.Module) -> nn.Module:
    """A base layer as peftops.patch leaves it (a trainable weight would take the unfused path)."""
    return layer.requires_grad_(False)


def check_against_peft(ours, ref, ids, rtol=1e-5):
    """Outputs, every trainable parameter's gradient, and the set of trainable parameters match peft's."""
    out_ours, out_ref = output(ours, ids), output(ref, ids)
    assert_close(out_ours, out_ref, rtol, what="outputs")
    loss_of(out_ours).backward()
    loss_of(out_ref).backward()
    ref_params = dict(ref.named_parameters())
    trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert {ours_to_peft_name(n) for n, p in ours.named_parameters() if p.requires_grad} == trainable
    for name, p in ours.named_parameters():
        ref_grad = ref_params[ours_to_peft_name(name)].grad
        if p.requires_grad and ref_grad is not None:  # None: unused by the output (e.g. BERT's pooler)
            assert_close(p.grad, ref_grad, rtol, what=f"grad of {name}")
        else:
            assert p.grad is None, name
    assert any(p.grad is not None for n, p in ours.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("config", [
    LoraConfig(r=4, alpha=8), LoraConfig(r=3, alpha=5, use_rslora=True, bias="all"),
    LoraConfig(r=2, alpha=4, bias="lora_only"),
    LoraConfig(r=4, alpha=8, use_rslora=True, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN),
], ids=["plain", "rslora-all", "lora_only", "patterns-rslora"])
def test_matches_peft(family, config):
    ours, ref = patched_pair(BUILDERS[family], config)
    check_against_peft(ours.train(), ref.train(), input_ids())


def lora_layers(model) -> dict:
    """Module name in the transformers model -> LoRA layer, of ours or of a peft model."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, (LoraLinear, peft.tuners.lora.LoraLayer))}


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_pick_the_layers_peft_picks(family, use_rslora):
    config = LoraConfig(r=4, alpha=8, use_rslora=use_rslora, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    ours, ref = patched_pair(BUILDERS[family], config)
    peft_layers, ours_layers = lora_layers(ref), lora_layers(ours)
    assert ours_layers.keys() == peft_layers.keys()
    for name, layer in ours_layers.items():
        assert (layer.r, layer.scaling) == (peft_layers[name].r["default"], peft_layers[name].scaling["default"]), name
        assert layer.lora_A.shape[0] == layer.r
    # the patterns took effect (q_proj|query only where such layers exist), and some layers kept r and alpha
    assert {layer.r for layer in ours_layers.values()} == ({2, 4} if family == "gpt2" else {2, 4, 6})
    assert len({layer.scaling for layer in ours_layers.values()}) >= 2


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("exclude", [["k_proj", "mlp.c_proj", "attention.output.dense"], r".*\.0\..*"],
                         ids=["list", "regex"])
def test_exclude_modules_as_peft(family, exclude):
    ours, ref = patched_pair(BUILDERS[family], LoraConfig(target_modules="all-linear", exclude_modules=exclude))
    adapted = lora_layers(ours).keys()
    assert adapted == lora_layers(ref).keys()
    everything = lora_layers(peftops.patch(BUILDERS[family](), LoraConfig(target_modules="all-linear"))).keys()
    assert adapted and adapted < everything  # some layers left out, some adapted
    check_against_peft(ours.train(), ref.train(), input_ids())


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("layers", [dict(layers_to_transform=1, layers_pattern=["layers", "h", "layer"]),
                                    dict(layers_to_transform=[0])], ids=["index-patterns", "list"])
def test_layers_to_transform_as_peft(family, layers):
    ours, ref = patched_pair(BUILDERS[family], LoraConfig(**layers))
    adapted = lora_layers(ours).keys()
    assert adapted == lora_layers(ref).keys()
    index = layers["layers_to_transform"]
    assert adapted and all(f".{index if isinstance(index, int) else index[0]}." in n for n in adapted)
    check_against_peft(ours.train(), ref.train(), input_ids())
    with pytest.raises(ValueError, match=r"match no module that layers_to_transform \[7\] leave"):
        peftops.patch(BUILDERS[family](), LoraConfig(layers_to_transform=[7]))


def test_exclude_modules_that_match_nothing_warn_and_that_leave_nothing_raise():
    with pytest.warns(UserWarning, match=r"exclude_modules \['c_fc'\] match no module"):
        peftops.patch(tiny_llama(), LoraConfig(exclude_modules=["c_fc"]))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] match no module that exclude_modules"):
        peftops.patch(model, LoraConfig(target_modules=["q_proj"], exclude_modules=r".*"))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_a_pattern_that_matches_no_target_warns_as_peft():
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['c_attn'\] match no targeted module"):
        peftops.patch(tiny_llama(), LoraConfig(rank_pattern={"c_attn": 2, "q_proj": 2}))


def test_a_base_weight_made_trainable_gets_its_gradient():
    # The ops never give the frozen base weight a gradient; a layer whose base weight the user unfreezes runs peft's
    # formulas in plain PyTorch (warned), so the weight gets the gradient that peft gives it (DoRA: in
    # test_dora_multi_lora.py).
    ours, ref = patched_pair(tiny_llama, LoraConfig(r=4, alpha=8))
    name = "model.layers.0.self_attn.q_proj.base_layer.weight"
    ours.get_parameter(name).requires_grad_(True)
    ref.get_parameter(ours_to_peft_name(name)).requires_grad_(True)
    with pytest.warns(UserWarning, match="base weight is trainable"):
        check_against_peft(ours.eval(), ref.eval(), input_ids())
    assert ours.get_parameter(name).grad.abs().sum() > 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_base_layer_with_its_own_forward_or_hooks_is_called_as_peft_calls_it(use_dora):
    # a fused op reads the weight and never calls the base layer: a subclass's forward, or a hook, would be skipped
    config = LoraConfig(r=4, alpha=8, use_dora=use_dora, target_modules=["q_proj", "v_proj", "down_proj", "k_proj"])
    ours, ref = patched_pair(lambda: with_own_forwards(tiny_llama()), config)
    with pytest.warns(UserWarning, match=r"base layer \(ScaledLinear\) has a forward of its own or hooks"):
        check_against_peft(ours, ref, input_ids())
    ops_calls = []
    fused = peftops.ops.dora_linear if use_dora else peftops.ops.lora_linear
    layer = ours.model.layers[0].self_attn.k_proj  # a plain one stays fused
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peftops.ops, fused.__name__, lambda *a, **k: ops_calls.append(1) or fused(*a, **k))
        layer(torch.randn(2, layer.in_features))
        ours.model.layers[0].self_attn.q_proj(torch.randn(2, layer.in_features))
    assert len(ops_calls) == 1


def test_matches_peft_on_every_linear_by_regex():
    # A regex target (full match, as peft) over all of Llama's projections, the MLP included.
    config = LoraConfig(r=4, alpha=16, target_modules=r".*\.(q|k|v|o|gate|up|down)_proj")
    ours, ref = patched_pair(tiny_llama, config)
    assert sum(isinstance(m, LoraLinear) for m in ours.modules()) == 14
    check_against_peft(ours, ref, input_ids())


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_all_linear_as_peft(family):
    # peft's "all-linear": every Linear / Conv1D but the output layer; the same modules, outputs and gradients
    ours, ref = patched_pair(BUILDERS[family], LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    adapted = {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    assert adapted and not any("lm_head" in n for n in adapted)
    check_against_peft(ours, ref, input_ids())


def test_matches_peft_on_pretrained_minilm():
    config = LoraConfig(r=8, alpha=16, target_modules=["query", "key", "value", "dense"])
    ours, ref = patched_pair(minilm, config)
    # Six pretrained 384-wide layers: float32 rounding of two summation orders grows to ~3e-5 in the first layer's
    # gradients (in float64 the two agree to 1e-13).
    check_against_peft(ours, ref, input_ids(vocab=30522, seq=9), rtol=1e-4)


def test_gpt2_conv1d_layer_uses_transposed_weight():
    ours = peftops.patch(tiny_gpt2(), LoraConfig(r=2, alpha=2))
    layer = ours.transformer.h[0].attn.c_attn
    randomize_lora(layer)
    x = torch.randn(3, 5, 32)
    w = layer.base_layer.weight  # Conv1D: [in, out]
    expected = x @ w + layer.base_layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T)
    assert_close(layer(x), expected, what="Conv1D LoRA")
    assert (layer.in_features, layer.out_features) == (32, 96)


def test_init_as_peft():
    layer = LoraLinear(frozen(nn.Linear(40, 24)), r=4, scaling=2.0)
    assert layer.lora_A.shape == (4, 40) and layer.lora_B.shape == (24, 4)
    assert torch.all(layer.lora_B == 0)
    bound = 1 / math.sqrt(40)  # kaiming_uniform_(a=sqrt(5)) on fan_in 40
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    x = torch.randn(2, 40)
    assert_close(layer(x), layer.base_layer(x), what="identity at init")


def test_scaling():
    assert LoraConfig(r=4, alpha=8).scaling == 2.0
    assert LoraConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0
    model = peftops.patch(tiny_llama(), LoraConfig(r=16, alpha=8, use_rslora=True))
    assert model.model.layers[0].self_attn.q_proj.scaling == 2.0


def test_default_targets_per_family():
    for family, names in {"llama": {"q_proj", "v_proj"}, "gpt2": {"c_attn"}, "bert": {"query", "value"}}.items():
        model = peftops.patch(BUILDERS[family](), LoraConfig())
        assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLinear)} == names


def test_any_model_by_module_name():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    peftops.patch(model, LoraConfig(r=2, target_modules=["0", "2"]))
    assert isinstance(model[0], LoraLinear) and isinstance(model[2], LoraLinear)
    assert peftops.trainable_parameters(model) == (2 * (6 + 8) + 2 * (8 + 3), 6 * 8 + 8 + 8 * 3 + 3 + 50)


@pytest.mark.parametrize("technique", ["lora", "ia3"])
def test_torch_transformer_encoder(technique):
    # torch's TransformerEncoderLayer reads linear1.weight / linear2.bias itself (its inference fast path): the wrapped
    # layers expose the base layer's, as peft's do, and that fast path (and the encoder's nested-tensor one for padded
    # batches) must not bypass the adapter. nn.MultiheadAttention never calls its out_proj (it reads the weight), so
    # adapting it would do nothing: a clear error, and "all-linear" leaves it out.
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    x, pad = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    config = (LoraConfig(r=2, target_modules=["linear1", "linear2"]) if technique == "lora" else
              peftops.IA3Config(target_modules=["linear1", "linear2"], feedforward_modules=["linear2"]))
    peftops.patch(model, config)
    layer = model.layers[0].linear1
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert (layer.in_features, layer.out_features) == (16, 32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_()
    expected = model.train()(x), model(x, src_key_padding_mask=pad)  # the training path: no fast path
    with torch.no_grad():
        got = model.eval()(x), model(x, src_key_padding_mask=pad)
    assert_close(got[0], expected[0], what="eval")
    assert_close(got[1][:, :3], expected[1][:, :3], what="eval, padded")
    peftops.unpatch(model)
    assert model.use_nested_tensor and not model.layers[0].linear1._forward_pre_hooks
    with pytest.raises(ValueError, match="out_proj"):
        peftops.patch(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1),
                      LoraConfig(r=2, target_modules=["out_proj"]))
    model = peftops.patch(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1),
                          LoraConfig(r=2, target_modules="all-linear"))
    assert {n for n, m in model.named_modules() if isinstance(m, LoraLinear)} == {"layers.0.linear1",
                                                                                   "layers.0.linear2"}


@pytest.mark.parametrize("field,value", [("r", 0), ("bias", "bogus"), ("dropout", 1.0)])
def test_config_changed_after_construction_is_validated_again(field, value):
    config = LoraConfig()
    setattr(config, field, value)
    model = tiny_llama()
    with pytest.raises(ValueError, match=field):
        peftops.patch(model, config)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_trainable_parameters():
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    assert peftops.trainable_parameters(model) == (total, total)
    peftops.patch(model, LoraConfig(r=4))
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 16))  # q_proj 32->32 and v_proj 32->16 (2 kv heads) in 2 layers
    assert peftops.trainable_parameters(model) == (lora, total + lora)
    peftops.unpatch(model)
    assert peftops.trainable_parameters(model) == (total, total)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_unpatch_restores_exactly(family):
    model = BUILDERS[family]()
    first = next(model.parameters())
    first.requires_grad_(False)  # a user's own freezing must survive too
    types = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = input_ids()
    before = output(model, ids).detach()
    peftops.patch(model, LoraConfig(r=4, bias="all"))
    randomize_lora(model)
    assert not torch.equal(output(model, ids), before)
    assert peftops.unpatch(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(output(model, ids), before)
    peftops.patch(model, LoraConfig(r=2))  # patchable again after unpatch


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_merge_matches_unmerged(family):
    model = peftops.patch(BUILDERS[family](), LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    ids = input_ids()
    unmerged = output(model, ids).detach()
    merged = peftops.merge(model)
    assert merged is model and not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert_close(output(model, ids), unmerged, what="merged")


def test_layer_merge_then_forward_is_base_only():
    layer = LoraLinear(frozen(nn.Linear(5, 7)), r=2, scaling=0.5)
    randomize_lora(layer)
    x = torch.randn(4, 5)
    before = layer(x)
    base = layer.merge()
    assert layer.merged and base is layer.base_layer
    assert_close(layer(x), before, what="after merge")
    assert_close(base(x), before, what="merged base")


def test_dropout_is_reproducible_under_manual_seed():
    model = peftops.patch(tiny_llama(), LoraConfig(r=4, dropout=0.3)).train()
    randomize_lora(model)
    ids = input_ids()

    def loss(seed):
        torch.manual_seed(seed)
        value = loss_of(output(model, ids))
        value.backward()
        grad = model.model.layers[0].self_attn.q_proj.lora_A.grad.clone()
        model.zero_grad()
        return value.detach(), grad

    (l1, g1), (l2, g2), (l3, _) = loss(0), loss(0), loss(1)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert not torch.equal(l1, l3)
    model.eval()  # eval mode: dropout off, deterministic whatever the seed
    torch.manual_seed(5)
    e1 = output(model, ids)
    torch.manual_seed(6)
    assert torch.equal(e1, output(model, ids))


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=2.5), "r"), (dict(r=True), "r"), (dict(alpha=-1), "alpha"),
    (dict(alpha=float("nan")), "alpha"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(bias="some"), "bias"), (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="(["), "target_modules"), (dict(target_modules=[""]), "target_modules"),
    (dict(target_modules=3), "target_modules"),
    (dict(use_rslora="yes"), "use_rslora"), (dict(use_dora=1), "use_dora"),
    (dict(rank_pattern=["q_proj"]), "rank_pattern"), (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(rank_pattern={"q_proj": 2.0}), "rank_pattern"), (dict(rank_pattern={"([": 2}), "rank_pattern"),
    (dict(rank_pattern={"": 2}), "rank_pattern"), (dict(alpha_pattern={"v_proj": float("inf")}), "alpha_pattern"),
    (dict(alpha_pattern={3: 8}), "alpha_pattern"), (dict(exclude_modules=3), "exclude_modules"),
    (dict(exclude_modules="(["), "exclude_modules"), (dict(exclude_modules=[""]), "exclude_modules"),
    (dict(layers_to_transform=-1), "layers_to_transform"), (dict(layers_to_transform="0"), "layers_to_transform"),
    (dict(layers_to_transform=[0, True]), "layers_to_transform"), (dict(layers_pattern=3), "layers_pattern"),
    (dict(layers_pattern="layers"), "layers_pattern"),
    (dict(target_modules="all-linear", layers_to_transform=0), "layers_to_transform"),
])
def test_bad_config_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("cls, kwargs, field", [
    (peftops.PrefixConfig, dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (peftops.AdapterConfig, dict(bottleneck=-1), "bottleneck"),
    (peftops.AdapterConfig, dict(placement="middle"), "placement"),
    (peftops.AdapterConfig, dict(activation="tanh"), "activation"),
    (peftops.AdapterConfig, dict(scale=float("inf")), "scale"),
    (peftops.BitFitConfig, dict(train_norm_bias=1), "train_norm_bias"),
    (peftops.IA3Config, dict(target_modules=["k"], feedforward_modules=["fc"]), "feedforward_modules"),
])
def test_bad_other_config_values(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        cls(**kwargs)


@pytest.mark.parametrize("targets, named", [
    (["nope"], "nope"), (["q_proj", "nope"], "nope"), ("model\\.nothing.*", "nothing"),
    (["embed_tokens"], "embed_tokens"), (["self_attn"], "LlamaAttention"), (r".*layers\.0\.mlp.*", "LlamaMLP"),
])
def test_bad_targets_leave_model_untouched(targets, named):
    model = tiny_llama()
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=named):
        peftops.patch(model, LoraConfig(target_modules=targets))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(p.requires_grad for p in model.parameters())


def test_errors_on_models_that_contradict_the_config():
    with pytest.raises(ValueError, match="no default for model type"):
        peftops.patch(nn.Sequential(nn.Linear(3, 3)), LoraConfig())
    conv = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"0 \(Conv2d\)"):
        peftops.patch(conv, LoraConfig(target_modules=["0"]))
    quantized = nn.Sequential(nn.Linear(3, 3))
    quantized[0].weight = nn.Parameter(torch.ones(3, 3, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"0 \(torch.int8\)"):
        peftops.patch(quantized, LoraConfig(target_modules=["0"]))
    with pytest.raises(TypeError, match="config"):
        peftops.patch(tiny_llama(), {"r": 4})
    with pytest.raises(ValueError, match="adapter_name"):
        peftops.patch(tiny_llama(), LoraConfig(), adapter_name="")


def test_double_patch_is_a_clear_error_never_a_double_adapter():
    model = peftops.patch(tiny_llama(), LoraConfig(r=4))
    count = sum(isinstance(m, LoraLinear) for m in model.modules())
    with pytest.raises(ValueError, match="already patched"):
        peftops.patch(model, LoraConfig(r=4))
    with pytest.raises(ValueError, match="already holds modules that peftops patched"):
        peftops.patch(model.model, LoraConfig(r=4, target_modules=["q_proj"]))  # a submodule of a patched model
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == count
    assert not any(isinstance(m.base_layer, LoraLinear) for m in model.modules() if isinstance(m, LoraLinear))


@pytest.mark.parametrize("first,second", [
    (peftops.PrefixConfig(3), peftops.PrefixConfig(3)),  # a second position shift and prefix
    (peftops.BitFitConfig(), peftops.IA3Config()),       # IA3 would freeze BitFit's biases
    (peftops.AdapterConfig(bottleneck=4), LoraConfig(r=2)),
    (peftops.IA3Config(), peftops.AdapterConfig(bottleneck=4))])
def test_a_submodule_or_parent_of_a_patched_model_is_refused(first, second):
    for outer_first in (True, False):
        model = tiny_gpt2()
        inner = model.transformer
        peftops.patch(model if outer_first else inner, first)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        flags = [p.requires_grad for p in model.parameters()]
        with pytest.raises(ValueError, match="already"):
            peftops.patch(inner if outer_first else model, second)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unpatch_and_merge_need_a_patched_model():
    with pytest.raises(ValueError, match="not patched"):
        peftops.unpatch(tiny_bert())
    with pytest.raises(ValueError, match="nothing to merge"):
        peftops.merge(tiny_bert())


def test_autocast_casts_like_nn_linear():
    layer = LoraLinear(frozen(nn.Linear(16, 8)), r=2, scaling=1.0)
    randomize_lora(layer)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = layer.base_layer(x) + x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("use_dora", [False, True])
def test_half_precision_model_keeps_float32_adapters_as_peft(use_dora):
    # peft's autocast_adapter_dtype: adapters over a bf16 base are float32 parameters, cast for each forward
    import peft
    base = tiny_llama().to(torch.bfloat16)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora))
    ours = peftops.patch(base, LoraConfig(r=4, alpha=8, use_dora=use_dora))
    ref_dtypes = {n.replace(".default.weight", "").replace(".default", "").replace("base_model.model.", ""): p.dtype
                  for n, p in ref.named_parameters() if p.requires_grad}
    ours_dtypes = {n: p.dtype for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_dtypes == ref_dtypes and set(ours_dtypes.values()) == {torch.float32}
    randomize_lora(ours)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                ref_params[ours_to_peft_name(name)].copy_(p)
    ids = input_ids()
    out = output(ours, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), output(ref, ids).float(), rtol=0.05, atol=0.05)
    loss_of(out).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in ours.named_parameters()
               if "lora_B" in n)
    # merged as peft merges: the delta (and DoRA's norms) in float32, rounded into the bf16 weight once
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "magnitude" in name:
                p.mul_(1.5)
                ref_params[ours_to_peft_name(name)].copy_(p)
    merged, ref_merged = peftops.merge(ours), ref.merge_and_unload()
    for (name, w), (_, w_ref) in zip(merged.named_parameters(), ref_merged.named_parameters()):
        assert torch.equal(w, w_ref), name


def test_a_trainable_base_weight_compiles_with_fullgraph():
    # the unfused path's warning is not traced (dynamo cannot), so torch.compile(fullgraph=True) still works
    layer = LoraLinear(nn.Linear(6, 5), r=2, scaling=1.0)
    randomize_lora(layer)
    x = torch.randn(3, 6)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    with pytest.warns(UserWarning, match="base weight is trainable"):
        layer(x).square().sum().backward()
    for g, p in zip(got, layer.parameters()):
        assert_close(g, p.grad, what="grad")


@pytest.mark.parametrize("config", [LoraConfig(r=2), peftops.IA3Config(), peftops.AdapterConfig(bottleneck=4),
                                    peftops.PrefixConfig(3)], ids=lambda c: type(c).__name__)
def test_unpatch_restores_flags_of_parameters_replaced_since(config):
    # load_state_dict(assign=True) (or model.to("meta")) puts new parameter objects in place: unpatch restores
    # requires_grad by name
    model = tiny_llama()
    model.lm_head.requires_grad_(False)  # a pattern of the user's own
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    peftops.patch(model, config)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    peftops.unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_unpatch_after_the_user_patched_a_disjoint_submodule():
    # a submodule peftops did not touch may be patched on its own; unpatching the outer model first still restores
    # every flag it recorded, one that the inner patch renamed (down_proj's weight) by the parameter itself
    model = peftops.patch(tiny_llama(), peftops.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]))
    mlp = model.model.layers[0].mlp
    peftops.patch(mlp, LoraConfig(r=2, target_modules=["down_proj"]))
    peftops.unpatch(model)  # while the inner patch holds down_proj under another name
    assert all(p.requires_grad for n, p in model.named_parameters() if ".mlp." not in n)
    assert mlp.down_proj.base_layer.weight.requires_grad  # found by the parameter itself
    peftops.unpatch(mlp)  # back to the flags it found (the outer patch's frozen ones)
    assert type(mlp.down_proj) is nn.Linear


def test_a_bottleneck_adapter_built_into_a_model_is_not_a_patch():
    from peftops.layers import BottleneckAdapter
    model = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 2), nn.Linear(8, 4))
    peftops.patch(model, LoraConfig(r=2, target_modules=["0", "2"]))
    assert isinstance(model[0], LoraLinear)


def test_all_linear_says_what_it_leaves_of_fused_moe_experts():
    # transformers 5 keeps a MoE block's experts as 3-D weights, which peft's "all-linear" adapts through
    # target_parameters and peftops does not: a warning says so (4.57's experts are nn.Linear, adapted, no warning)
    import warnings
    from transformers import MixtralConfig, MixtralForCausalLM
    model = MixtralForCausalLM(MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2))
    fused = any(p.dim() == 3 for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftops.patch(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert any("fused MoE expert weights" in str(w.message) for w in caught) == fused


def test_a_tied_lm_head_target_declares_the_tie(tmp_path):
    # GPT-2's head is tied to its input embeddings: wrapped, its weight is declared tied under its new name, so that
    # save_pretrained keeps one copy (transformers refuses undeclared shared tensors); patching warns, as peft does,
    # that merging into it would change the embeddings too
    def patched():
        with pytest.warns(UserWarning, match="lm_head's weight is tied to transformer.wte.weight"):
            return peftops.patch(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "lm_head"]))

    model = patched()
    assert model.lm_head.base_layer.weight is model.transformer.wte.weight
    randomize_lora(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "model.safetensors")
    assert "lm_head.base_layer.weight" not in saved and "transformer.wte.weight" in saved
    again = patched()
    assert again.load_state_dict(saved, strict=False).missing_keys == ["lm_head.base_layer.weight"]
    ids = input_ids()
    assert torch.equal(output(again, ids), output(model, ids))
    with pytest.warns(UserWarning, match="changes transformer.wte.weight too"):
        peftops.merge(model)

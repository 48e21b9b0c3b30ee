"""Prefix tuning (PrefixConfig) against peft's PrefixTuningConfig on tiny Llama (GQA, RoPE) and GPT-2 (learned
absolute positions): logits and prefix gradients, padding on either side, positions shifted by P as peft's cache
prefix shifts them, greedy generation with the KV cache, peft-format files both ways, projection and its merge."""
import copy
import json
import os
import warnings

import peft
import pytest
import torch

import peftops
from peftops.patch import prefix as pf
from peftops.patch.adapter import STATE_ATTR
from tiny_models import VOCAB, assert_close, loss_of, output, peft_at_least, tiny_bert, tiny_gpt2, tiny_llama

P = 3
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
IDS = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
# peft before 0.19 dropped explicit position_ids under prefix tuning (with a warning), so it numbered left-padded rows
# from their pads; peftops follows 0.19 on, which shifts them by P
shifts_positions = pytest.mark.skipif(not peft_at_least((0, 19)), reason="peft < 0.19 ignores position_ids")


def mask(kind):
    """Rows of 9, 6 and 3 real tokens, padded on `kind`'s side (None: no padding)."""
    keep = torch.arange(9)[None, :] < torch.tensor([[9], [6], [3]])
    return None if kind is None else (keep.flip(1) if kind == "left" else keep).long()


def state(model):
    return model.__dict__[STATE_ATTR]


def pair(name, projection=False):
    """(ours, peft's) with the same base weights and the same prefix (or projection MLP)."""
    base = BUILDERS[name]()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection))
    ours = peftops.patch(base, peftops.PrefixConfig(P, prefix_projection=projection))
    encoder = ref.prompt_encoder["default"]
    with torch.no_grad():
        if projection:
            encoder.load_state_dict(getattr(ours, pf.ENCODER).state_dict())
        else:
            encoder.embedding.weight.copy_(pf.to_peft_layout(pf.prefixes(ours, state(ours))))
    return ours, ref


def prefix_grads(model, ref, projection):
    """(ours, peft's) prefix gradients in one layout."""
    if projection:
        ours = dict(getattr(model, pf.ENCODER).named_parameters())
        return ([ours[n].grad for n in sorted(ours)],
                [p.grad for n, p in sorted(ref.prompt_encoder["default"].named_parameters())])
    st = state(model)
    ours = [t.grad for n in st.attention_names for t in pf.layer_prefix(model.get_submodule(n))]
    theirs = pf.from_peft_layout(ref.prompt_encoder["default"].embedding.weight.grad, len(st.attention_names),
                                 st.num_kv_heads)
    return ours, [t for kv in theirs for t in kv]


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("pad,projection", [(None, False), ("left", False), ("right", False), ("left", True)])
def test_logits_and_prefix_grads_match_peft(name, pad, projection):
    ours, ref = pair(name, projection)
    am = mask(pad)
    out = ours(input_ids=IDS, attention_mask=am).logits
    expected = ref(input_ids=IDS, attention_mask=am).logits
    assert_close(out, expected, what="logits")
    loss_of(out).backward()
    loss_of(expected).backward()
    for a, b in zip(*prefix_grads(ours, ref, projection)):
        assert_close(a, b, 1e-4, what="prefix grad")


@shifts_positions
@pytest.mark.parametrize("name", BUILDERS)
def test_explicit_positions_are_shifted_by_p_as_peft(name):
    # peft numbers tokens after its cached prefix (given position_ids + P): neither RoPE (the prefix keys carry no
    # rotation) nor GPT-2's absolute positions are blind to that shift.
    ours, ref = pair(name)
    am = mask("left")
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    assert_close(ours(input_ids=IDS, attention_mask=am, position_ids=pos).logits,
                 ref(input_ids=IDS, attention_mask=am, position_ids=pos).logits, what="logits")
    unshifted = ours(input_ids=IDS, attention_mask=am, position_ids=pos - P).logits
    assert not torch.allclose(unshifted, ref(input_ids=IDS, attention_mask=am, position_ids=pos).logits, atol=1e-4)


def peft_greedy(ref, ids, am, steps):
    """Greedy decoding by full recomputation through peft's forward, with the positions generate() gives (from the
    mask; peft adds P). peft's own generate() cannot be the reference here: on transformers 5.x it hands its prefix
    cache over as `past_key_values` while generate passes its own empty `cache`, so the prefix is lost."""
    for _ in range(steps):
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        nxt = ref(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    return ids


@shifts_positions
@pytest.mark.parametrize("name", BUILDERS)
def test_generate_with_kv_cache_matches_peft_greedy(name):
    ours, ref = pair(name)
    ids, am = IDS[:, :6], mask("left")[:, 3:]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = ours.generate(input_ids=ids, attention_mask=am, **kw)
    assert torch.equal(got, peft_greedy(ref, ids, am, 6))
    plain = BUILDERS[name]().generate(input_ids=ids, attention_mask=am, **kw)
    assert not torch.equal(got, plain)  # the prefix changes what is generated


@pytest.mark.parametrize("projection", [False, True])
def test_only_prefix_parameters_train_and_unpatch_restores(projection):
    model = tiny_llama()
    before = model(input_ids=IDS).logits
    keys, impl = set(model.state_dict()), model.config._attn_implementation
    model.lm_head.weight.requires_grad_(False)  # a flag that unpatch must restore as it was
    peftops.patch(model, peftops.PrefixConfig(P, prefix_projection=projection))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if projection:
        assert trainable == {f"{pf.ENCODER}.{n}" for n in
                             ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                              "transform.2.bias")}
    else:
        assert trainable == {f"model.layers.{i}.self_attn.{k}" for i in (0, 1) for k in (pf.KEY, pf.VALUE)}
        assert peftops.trainable_parameters(model)[0] == 2 * 2 * 2 * P * 8  # layers * (k, v) * Hkv * P * D
    with pytest.raises(ValueError, match="already patched"):
        peftops.patch(model, peftops.PrefixConfig(P))
    assert not torch.allclose(model(input_ids=IDS).logits, before)
    peftops.unpatch(model)
    assert set(model.state_dict()) == keys and model.config._attn_implementation == impl
    assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
    assert torch.equal(model(input_ids=IDS).logits, before)  # also: no position shift left behind


def test_projection_merge_folds_into_plain_prefixes(tmp_path):
    ours, ref = pair("gpt2", projection=True)
    am = mask("right")
    before = ours(input_ids=IDS, attention_mask=am).logits
    peftops.merge(ours)
    assert not hasattr(ours, pf.ENCODER)
    assert peftops.trainable_parameters(ours)[0] == 2 * 2 * 4 * P * 8
    assert_close(ours(input_ids=IDS, attention_mask=am).logits, before, what="merged logits")
    peftops.save_adapter(ours, tmp_path)  # the merged prefixes are what peft saves for a projection
    ref.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file
    assert_close(load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"],
                 load_file(tmp_path / "peft" / "adapter_model.safetensors")["prompt_embeddings"], what="file")


@pytest.mark.parametrize("name", BUILDERS)
def test_peftops_file_loads_in_peft(name, tmp_path):
    ours, _ = pair(name)
    am = mask("left")
    peftops.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(BUILDERS[name](), tmp_path)
    assert_close(loaded(input_ids=IDS, attention_mask=am).logits, ours(input_ids=IDS, attention_mask=am).logits,
                 what="logits")


@pytest.mark.parametrize("name,projection", [("llama", False), ("gpt2", False), ("llama", True)])
def test_peft_file_loads_in_peftops(name, projection, tmp_path):
    _, ref = pair(name, projection)
    ref.save_pretrained(tmp_path)
    ours = peftops.load_adapter(peftops.patch(BUILDERS[name](), peftops.PrefixConfig(P)), tmp_path)
    am = mask("right")
    assert_close(ours(input_ids=IDS, attention_mask=am).logits, ref(input_ids=IDS, attention_mask=am).logits,
                 what="logits")


def _bad(tmp_path, what):
    _, ref = pair("llama")
    ref.save_pretrained(tmp_path)
    cfg_file, st_file = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    from safetensors.torch import load_file, save_file
    tensors = load_file(st_file)
    if what == "virtual tokens":
        cfg["num_virtual_tokens"] = P + 1
    elif what == "peft type":
        cfg["peft_type"] = "LORA"
    elif what == "shape":
        os.remove(cfg_file)
        tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:, :-8].contiguous()
    elif what == "extra key":
        tensors["prefix_extra"] = torch.zeros(1)
    if cfg_file.exists():
        cfg_file.write_text(json.dumps(cfg))
    save_file(tensors, st_file)


@pytest.mark.parametrize("what,match", [("virtual tokens", "num_virtual_tokens"), ("peft type", "LORA"),
                                        ("shape", "wrong shapes.*prompt_embeddings"), ("extra key", "prefix_extra")])
def test_bad_files_error_and_leave_the_model_as_it_was(tmp_path, what, match):
    _bad(tmp_path, what)
    model = peftops.patch(tiny_llama(), peftops.PrefixConfig(P))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        peftops.load_adapter(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_projection_model_refuses_a_prefix_file(tmp_path):
    _, ref = pair("llama")
    ref.save_pretrained(tmp_path)
    model = peftops.patch(tiny_llama(), peftops.PrefixConfig(P, prefix_projection=True))
    with pytest.raises(ValueError, match="prefix_projection=False"):
        peftops.load_adapter(model, tmp_path)


def test_bert_matches_attention_over_the_concatenated_prefix():
    # BERT (bidirectional): the same layers computed with the prefix as explicit extra keys (positions shifted by P
    # in both, as peft's; test_bert_matches_peft checks that against peft itself).
    # Through the attention registry in transformers 5, by replacing the self-attention forwards in 4.x.
    model = tiny_bert()
    am = mask("right")
    before = model(input_ids=IDS, attention_mask=am).last_hidden_state
    peftops.patch(model, peftops.PrefixConfig(P))
    out = model(input_ids=IDS, attention_mask=am).last_hidden_state
    st = state(model)

    def eager_concat(module, q, k, v, attention_mask, scaling=None, **kwargs):
        pk, pv = (t.expand(q.shape[0], -1, -1, -1) for t in pf.layer_prefix(module))
        keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        allowed = torch.cat([torch.ones(q.shape[0], P, dtype=torch.bool), am.bool()], 1)[:, None, None, :]
        probs = ((q @ keys.transpose(-1, -2)) * scaling).masked_fill(~allowed, float("-inf")).softmax(-1)
        return (probs @ values).transpose(1, 2).contiguous(), None

    from transformers import AttentionInterface
    AttentionInterface.register(pf.ATTN_NAME, eager_concat)
    try:
        expected = model(input_ids=IDS, attention_mask=am).last_hidden_state
    finally:
        pf.register()
    assert len(st.attention_names) == 2
    assert_close(out, expected, what="hidden states")
    peftops.unpatch(model)
    assert not any("forward" in model.get_submodule(n).__dict__ for n in st.attention_names)
    assert torch.equal(model(input_ids=IDS, attention_mask=am).last_hidden_state, before)


def _with_attention_dropout(name):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.1))
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.1))


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_attention_dropout_by_default_is_peft_s_under_one_seed(name):
    # GPT-2 and BERT train with attention dropout by default: by default that runs as peft's (SDPA over the
    # concatenation, torch's dropout), so training gives peft's numbers under one seed
    task = "CAUSAL_LM" if name == "gpt2" else "FEATURE_EXTRACTION"
    ref = peft.get_peft_model(_with_attention_dropout(name), peft.PrefixTuningConfig(task_type=task,
                                                                                     num_virtual_tokens=P)).train()
    ours = peftops.patch(_with_attention_dropout(name), peftops.PrefixConfig(P)).train()
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(pf.to_peft_layout(pf.prefixes(ours, state(ours))))
    torch.manual_seed(1)
    got = output(ours, IDS)
    torch.manual_seed(1)
    expected = output(ref, IDS)
    assert_close(got, expected, what="train-mode outputs")
    torch.manual_seed(2)
    assert not torch.allclose(output(ours, IDS), got)  # dropout is on


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_fused_attention_dropout_runs_in_the_op(name, monkeypatch):
    # with fused_attention_dropout the op drops the probabilities itself (no concatenated keys and values, no
    # batch-fold prefix), reproducibly under torch.manual_seed, so it keeps less than peft, which concatenates; in
    # evaluation nothing is dropped and the model is peft's
    calls = []
    fused = peftops.ops.prefix_attention
    monkeypatch.setattr(peftops.ops, "prefix_attention", lambda *a, **k: calls.append(k["dropout_p"]) or fused(*a, **k))
    task = "CAUSAL_LM" if name == "gpt2" else "FEATURE_EXTRACTION"
    ref = peft.get_peft_model(_with_attention_dropout(name), peft.PrefixTuningConfig(task_type=task,
                                                                                     num_virtual_tokens=P))
    ours = peftops.patch(_with_attention_dropout(name), peftops.PrefixConfig(P, fused_attention_dropout=True))
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(pf.to_peft_layout(pf.prefixes(ours, state(ours))))

    def step(model):
        torch.manual_seed(1)
        loss, saved = peftops.profiling.saved_bytes(lambda: loss_of(output(model, IDS)), model.parameters())
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        return loss, saved, grads

    loss, saved, grads = step(ours.train())
    assert calls == [0.1, 0.1]
    again, _, grads_again = step(ours)
    assert torch.equal(loss, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    assert all(g.abs().sum() > 0 for g in grads)
    _, saved_peft, _ = step(ref.train())
    assert saved < saved_peft
    with torch.no_grad():
        evaluated = output(ours.eval(), IDS)
        assert not torch.equal(loss_of(evaluated), loss)
        assert_close(evaluated, output(ref.eval(), IDS), what="eval outputs")
    assert calls[-1] == 0.0


@pytest.mark.parametrize("pad", [None, "right"])
def test_bert_matches_peft(pad, tmp_path):
    # peft's prefix sits in BERT's cache, so BERT numbers the tokens after it (positions P .. P + L - 1), as a causal
    # LM does; its file, saved from a BertModel (FEATURE_EXTRACTION), loads into ours and back with the same output.
    ref = peft.get_peft_model(tiny_bert(), peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                   num_virtual_tokens=P)).eval()
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.normal_()
    ref.save_pretrained(tmp_path / "peft")
    ours = peftops.load_adapter(peftops.patch(tiny_bert(), peftops.PrefixConfig(P)), tmp_path / "peft").eval()
    am = mask(pad)
    expected = ref(input_ids=IDS, attention_mask=am).last_hidden_state
    assert_close(ours(input_ids=IDS, attention_mask=am).last_hidden_state, expected, what="hidden states")
    # peft ignores token type ids here (not a classification task), with a warning: so do we
    with pytest.warns(UserWarning, match="[Tt]oken type ids"):
        pair = ref(input_ids=IDS, attention_mask=am, token_type_ids=IDS % 2).last_hidden_state
    with pytest.warns(UserWarning, match="ignores token type ids"):
        assert_close(ours(input_ids=IDS, attention_mask=am, token_type_ids=IDS % 2).last_hidden_state, pair,
                     what="with token types")
    peftops.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    assert_close(back(input_ids=IDS, attention_mask=am).last_hidden_state, expected, what="reloaded in peft")


@pytest.mark.parametrize("cls", ["LlamaModel", "LlamaForSequenceClassification", "GPT2Model",
                                 "BertForSequenceClassification"])
def test_files_saved_from_other_model_classes_load_in_peft(cls, tmp_path):
    # peft applies a prefix only through the PeftModel subclass of the file's task type (a plain PeftModel ignores
    # it), so the task type written must fit the model class.
    import transformers
    source = {"Llama": tiny_llama, "GPT2": tiny_gpt2, "Bert": tiny_bert}[cls.split("Model")[0].split("For")[0]]()
    config = copy.deepcopy(source.config)
    config.pad_token_id = 0

    def build():
        torch.manual_seed(5)
        return getattr(transformers, cls)(copy.deepcopy(config)).eval()

    ours = peftops.patch(build(), peftops.PrefixConfig(P))
    with torch.no_grad():
        for t in pf.prefixes(ours, state(ours)):
            for x in t:
                x.normal_()
    peftops.save_adapter(ours, tmp_path)
    am = mask("right")
    try:
        loaded = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
        loaded(input_ids=IDS, attention_mask=am)
    except ValueError as e:  # peft's SEQ_CLS prefix tuning needs `past_key_values` in the backbone's signature
        if "does not support past key values" not in str(e):
            raise
        pytest.skip(f"peft itself cannot run prefix tuning on {cls} with this transformers: {e}")
    # token types: peft keeps them for classification, ignores them (warning) for a bare model, and so do we
    kw = {"input_ids": IDS, "attention_mask": am, **({"token_type_ids": IDS % 2} if "Llama" not in cls else {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*[Tt]oken type ids")
        out, expected = ours(**kw), loaded(**kw)
    key = "logits" if "logits" in out else "last_hidden_state"
    assert_close(out[key], expected[key], what=key)
    assert not torch.allclose(out[key], build()(input_ids=IDS, attention_mask=am)[key], atol=1e-4)


def test_mask_that_is_not_padding_is_refused():
    allowed = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    allowed[0, 0, 3, 0] = False  # a sliding window: not causal + padding
    with pytest.raises(ValueError, match="neither"):
        pf._padding_and_causal(allowed, 1, 4, 4, True)
    padding, causal = pf._padding_and_causal(torch.ones(1, 1, 4, 4, dtype=torch.bool).tril(), 2, 4, 4, True)
    assert padding is None and causal
    packed = torch.zeros(1, 1, 6, 6, dtype=torch.bool)  # two causal sequences of 3 tokens in one row
    packed[0, 0, :3, :3] = packed[0, 0, 3:, 3:] = torch.ones(3, 3, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="packed"):  # not the second sequence with padding before it
        pf._padding_and_causal(packed, 1, 6, 6, True)
    left = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril() & torch.tensor([False, False] + [True] * 4)
    for opened in (False, True):  # the padding queries' rows, shut or (as transformers may) opened up
        left[0, 0, :2] = opened
        padding, causal = pf._padding_and_causal(left, 1, 6, 6, True)
        assert causal and padding.tolist() == [[False, False] + [True] * 4]


@pytest.mark.parametrize("kwargs,field", [(dict(num_virtual_tokens=0), "num_virtual_tokens"),
                                          (dict(prefix_projection=1), "prefix_projection"),
                                          (dict(encoder_hidden_size=0), "encoder_hidden_size"),
                                          (dict(fused_attention_dropout=1), "fused_attention_dropout")])
def test_bad_config_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        peftops.PrefixConfig(**kwargs)


def test_models_without_registry_attention_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="transformers models"):
        peftops.patch(model, peftops.PrefixConfig(P))
    assert model[0].weight.requires_grad


@pytest.mark.slow
def test_smollm2_matches_peft(tmp_path):
    cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", ".cache", "smollm2-135m")
    if not os.path.isfile(os.path.join(cache, "model.safetensors")):
        pytest.skip("SmolLM2-135M is not cached (python demo/model_cache.py)")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(cache)
    plain = copy.deepcopy(base)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=20))
    ours = peftops.patch(base, peftops.PrefixConfig(20))
    with torch.no_grad():  # prefixes of the size of real keys and values (N(0, 1) would saturate attention)
        for k, v in pf.prefixes(ours, state(ours)):
            k.mul_(0.1)
            v.mul_(0.1)
        ref.prompt_encoder["default"].embedding.weight.copy_(pf.to_peft_layout(pf.prefixes(ours, state(ours))))
    ids = torch.randint(1000, (2, 16), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :5] = 0
    expected = ref(input_ids=ids, attention_mask=am).logits
    assert_close(ours(input_ids=ids, attention_mask=am).logits, expected, 1e-4, what="logits")
    # through files, both ways: ours into peft, peft's into peftops
    peftops.save_adapter(ours, tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    loaded = {"peft from our file": peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "ours"),
              "peftops from peft's file": peftops.load_adapter(peftops.patch(plain, peftops.PrefixConfig(20)),
                                                               tmp_path / "peft")}
    for what, model in loaded.items():
        assert_close(model(input_ids=ids, attention_mask=am).logits, expected, 1e-4, what=what)


def test_roberta_style_positions_are_refused():
    # RoBERTa numbers positions from padding_idx + 1 over the real tokens (and, with peft's prefix in the cache,
    # after it): not the shift peftops applies, so a clear error rather than other numbers.
    from transformers import RobertaConfig, RobertaModel
    model = RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, pad_token_id=1))
    with pytest.raises(ValueError, match="RoBERTa"):
        peftops.patch(model, peftops.PrefixConfig(P))
    assert not any(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize("family", ["falcon", "opt"])
def test_models_the_prefix_would_not_reach_are_refused(family):
    # Falcon's attention has a layer_idx but computes attention itself (the registry would never see the prefix);
    # OPT counts positions from the attention mask, which holds peft's prefix: both would silently differ from peft
    import transformers
    if family == "falcon":
        model = transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            new_decoder_architecture=False, multi_query=False))
        match = "FalconAttention computes its own"
    else:
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0))
        match = "position ids counted from the attention mask"
    with pytest.raises(ValueError, match=match):
        peftops.patch(model, peftops.PrefixConfig(P))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("flags", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)])
def test_gpt2_attention_scaling_flags_as_peft(flags):
    # transformers 4.x GPT-2 hands its scaling flags to eager attention only (no `scaling` argument)
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **flags)).eval()
    base.config._attn_implementation = "eager"
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=P))
    ours = peftops.patch(base, peftops.PrefixConfig(P))
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(pf.to_peft_layout(pf.prefixes(ours, state(ours))))
    assert_close(ours(input_ids=IDS).logits, ref.eval()(input_ids=IDS).logits, what="logits")


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_parameters_are_float32_over_a_bfloat16_model(projection):
    # as peft's prompt encoder (and peftops' LoRA and IA3): optimizer updates are not lost to bf16 rounding
    model = peftops.patch(tiny_llama().to(torch.bfloat16), peftops.PrefixConfig(P, prefix_projection=projection))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    out = model(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16
    loss_of(out).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


def test_a_sliding_window_longer_than_every_key_changes_nothing():
    # Mistral's config defaults to a 4096-key window: no key of a short sequence falls out of it, with the prefix or
    # without, so peft's logits; a window the keys outgrow is a clear error
    from transformers import MistralConfig, MistralForCausalLM

    def build(window):
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=window)).eval()

    ref = peft.get_peft_model(build(4096), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ours = peftops.patch(build(4096), peftops.PrefixConfig(P))
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(pf.to_peft_layout(pf.prefixes(ours, state(ours))))
    am = mask("left")
    assert_close(ours(input_ids=IDS, attention_mask=am).logits, ref.eval()(input_ids=IDS, attention_mask=am).logits,
                 what="logits")
    short = peftops.patch(build(8), peftops.PrefixConfig(P))
    with pytest.raises(ValueError, match="sliding window"):
        short(input_ids=IDS)


def test_models_sharing_one_config_object_stay_independent():
    # the attention implementation is switched on the config, which models built from one config object share: the
    # patched model gets its own copy, so a reference model beside it keeps its outputs, and unpatching one patched
    # model leaves another's prefix on
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)

    def build():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()

    reference = build()
    before = reference(input_ids=IDS).logits
    a, b = (peftops.patch(build(), peftops.PrefixConfig(P)) for _ in range(2))
    assert torch.equal(reference(input_ids=IDS).logits, before)
    out_b = b(input_ids=IDS).logits
    assert not torch.equal(out_b, before)  # b's prefix is on
    peftops.unpatch(a)
    assert torch.equal(b(input_ids=IDS).logits, out_b)
    # a backbone patched on its own: unpatching puts the original config back, which its parent holds too
    parent = build()
    peftops.unpatch(peftops.patch(parent.transformer, peftops.PrefixConfig(P)))
    assert parent.transformer.config is parent.config is config


def test_softcapped_attention_is_refused_when_patching():
    # Gemma2 caps its attention logits (attn_logit_softcapping=50 by default), which the op does not: refused at
    # patch time, not at the first forward; with the cap off it patches
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma2(**kwargs):
        return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=8, **kwargs))

    model = gemma2()
    with pytest.raises(ValueError, match="softcapping"):
        peftops.patch(model, peftops.PrefixConfig(P))
    assert all(p.requires_grad for p in model.parameters())
    peftops.patch(gemma2(attn_logit_softcapping=None), peftops.PrefixConfig(P))

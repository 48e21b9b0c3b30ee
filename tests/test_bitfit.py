"""BitFit against plain-PyTorch bias-only training of the same model: outputs, every bias gradient, dropout
reproducibility (also under activation checkpointing), saved-for-backward bytes, the pretrained MiniLM, files."""
import copy
import json
import os

import pytest
import torch

import peftops
from ia3_helpers import with_random_biases
from peftops import BitFitConfig
from tiny_models import (assert_close, input_ids, loss_of, minilm, output, outputs_from_threads,
                         outputs_match_then_backward, tiny_bert, tiny_gpt2, tiny_llama)

TINY = {"bert": with_random_biases(tiny_bert), "gpt2": with_random_biases(tiny_gpt2)}


def plain_bias_only(model, train_norm_bias=True):
    """The reference: the unpatched model with every parameter frozen but the biases BitFit trains."""
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") and (train_norm_bias or id(p) not in norms))
    return model


def pair(builder, config=None):
    base = builder()
    ref = plain_bias_only(copy.deepcopy(base), (config or BitFitConfig()).train_norm_bias)
    return peftops.patch(base, config or BitFitConfig()), ref


def check_same(ours, ref, ids=None, rtol=1e-5):
    ref_params = outputs_match_then_backward(ours, ref, ids, rtol)
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert trained and [n for n, _ in trained] == [n for n, p in ref_params.items() if p.requires_grad]
    for name, p in trained:  # the pooler is not in the loss: no gradient on either side
        if ref_params[name].grad is None:
            assert p.grad is None, name
        else:
            assert_close(p.grad, ref_params[name].grad, rtol, what=f"grad of {name}")
    ours.zero_grad()
    ref.zero_grad()


@pytest.fixture
def op_calls(monkeypatch):
    calls = {"bias_linear": 0, "bias_dropout_add": 0}
    for name in calls:
        fused = getattr(peftops.ops, name)

        def spy(*args, _fused=fused, _name=name, **kwargs):
            calls[_name] += 1
            return _fused(*args, **kwargs)

        monkeypatch.setattr(peftops.ops, name, spy)
    return calls


@pytest.mark.parametrize("train_norm_bias", [True, False])
@pytest.mark.parametrize("family", sorted(TINY))
def test_matches_plain_bias_only_training(family, train_norm_bias, op_calls):
    ours, ref = pair(TINY[family], BitFitConfig(train_norm_bias=train_norm_bias))
    check_same(ours.eval(), ref.eval())
    check_same(ours.train(), ref.train())  # the tiny models have dropout 0
    # Per forward, BERT: 2 layers x (query, key, value, intermediate) + pooler through bias_linear, 2 layers x 2 fused
    # output sublayers; GPT-2: 2 layers x (c_attn, c_fc) through bias_linear, 2 layers x 2 sublayers (attention, MLP)
    # whose c_proj bias, dropout and residual add are fused. Two forwards ran.
    per_pass = {"bert": (2 * 4 + 1, 2 * 2), "gpt2": (2 * 2, 2 * 2)}[family]
    assert (op_calls["bias_linear"], op_calls["bias_dropout_add"]) == tuple(2 * n for n in per_pass)
    norm_biases = [n for n, p in ours.named_parameters() if p.requires_grad and ("LayerNorm" in n or ".ln_" in n)]
    assert bool(norm_biases) == train_norm_bias


def test_unpatch_restores_forwards_and_flags():
    model = TINY["bert"]()
    ref = copy.deepcopy(model)
    model.pooler.dense.weight.requires_grad_(False)
    peftops.patch(model, BitFitConfig())
    with pytest.raises(ValueError, match="already patched"):
        peftops.patch(model, BitFitConfig())
    with pytest.raises(ValueError, match="already patched"):
        peftops.patch(model, peftops.LoraConfig(target_modules=["query"]))
    assert peftops.unpatch(model) is model
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: n != "pooler.dense.weight" for n, _ in model.named_parameters()}
    ids = input_ids()
    assert torch.equal(output(model, ids), output(ref, ids))
    peftops.patch(model, BitFitConfig())  # merge: nothing to fold, the trained biases are the model's own
    assert peftops.merge(model) is model and not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="not patched"):
        peftops.unpatch(model)


def dropout_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.2,
                                attention_probs_dropout_prob=0.0))


def dropout_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.2, embd_pdrop=0.0, attn_pdrop=0.0))


def train_step(model, ids, seed):
    torch.manual_seed(seed)
    loss = loss_of(output(model, ids))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("builder", [dropout_bert, dropout_gpt2], ids=["bert", "gpt2"])
def test_dropout_reproducible_and_under_activation_checkpointing(builder):
    model = peftops.patch(builder(), BitFitConfig()).train()
    ids = input_ids()
    loss, grads = train_step(model, ids, seed=3)
    again, grads_again = train_step(model, ids, seed=3)
    other, _ = train_step(model, ids, seed=4)
    assert torch.equal(loss, again) and all(torch.equal(grads[n], grads_again[n]) for n in grads)
    assert not torch.equal(loss, other)  # dropout is on
    with torch.no_grad():
        evaluated = output(model.eval(), ids)
    assert not torch.allclose(evaluated, output(model.train(), ids))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt, ckpt_grads = train_step(model, ids, seed=3)
    assert_close(ckpt, loss, what="checkpointed loss")
    for n in grads:  # the recomputed forward regenerates the same masks
        assert_close(ckpt_grads[n], grads[n], what=f"checkpointed grad of {n}")


def saved_bytes(model, ids):
    """Bytes autograd keeps for backward over one forward: unique storages, parameters excluded."""
    return peftops.profiling.saved_bytes(lambda: loss_of(output(model, ids)).backward(), model.parameters())[1]


@pytest.mark.parametrize("builder", [dropout_bert, dropout_gpt2], ids=["bert", "gpt2"])
def test_saves_less_for_backward_than_plain_bias_training(builder):
    ours, ref = pair(builder)
    ids = input_ids(batch=4, seq=32)
    mine, theirs = saved_bytes(ours.train(), ids), saved_bytes(ref.train(), ids)
    # Per fused sublayer plain PyTorch keeps the dropout mask (bool) and the linear input...; BitFit keeps neither
    # the mask nor the pre-dropout activation: at least one mask of [4*32, 32] bytes per fused sublayer saved.
    assert mine <= theirs - 4 * (4 * 32 * 32), (mine, theirs)


def test_gpt2_blocks_fuse_their_residual_adds_and_unpatch_restores_them():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    model = TINY["gpt2"]()
    ids = input_ids()
    before, keys = output(model, ids), set(model.state_dict())
    peftops.patch(model, BitFitConfig())
    blocks = [m for m in model.modules() if isinstance(m, GPT2Block)]
    assert blocks and all("forward" in b.__dict__ for b in blocks)
    assert_close(output(model, ids), before, what="outputs (the same biases, now trainable)")
    with_weights = model(input_ids=ids, output_attentions=True)  # 4.57: the block's own forward, the pair unfused
    assert_close(with_weights.logits, before, what="outputs with attention weights asked for")
    peftops.unpatch(model)
    assert set(model.state_dict()) == keys
    assert not any("forward" in m.__dict__ or "_peftops_pair" in m.__dict__ for m in model.modules())
    assert torch.equal(output(model, ids), before)


def test_a_gpt2_shared_by_threads_gives_each_its_own_output():
    # a sublayer hands its residual to its output dropout through the module, in a slot per thread
    model = peftops.patch(TINY["gpt2"](), BitFitConfig()).eval()
    inputs = [torch.randint(64, (2, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        serial = [output(model, ids) for ids in inputs]
    unfused = [{"output_attentions": True} if i % 2 else {} for i in range(4)]  # the block's own forward
    results = outputs_from_threads([lambda i=i: model(input_ids=inputs[i], **unfused[i]).logits for i in range(4)], 6)
    assert all(len(results[i]) == 6 and all(torch.equal(y, serial[i]) for y in results[i]) for i in range(4))


def test_a_whole_gpt2_compiles_as_one_graph():
    # the residual hand-over must not break the trace (a dict written there broke the next block's signature.bind)
    model = peftops.patch(TINY["gpt2"](), BitFitConfig()).eval()
    ids = input_ids()
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert_close(compiled(input_ids=ids).logits, output(model, ids), what="compiled")
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_dropout_of_one_trains_as_the_unpatched_model(family):
    # nn.Dropout(p=1) drops everything; bias_dropout_add does not take p = 1, so those sublayers run unfused
    build = TINY[family]
    ref = build()
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 1.0
    ours = peftops.patch(copy.deepcopy(ref), BitFitConfig()).train()
    ids = input_ids()
    torch.testing.assert_close(output(ours, ids), output(ref.train(), ids))


def test_pretrained_minilm_matches_in_eval_mode():
    ours, ref = pair(minilm)
    ids = input_ids(vocab=ours.config.vocab_size, batch=2, seq=12)
    check_same(ours.eval(), ref.eval(), ids, rtol=1e-4)


def test_save_load_round_trip(tmp_path):
    ours, _ = pair(TINY["bert"])
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    peftops.save_adapter(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_model.safetensors", "bitfit_config.json"]
    config = json.loads((tmp_path / "bitfit_config.json").read_text())
    assert config == {"format": "peftops-bitfit", "version": 1, "train_norm_bias": True,
                      "base_model_name_or_path": None, "model_type": "bert"}
    saved = peftops.io.read_weights(str(tmp_path))
    assert list(saved) == sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    fresh = peftops.patch(TINY["bert"](), BitFitConfig())
    assert peftops.load_adapter(fresh, str(tmp_path)) is fresh
    ids = input_ids()
    assert torch.equal(output(fresh, ids), output(ours, ids))

    frozen_norms = peftops.patch(TINY["bert"](), BitFitConfig(train_norm_bias=False))
    with pytest.raises(ValueError, match="train_norm_bias"):
        peftops.load_adapter(frozen_norms, str(tmp_path))
    gpt2 = peftops.patch(TINY["gpt2"](), BitFitConfig())
    with pytest.raises(ValueError, match="bert model"):
        peftops.load_adapter(gpt2, str(tmp_path))
    lora = peftops.patch(tiny_bert(), peftops.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="does not fit"):
        peftops.load_adapter(lora, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="bitfit_config.json"):
        peftops.load_adapter(fresh, str(tmp_path / "nothing"))


def test_model_without_biases_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no bias"):
        peftops.patch(model, BitFitConfig())
    assert all(p.requires_grad for p in model.parameters()) and peftops.patch(model, peftops.LoraConfig()) is model


@pytest.mark.parametrize("kwargs", [dict(train_norm_bias="yes"), dict(train_norm_bias=None)])
def test_bad_configs(kwargs):
    with pytest.raises(ValueError, match="train_norm_bias"):
        BitFitConfig(**kwargs)


def test_bad_adapter_name_and_peft_model():
    with pytest.raises(ValueError, match="adapter_name"):
        peftops.patch(tiny_bert(), BitFitConfig(), adapter_name="a.b")

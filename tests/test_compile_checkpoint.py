"""torch.compile(fullgraph=True) on every decoder block of a patched tiny Llama, for LoRA (dropout 0.1) and each
other technique (DoRA, IA3, prefix tuning, bottleneck adapters; no dropout): no graph breaks from our ops, same loss
and trainable gradients as eager. And activation checkpointing: with dropout on, the recomputed forward
draws the same dropout seeds as the first (torch.utils.checkpoint restores the generator state), so gradients
equal those without checkpointing."""
import functools

import pytest
import torch

import peftops

from lora_training import TECHNIQUES, _config, batches, lm_loss, patched_llama
from tiny_models import BUILDERS, tiny_bert, tiny_gpt2, tiny_llama

# technique -> (dropout, our op's name, how many calls of it one decoder block makes)
OPS = {"lora": (0.1, "lora_linear", 7), "dora": (0.0, "dora_linear", 7),
       "ia3": (0.0, "peftops.ia3_", 3),  # k_proj, v_proj (ia3_linear), down_proj (ia3_glu_linear)
       "prefix": (0.0, "prefix_attention", 1), "adapter": (0.0, "adapter_bottleneck", 2)}  # houlsby: attn + mlp


def _loss_and_grads(model, ids, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = lm_loss(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _block_inputs(model, ids):
    """(args, kwargs) each decoder block receives in the model's forward."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
             for b in model.model.layers]
    with torch.no_grad():
        lm_loss(model, ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_blocks_have_no_graph_breaks(technique):
    torch._dynamo.reset()
    dropout, op_name, op_count = OPS[technique]
    model = patched_llama(dropout, technique)
    ids = batches()[0]
    for i, (block, (args, kwargs)) in enumerate(zip(model.model.layers, _block_inputs(model, ids))):
        explanation = torch._dynamo.explain(block)(*args, **kwargs)
        assert explanation.graph_break_count == 0, (i, explanation.break_reasons)
        assert explanation.graph_count == 1, i
        # Our op is in the captured graph (not run outside it, which a silent fallback would do), or in the forward
        # body of an autograd.Function captured in it (the Llama attention's Houlsby adapter, run by its o_proj).
        ops = [str(n.target) for g in explanation.graphs for name, m in g.named_modules()
               if isinstance(m, torch.fx.GraphModule) and "bwd" not in name
               for n in m.graph.nodes if n.op == "call_function"]
        assert sum(op_name in op for op in ops) == op_count, (i, ops)


def _graphs_over_lengths(model):
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda ids: lm_loss(model, ids), fullgraph=True, backend=counter)
    for length in (3, 5, 6, 8):
        step(batches()[0][:, :length]).backward()
    torch._dynamo.reset()
    return counter.frame_count


@functools.cache
def _graphs_over_lengths_unpatched():
    return _graphs_over_lengths(tiny_llama().train())


@pytest.mark.parametrize("technique", TECHNIQUES + ("pfeiffer",))
def test_a_compiled_model_takes_new_lengths_without_recompiling_each(technique):
    # a training loop over varying sequence lengths: dynamo specialises the first length, then makes it symbolic;
    # an op that pinned sizes (forward or backward: aot_eager traces both) would recompile per length and hit
    # fullgraph's recompile limit
    torch._dynamo.reset()
    if technique == "pfeiffer":  # a pre-LN Pfeiffer adapter recovers its input from its output in backward
        model = peftops.patch(tiny_llama(), peftops.AdapterConfig(bottleneck=8, placement="pfeiffer")).train()
    else:
        model = patched_llama(OPS[technique][0], technique)
    patched, unpatched = _graphs_over_lengths(model), _graphs_over_lengths_unpatched()
    assert patched <= unpatched < 4, (patched, unpatched)  # as many graphs as the plain model


@pytest.mark.parametrize("config", [peftops.LoraConfig(r=4, alpha=8), peftops.BitFitConfig(), peftops.IA3Config()],
                         ids=["lora", "bitfit", "ia3"])
def test_a_patched_model_exports_with_a_dynamic_sequence_length(config):
    model = peftops.patch(tiny_bert(), config).eval()
    # below the position table's 64: torch 2.6 cannot prove the slice of BERT's 64 token types for length 64
    seq = torch.export.Dim("seq", min=2, max=48)
    program = torch.export.export(model, (), {"input_ids": torch.randint(64, (2, 6))},
                                  dynamic_shapes={"input_ids": {1: seq}})
    ids = torch.randint(64, (2, 11))
    torch.testing.assert_close(program.module()(input_ids=ids)[0], model(input_ids=ids)[0])


@pytest.mark.parametrize("technique", TECHNIQUES)
@torch._inductor.config.patch(fallback_random=True)  # not monkeypatch: its undo deletes the option from the module
def test_compiled_blocks_match_eager(technique):
    """Inductor, fullgraph per block. `fallback_random` makes inductor draw random numbers through torch's
    generator as eager does, so our op gets the same dropout seeds and the comparison holds with dropout on
    (without it, training is just as valid but the masks are other draws)."""
    torch._dynamo.reset()
    dropout = OPS[technique][0]
    model = patched_llama(dropout, technique)
    ids = batches()[0]
    loss, grads = _loss_and_grads(model, ids)
    if dropout:
        other_seed, _ = _loss_and_grads(model, ids, seed=6)
        assert (other_seed - loss).abs() > 1e-4  # dropout is live: the comparison below depends on the masks
    for block in model.model.layers:
        block.compile(fullgraph=True)  # a graph break here would raise
    loss_c, grads_c = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-5 * grads[name].abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")  # renamed in transformers 5.2x
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_regenerates_the_same_masks(reentrant):
    model = patched_llama(0.1)
    ids = batches()[0]
    loss, grads = _loss_and_grads(model, ids)
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    assert model.model.gradient_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_checkpointing_switched_on_after_patching_trains_the_adapters(technique):
    # the Trainer's gradient_checkpointing=True switches it on after patching: while patched, the model's switch also
    # makes the embeddings' output require grad (as AdapterHub's models do), else reentrant checkpointing (4.x's
    # default) passes nothing back to the adapters
    model = peftops.patch(tiny_llama(), _config(technique, 0.0)).train()
    import pickle
    pickle.loads(pickle.dumps(model))  # the switch, while patched, pickles with the model
    ids = batches()[0]
    loss, grads = _loss_and_grads(model, ids)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids)
    assert grads and grads_ckpt.keys() == grads.keys()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    peftops.unpatch(model)
    assert not {"gradient_checkpointing_enable", "activation_checkpointing_enable"} & model.__dict__.keys()


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_checkpointing_switched_on_before_patching_trains_the_adapters(technique):
    # as peft's wrapping does: the embeddings' output is made to require grad, else reentrant checkpointing (the
    # default on transformers 4.x) passes nothing back
    model = tiny_llama()
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model = peftops.patch(model, _config(technique, 0.0)).train()
    lm_loss(model, batches()[0]).backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    # our hook that makes the embeddings' output require grad (transformers 5.x installs its own with checkpointing)
    # pickles, and unpatch takes it off again
    hooks = model.get_input_embeddings()._forward_hooks
    ours, count = [h for h in hooks.values() if h.__name__ == "_outputs_require_grad"], len(hooks)
    if ours:
        import pickle
        pickle.loads(pickle.dumps(model))
    peftops.unpatch(model)
    assert len(model.get_input_embeddings()._forward_hooks) == count - len(ours)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("config", [
    peftops.LoraConfig(r=4, alpha=8), peftops.IA3Config(), peftops.BitFitConfig(), peftops.PrefixConfig(4),
    *(peftops.AdapterConfig(bottleneck=8, placement=p) for p in ("pfeiffer", "houlsby", "parallel"))],
    ids=["lora", "ia3", "bitfit", "prefix", "pfeiffer", "houlsby", "parallel"])
@pytest.mark.parametrize("own_forward", [False, True], ids=["", "instance-forward"])
def test_checkpointed_layers_are_recomputed_in_backward(family, config, own_forward):
    # recent transformers checkpoint a layer by wrapping its class's forward: a forward that patching set on the
    # instance (GPT-2's BitFit blocks, Pfeiffer's decoder layers) must be checkpointed all the same, and once, also
    # over an instance forward that calls the class's wrapper itself (as accelerate's hooks do)
    from transformers.modeling_layers import GradientCheckpointingLayer
    if family == "llama" and isinstance(config, peftops.BitFitConfig):
        pytest.skip("Llama has no biases")
    model = BUILDERS[family]()
    for layer in model.modules():
        if own_forward and isinstance(layer, GradientCheckpointingLayer):
            layer.forward = functools.partial(type(layer).forward, layer)
    model = peftops.patch(model, config).train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    norms = [next(m for m in layer.modules() if "norm" in type(m).__name__.lower()) for layer in layers]
    calls = []
    for norm in norms:  # a module inside each layer that no technique touches
        norm.register_forward_pre_hook(lambda m, args: calls.append(m))
    loss = lm_loss(model, batches()[0]) if family == "llama" else model(batches()[0])[0].square().mean()
    assert layers and len(calls) == len(layers)
    loss.backward()
    assert [sum(c is norm for c in calls) for norm in norms] == [2] * len(norms)  # once more in backward


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_a_checkpointed_bitfit_gpt2_block_compiles_fullgraph():
    # under checkpointing dynamo refuses the residual that the fused block hands to its dropout (a side effect)
    torch._dynamo.reset()
    model = peftops.patch(tiny_gpt2(), peftops.BitFitConfig()).train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    block, seen = model.transformer.h[0], []
    hook = block.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    model(input_ids=batches()[0])
    hook.remove()
    args, kwargs = seen[0]
    torch.manual_seed(0)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(*args, **kwargs)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(out, block(*args, **kwargs)[0])
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_checkpointing_without_rng_restore_would_differ():
    """The check above can fail: if the recompute drew fresh seeds (preserve_rng_state=False), backward would use
    masks other than the forward's, and the gradients would be wrong."""
    model = patched_llama(0.1)
    ids = batches()[0]
    _, grads = _loss_and_grads(model, ids)
    model.gradient_checkpointing_enable({"use_reentrant": False, "preserve_rng_state": False})
    _, grads_ckpt = _loss_and_grads(model, ids)
    assert any(not torch.allclose(grads_ckpt[n], grads[n], rtol=1e-3, atol=1e-5) for n in grads)


def test_compiled_prefix_blocks_take_a_padded_batch():
    # prefix attention reads transformers' mask (is it causal? does it hide anything?) eagerly; a traced mask has no
    # values, so under compilation the module's own causal flag decides and the padding goes to the op as it is
    torch._dynamo.reset()
    model = patched_llama(0.0, "prefix").eval()
    ids = batches()[0]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    expected = model(input_ids=ids, attention_mask=mask).logits
    for block in model.model.layers:
        block.compile(fullgraph=True, backend="eager")  # a graph break here would raise
    out = model(input_ids=ids, attention_mask=mask).logits
    live = mask.bool()
    torch.testing.assert_close(out[live], expected[live], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()

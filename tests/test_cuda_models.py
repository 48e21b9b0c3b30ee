"""Model level on the GPU: every technique, patched into a tiny model, gives on CUDA the outputs and gradients it gives
on the CPU (float32), and LoRA in backend mode matches peft on CUDA. Skipped without a GPU (`pytest -m cuda`)."""
import copy

import pytest
import torch

import peftops
from tiny_models import BUILDERS, assert_close, input_ids, loss_of, output, outputs_match_then_backward, randomize_lora

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TECHNIQUES = {  # name: (config, families it applies to)
    "lora": (lambda: peftops.LoraConfig(r=4, alpha=8, bias="all"), ["llama", "gpt2", "bert"]),
    "rslora_dora": (lambda: peftops.LoraConfig(r=4, alpha=8, use_rslora=True, use_dora=True), ["llama", "gpt2"]),
    "prefix": (lambda: peftops.PrefixConfig(5), ["llama", "gpt2"]),
    "pfeiffer": (lambda: peftops.AdapterConfig(bottleneck=8, placement="pfeiffer", activation="silu"),
                 ["llama", "gpt2", "bert"]),
    "houlsby": (lambda: peftops.AdapterConfig(bottleneck=8, placement="houlsby", activation="gelu"), ["llama", "bert"]),
    "parallel": (lambda: peftops.AdapterConfig(bottleneck=8, placement="parallel"), ["llama"]),
    "ia3": (lambda: peftops.IA3Config(), ["llama", "gpt2", "bert"]),
    "bitfit": (lambda: peftops.BitFitConfig(), ["gpt2", "bert"]),
}
CASES = [pytest.param(t, f, id=f"{t}-{f}") for t, (_, families) in TECHNIQUES.items() for f in families]


@pytest.mark.parametrize("technique,family", CASES)
def test_cuda_model_matches_cpu_model(technique, family):
    torch.manual_seed(0)
    cpu = peftops.patch(BUILDERS[family](), TECHNIQUES[technique][0]()).train()
    with torch.no_grad():  # move every trainable tensor off its identity init, so each one matters
        for p in cpu.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    gpu = copy.deepcopy(cpu).cuda()
    ids = input_ids(batch=3, seq=9)
    out_cpu, out_gpu = output(cpu, ids), output(gpu, ids.cuda())
    assert torch.isfinite(out_gpu).all()
    assert_close(out_gpu.cpu(), out_cpu, 1e-4, what="outputs")
    loss_of(out_cpu).backward()
    loss_of(out_gpu).backward()
    cpu_params = dict(cpu.named_parameters())
    with_grad = [(n, p) for n, p in gpu.named_parameters() if p.grad is not None]
    assert with_grad  # (BERT's pooler gets none: the output is the last hidden state)
    assert [n for n, _ in with_grad] == [n for n, p in cpu.named_parameters() if p.grad is not None]
    for name, p in with_grad:
        assert_close(p.grad.cpu(), cpu_params[name].grad, 1e-4, what=f"grad of {name}")


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_backend_mode_matches_peft_on_cuda(family):
    peft = pytest.importorskip("peft")
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "dense"]}
    ref = peft.get_peft_model(BUILDERS[family](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets[family],
                                                                  fan_in_fan_out=family == "gpt2", bias="all"))
    randomize_lora(ref)
    ref = ref.cuda().train()
    ours = peftops.patch(copy.deepcopy(ref))
    ref_params = outputs_match_then_backward(ours, ref, input_ids().cuda(), rtol=1e-4)
    for name, p in ours.named_parameters():
        if ref_params[name].grad is not None:
            assert_close(p.grad, ref_params[name].grad, 1e-4, what=f"grad of {name}")


def test_bf16_llama_lora_training_step_on_cuda():
    """A bf16 model with LoRA and dropout trains on CUDA: finite loss that falls over a few AdamW steps, reproducible
    under torch.manual_seed."""
    def losses():
        torch.manual_seed(0)
        model = peftops.patch(BUILDERS["llama"](), peftops.LoraConfig(r=4, alpha=8, dropout=0.1))
        model = model.to("cuda", torch.bfloat16).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = input_ids(batch=4, seq=16).cuda()
        out = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    first = losses()
    assert all(torch.isfinite(torch.tensor(first))) and first[-1] < first[0]
    assert losses() == first

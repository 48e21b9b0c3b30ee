"""torch.save / torch.load of a whole patched model (not only its state dict): every technique's patched modules
pickle, the loaded model gives the same outputs and gradients, and it can still be unpatched; in a fresh process
too, where prefix tuning's attention function must be registered again."""
import os
import subprocess
import sys

import pytest
import torch

import peftops
from tiny_models import BUILDERS, input_ids, loss_of, output

CONFIGS = {
    "lora": lambda: peftops.LoraConfig(r=4, dropout=0.0), "dora": lambda: peftops.LoraConfig(r=4, use_dora=True),
    "ia3": lambda: peftops.IA3Config(), "bitfit": lambda: peftops.BitFitConfig(),
    "prefix": lambda: peftops.PrefixConfig(num_virtual_tokens=3),
    "pfeiffer": lambda: peftops.AdapterConfig(bottleneck=4, placement="pfeiffer"),
    "houlsby": lambda: peftops.AdapterConfig(bottleneck=4, placement="houlsby"),
    "parallel": lambda: peftops.AdapterConfig(bottleneck=4, placement="parallel"),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _patched(technique, family):
    model = peftops.patch(BUILDERS[family](), CONFIGS[technique]())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # away from the identity start, so that the adapters matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss_of(output(model, ids)).backward()
    return [p.grad for p in model.parameters() if p.requires_grad]  # (None for a bias the output does not reach)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("technique", sorted(CONFIGS))
def test_a_patched_model_pickles_whole(tmp_path, technique, family):
    if technique == "bitfit" and family == "llama":
        pytest.skip("BitFit needs biases (the tiny Llama has none)")
    model, ids = _patched(technique, family), input_ids()
    expected, grads = output(model, ids).detach(), _grads(model, ids)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(output(loaded, ids), expected, rtol=0, atol=0)
    loaded_grads = _grads(loaded, ids)
    assert len(loaded_grads) == len(grads) and any(g is not None for g in grads)
    for g, e in zip(loaded_grads, grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    before = output(BUILDERS[family](), ids)
    peftops.unpatch(loaded)
    if technique not in ("bitfit",):  # BitFit trains the biases themselves: unpatched, the model keeps them
        assert not torch.allclose(output(loaded, ids), expected)
    assert output(loaded, ids).shape == before.shape


def test_prefix_tuning_loads_in_a_fresh_process(tmp_path):
    model, ids = _patched("prefix", "llama"), input_ids()
    torch.save({"model": model, "ids": ids, "expected": output(model, ids).detach()}, tmp_path / "saved.pt")
    code = ("import sys, torch; sys.path[:0] = [{root!r}, {tests!r}]; import peftops; from tiny_models import output; "
            "d = torch.load({path!r}, weights_only=False); "
            "torch.testing.assert_close(output(d['model'], d['ids']), d['expected'], rtol=0, atol=0); print('ok')"
            ).format(root=ROOT, tests=os.path.join(ROOT, "tests"), path=str(tmp_path / "saved.pt"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

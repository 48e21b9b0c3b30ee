"""A short transformers.Trainer run (tiny Llama, LoRA with dropout 0.1, 4 steps, a checkpoint every 2) with a
peftops model, in backend mode (a patched peft model: Trainer writes peft's format itself) and in adapter mode
(peftops layers; PeftopsCheckpointCallback writes peft's format into each checkpoint). Each checkpoint loads with
`peft.PeftModel.from_pretrained` to the trained model's outputs, and resuming from the middle checkpoint ends
where the uninterrupted run ended (Trainer restores data order and the RNG state our dropout seeds come from)."""
import os

import pytest
import torch

import peftops
from lora_training import TARGETS
from tiny_models import VOCAB, assert_close, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

STEPS, SAVE_EVERY = 4, 2


def _dataset(n=16, seq=8):
    ids = torch.randint(VOCAB, (n, seq), generator=torch.Generator().manual_seed(4))
    return [{"input_ids": row, "labels": row} for row in ids]


def _backend_model():
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS)
    return peftops.patch(peft.get_peft_model(tiny_llama(), cfg))


def _adapter_model():
    return peftops.patch(tiny_llama(), peftops.LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=TARGETS))


MODES = {"backend": (_backend_model, []), "adapter": (_adapter_model, ["callback"])}


class _CountSteps(transformers.TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def _trainer(model, out, callbacks):
    from peftops.integrations import PeftopsCheckpointCallback
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=4,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, seed=7,
        dataloader_num_workers=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=_dataset(),
                                callbacks=[_CountSteps()] + [PeftopsCheckpointCallback() for _ in callbacks])


def _lora_state(model):
    """LoRA factors by module path, whichever mode (peft's `lora_A.default.weight` or our `lora_A`)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace("base_model.model.", "").replace(".default.weight", "")
            out[key] = p.detach().clone()
    return out


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", list(MODES))
def test_trainer_checkpoints_load_in_peft_and_resume(tmp_path, mode):
    build, callbacks = MODES[mode]
    model = build()
    start = _lora_state(model)
    trainer = _trainer(model, tmp_path / "run", callbacks)
    trainer.train()
    assert (tmp_path / "run" / f"checkpoint-{SAVE_EVERY}" / "adapter_model.safetensors").is_file()
    final = _lora_state(model)
    assert all((final[k] - start[k]).abs().max() > 1e-3 for k in final if "lora_B" in k)  # training happened

    ckpts = sorted(p for p in os.listdir(tmp_path / "run") if p.startswith("checkpoint-"))
    assert ckpts == [f"checkpoint-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    last = tmp_path / "run" / f"checkpoint-{STEPS}"
    assert (last / "adapter_config.json").is_file() and (last / "adapter_model.safetensors").is_file()

    # peft loads the last checkpoint onto a fresh base and computes what the trained model computes.
    ids = torch.randint(VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(last))
    assert_close(_logits(loaded, ids), _logits(model, ids), 1e-5, f"{mode}: peft-loaded checkpoint")

    # Resume from the middle checkpoint with a fresh model: the same end point as the uninterrupted run.
    resumed = build()
    trainer = _trainer(resumed, tmp_path / "run", callbacks)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / ckpts[0]))
    counter = next(c for c in trainer.callback_handler.callbacks if isinstance(c, _CountSteps))
    assert counter.steps == STEPS - SAVE_EVERY  # it resumed (a restart from scratch would also end the same)
    again = _lora_state(resumed)
    assert again.keys() == final.keys()
    for k in final:
        assert_close(again[k], final[k], 1e-5, f"{mode}: resumed {k}")

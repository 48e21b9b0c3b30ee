"""Glue for training frameworks. Needs transformers; `import peftops` does not import this module."""
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .io import save_adapter

__all__ = ["PeftopsCheckpointCallback"]


class PeftopsCheckpointCallback(TrainerCallback):
    """Writes the adapter of a peftops adapter-mode model into every Trainer checkpoint, in peft's format
    (`adapter_config.json` + `adapter_model.safetensors`), so that `peft.PeftModel.from_pretrained(base,
    checkpoint_dir)` loads it. Trainer's own files (the full model's weights, optimizer, scheduler, RNG states)
    stay beside it: `trainer.train(resume_from_checkpoint=...)` uses those. `subfolder` puts the adapter files in
    a folder of the checkpoint instead.

    Not needed in backend mode (a patched `peft.PeftModel`): Trainer saves peft's format itself.

        trainer = Trainer(model=peftops.patch(model, cfg), args=args, train_dataset=ds,
                          callbacks=[PeftopsCheckpointCallback()])
    """

    def __init__(self, subfolder=None):
        self.subfolder = subfolder

    def on_save(self, args, state, control, model=None, **kwargs):
        # Trainer calls this after writing checkpoint-<step>; one process writes (as Trainer does).
        if not state.is_world_process_zero or model is None:
            return control
        model = getattr(model, "module", model)  # the model itself, should a wrapper (DDP) be handed over
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_adapter(model, os.path.join(folder, self.subfolder) if self.subfolder else folder)
        return control

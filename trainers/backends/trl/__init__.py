"""The TRL backend: SFT, GRPO (with step-level advantages) and process reward models from the same recipe schema.

Reads top to bottom like the Lightning backend, in three modules: :mod:`.data` builds the data (prompt records ->
SFT / GRPO / reward-model datasets), :mod:`.trainers` holds the TRL/HF trainer classes (each calls the run's hook
driver), :mod:`.fit` builds the arguments, DeepSpeed config and callbacks, trains and saves (:class:`TRLBackend`).

Three algorithms (``trainer.trl.algorithm``):

- ``sft``: ``trl.SFTTrainer`` on ``{"prompt", "completion"}`` records, loss on the completion only.
- ``grpo``: ``trl.GRPOTrainer`` with the mitigations' reward functions. When a mitigation returns step rewards,
  ``ProcessGRPOTrainer`` replaces TRL's sequence-level advantages by DeepSeekMath's process-supervision advantages
  (arXiv 2402.03300, section 4.1.3): the step rewards of a group are normalised together and each token gets the sum
  of the normalised rewards of the steps that end at or after it.
- ``prm``: a token-classification model (one logit) trained with a plain ``transformers.Trainer`` and a binary
  cross-entropy at each step end (:class:`PRMTrainer`; TRL removed its PRMTrainer after 1.13).

DeepSpeed: ``trainer.strategy: deepspeed_stage_N`` hands a ZeRO config to the HF Trainer (``deepspeed=``), which runs on
CPU too (gloo). Multi-process runs start under a launcher: ``torchrun --nproc_per_node 2 -m llm_limits.trainers.cli
train R`` (``llm-limits train`` starts it itself for ``trainer.devices > 1``).
"""

from llm_limits.trainers.backends.trl.data import build_datasets, grpo_rows, load_prompt_records, prm_rows, split
from llm_limits.trainers.backends.trl.fit import (
    TRLBackend, deepspeed_config, ensure_distributed_env, fit, save_trained, training_kwargs,
)
from llm_limits.trainers.backends.trl.trainers import PRMTrainer, process_advantages, sft_trainer, token_char_spans

__all__ = ["PRMTrainer", "TRLBackend", "build_datasets", "deepspeed_config", "ensure_distributed_env", "fit", "grpo_rows",
           "load_prompt_records", "process_advantages", "prm_rows", "save_trained", "sft_trainer", "split",
           "token_char_spans", "training_kwargs"]

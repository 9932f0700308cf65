"""The finetuning config (one field per flag) and the DeepSpeed config it produces."""
from __future__ import annotations

from dataclasses import dataclass, field

from minimoe_common.cli import InputError, check_output_dir, refuse_invalid
from pipeline.optim import read_deepspeed_config

# `--grid` without explicit lists. The authors' finetuning scripts use lr 3e-5 with batch 16 on RTE and MRPC
# (GeneZC/StarK scripts/run_fintuning_rte.sh, GeneZC/MiniDisc bert_scripts/run_distillation_mrpc.sh) and lr 2e-5
# with batch 32 on QQP and CoNLL (MiniDisc run_distillation_qqp.sh, run_finetuning_conll.sh); the grid crosses
# those values. The released code holds no wider search space.
GRID_LR = (2e-5, 3e-5)
GRID_BATCH_SIZE = (16, 32)
DEFAULT_LR, DEFAULT_BATCH_SIZE = (5e-5,), (32,)
PKD_STRATEGIES = ("skip", "last")


@dataclass
class FinetuneConfig:
    """One finetuning job: a task, a model and its hyperparameters (lists make a grid).

    The authors' protocol (their StarK / MiniDisc finetuning scripts): dev scored every few steps, the best
    evaluation kept, early stopping, up to 10 epochs, clipping at 5. Clipping and selection are the defaults
    here; epochs, --eval-every and --patience default to short CPU runs (see each field for the authors' value)."""

    model: str
    """Model dir: an exported student or a Hugging Face encoder dir."""
    task: str
    """Task: sst2, mrpc, stsb, qqp, mnli, qnli, rte, conll2003 or cola (case and '-' ignored: SST-2 = sst2)."""
    data_dir: str
    """The task's folder, or a folder holding it as TASK/ or glue/TASK/."""
    output: str
    """Output dir: results.json, model/ (the best evaluation), tensorboard/; runs/ for a grid."""
    lr: list[float] | None = None
    """Peak learning rate(s) of AdamW; several values form a grid (default: 5e-5, or the grid's with --grid)."""
    batch_size: list[int] | None = None
    """Micro batch size(s) per process (overrides the ds_config's); under the launcher the global batch
    is this x processes (default: 32, or the grid's with --grid)."""
    seed: list[int] = field(default_factory=lambda: [42])
    """Random seed(s): head init, dropout, data order."""
    grid: bool = False
    """Grid over lr 2e-5, 3e-5 x batch 16, 32 x the seeds (the authors' values); an explicit --lr or
    --batch-size replaces the grid's values for that axis. The best dev run is kept."""
    epochs: float = 3.0
    """Training epochs (fractions allowed); the authors train up to 10 with early stopping."""
    eval_every: int = 0
    """Score dev every N optimizer steps and after the last one; 0: after each epoch. The authors score
    every 10 steps on RTE and MRPC, 100 on CoNLL, 3000 on QQP."""
    patience: int = 0
    """Stop after this many dev evaluations in a row without a higher paper metric than the best one;
    0: never stop early. (The authors stop 5 epochs of steps after the best evaluation.)"""
    max_grad_norm: float = 5.0
    """Gradient clipping by global norm, 0 = none (the authors: 5)."""
    warmup: float = 0.1
    """Linear warmup, as a fraction of the steps; then linear decay to 0."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm)."""
    max_seq_length: int = 128
    """Tokens per example after truncation."""
    max_train_examples: int | None = None
    """Use only the first N training examples (e.g. 20000 for SST-2); default: all."""
    teacher: str | None = None
    """Finetuned model dir for task-specific KD (the paper's KD rows; its PKD row with --pkd-beta)."""
    kd_alpha: float | None = None
    """Weight of the KD term; 1 - kd_alpha weighs the task loss (default: 0.5, or 0.7 with --pkd-beta)."""
    temperature: float | None = None
    """Softmax temperature of the KD term (default: 1, or 10 with --pkd-beta)."""
    pkd_beta: float = 0.0
    """PKD (Sun et al. 2019, patient KD): weight beta of the patient loss added to KD, the squared difference of
    the L2-normalised [CLS] states of mapped student and teacher layers, averaged over the batch, the pairs and
    the hidden units as the authors' code does (the paper's sum / (pairs x hidden), the scale their beta
    was tuned on); 0 = off; > 0 needs --teacher of the student's hidden size. The authors' PKD recipe (their
    code's predefined PKD arguments, intersun/PKD-for-BERT-Model-Compression; the paper's grid: beta 10, 100,
    500, 1000 x alpha 0.2, 0.5, 0.7 x T 5, 10, 20): beta 500, alpha 0.7 and T 10 (the defaults of --kd-alpha
    and --temperature with --pkd-beta), lr 1e-5."""
    pkd_strategy: str = field(default="skip", metadata={"choices": PKD_STRATEGIES})
    """PKD's layer mapping of student layers 1 .. Ls-1 (the last one learns through the logits): skip, to
    teacher layers k x Lt / Ls, rounded down (12 -> 6: 2, 4, 6, 8, 10); last, to the teacher's Ls-1 layers
    before its last (12 -> 6: 7 to 11)."""
    moebert_distill: float = 0.0
    """MoEBERT's layer-wise distillation (Zuo et al. 2022; the authors' code, SimiaoZuo/MoEBERT
    modeling_bert_moe.py get_distillation_loss): loss = task loss + this weight x (the MSE of every hidden state,
    the embeddings' output included, summed over the states, + the symmetric KL of the predictions, MSE for
    regression); 0 = off; > 0 needs --teacher of the student's depth and width (a student from minimoe-moebert).
    Their MNLI script: 5, with lr 5e-5, batch 64, 5 epochs, --warmup 0 and --weight-decay 0. --kd-alpha and
    --temperature do not apply."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON config (e.g. ds_configs/zero2.json); default: ZeRO-0 fp32."""

    def __post_init__(self) -> None:
        # None = not given: explicit values win over the grid's
        self.lr = self.lr or list(GRID_LR if self.grid else DEFAULT_LR)
        self.batch_size = self.batch_size or list(GRID_BATCH_SIZE if self.grid else DEFAULT_BATCH_SIZE)
        self.kd_alpha = (0.7 if self.pkd_beta else 0.5) if self.kd_alpha is None else self.kd_alpha
        self.temperature = (10.0 if self.pkd_beta else 1.0) if self.temperature is None else self.temperature
        refuse_invalid(self, {
            "lr": (all(v > 0 for v in self.lr), "must be > 0"),
            "batch_size": (all(v >= 1 for v in self.batch_size), "must be >= 1"),
            "epochs": (self.epochs > 0, "must be > 0"),
            "eval_every": (self.eval_every >= 0, "must be >= 0 (0: each epoch)"),
            "patience": (self.patience >= 0, "must be >= 0 (0: never stop early)"),
            "max_grad_norm": (self.max_grad_norm >= 0, "must be >= 0 (0: no clipping)"),
            "warmup": (0 <= self.warmup < 1, "must be in [0, 1)"),
            "weight_decay": (self.weight_decay >= 0, "must be >= 0"),
            "max_seq_length": (self.max_seq_length >= 2, "must be >= 2 ([CLS] and [SEP])"),
            "max_train_examples": (self.max_train_examples is None or self.max_train_examples >= 1, "must be >= 1"),
            "kd_alpha": (0 <= self.kd_alpha <= 1, "must be in [0, 1]"),
            "temperature": (self.temperature > 0, "must be > 0"),
            "pkd_beta": (self.pkd_beta >= 0, "must be >= 0 (0: off)"),
            "pkd_strategy": (self.pkd_strategy in PKD_STRATEGIES, f"must be one of {', '.join(PKD_STRATEGIES)}"),
            "moebert_distill": (self.moebert_distill >= 0, "must be >= 0 (0: off)"),
        })
        for flag, weight, method in (("--pkd-beta", self.pkd_beta, "PKD"),
                                     ("--moebert-distill", self.moebert_distill, "MoEBERT")):
            if weight and self.teacher is None:
                raise InputError(f"{flag} {weight:g} needs --teacher: {method} distils a model finetuned on the task")
        if self.pkd_beta and self.moebert_distill:
            raise InputError("--pkd-beta and --moebert-distill are two methods' layer losses: give one")
        check_output_dir(self.output, "--output")


# ds_config keys that finetune's flags own: a config setting them is refused rather than ignored.
OWNED_DS_KEYS = {
    "train_batch_size": "--batch-size", "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--batch-size", "gradient_clipping": "--max-grad-norm",
    "optimizer": "--lr / --weight-decay", "scheduler": "--lr / --warmup",
}


def deepspeed_config(path: str | None, batch_size: int, max_grad_norm: float) -> dict:
    """The ds_config (ZeRO stage, precision; default ZeRO-0 fp32) with batch and clipping from the flags."""
    config = read_deepspeed_config(path, OWNED_DS_KEYS, "minimoe-finetune") if path else {
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    return {**config, "train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": max_grad_norm}

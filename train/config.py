"""``lens train`` settings: the fine-tuning card's defaults and ranges, validated before any compute."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lens.runtime.config import DecodeConfig, ModelConfig, StrictModel

from .tracking import MlflowConfig

__all__ = ["TrainConfig", "RANGES", "recommended", "effective_settings", "GUIDANCE", "MIN_PER_CLASS", "SMALL_DATASET"]

#: setting -> (low, high): the card's ranges; a value outside is refused naming its range
RANGES: dict[str, tuple[float, float]] = {
    "batch_size": (8, 64),
    "epochs": (5, 50),
    "lr": (1e-4, 5e-3),
    "dropout": (0.0, 0.5),
    "val_fraction": (0.05, 0.5),
    "test_fraction": (0.05, 0.5),
    "finetune_epochs": (1, 50),
    "backbone_lr_mult": (0.001, 1.0),
    "label_smoothing": (0.0, 0.3),
    "target_precision": (0.5, 1.0),
    "dedup_threshold": (0.8, 1.0),
}
#: a class with fewer images than this is refused
MIN_PER_CLASS = 5
#: fewer images than this in all gets the card's warning
SMALL_DATASET = 500
GUIDANCE = ("the fine-tuning guidance asks for at least 500 images (2,000+ is better); with 500-1,000 images "
            "use 20-40 epochs, lr 5e-4 and dropout 0.3-0.4 (--recommended chooses them)")


class TrainConfig(StrictModel):
    """One ``lens train`` run."""

    data: str = Field(..., description="training images: a folder with one sub-folder per class (or train/ and val/ "
                      "folders of them), local or s3://; or Parquet shards with id, image and label columns")
    output: str = Field(..., description="model package directory or s3:// prefix (written atomically)")
    name: str | None = Field(None, description="the package's name (the key of its tags in answers); default: "
                             "the output's last path component")
    mode: Literal["auto", "head", "finetune"] = Field(
        "auto", description="head: a classifier on the frozen backbone's embeddings (seconds on a CPU); finetune: "
        "the network itself on Ray Train, starting from a classifier trained on its frozen features (LP-FT), the "
        "head trained too for comparison; auto: the head, and a fine-tune as well where the training set has at "
        "least finetune_min_per_class images per class, packaging whichever is better on validation")
    val_data: str | None = Field(None, description="a validation folder of the same classes; default: DATA/val "
                                 "when DATA holds train/ and val/, else a stratified split of DATA")
    test_data: str | None = Field(None, description="a test folder of the same classes, never used to choose "
                                  "anything, only to report; default: DATA/test when present, else half of the "
                                  "given validation set, else a stratified split of DATA (test_fraction)")
    feedback: str | None = Field(None, description="labeled feedback (the /v1/feedback sink): items whose id the "
                                 "feedback_index holds and whose first label is a training class join the training split")
    feedback_index: str | None = Field(None, description="with feedback: the index the service searched; feedback ids "
                                       "are looked up among its ids and their images read from where it says, never "
                                       "opened as paths")
    val_fraction: float = Field(0.2, description="share of each class held out for validation: early stopping, "
                                "the best checkpoint and the per-class thresholds are chosen on it (seeded, stratified)")
    test_fraction: float = Field(0.2, description="share of each class held out for the test split, where the "
                                 "reported accuracy, precision and recall are measured (seeded, stratified)")
    batch_size: int = Field(32, description="images per optimisation step")
    epochs: int = Field(10, description="passes over the training set (early stopping may end sooner)")
    lr: float = Field(1e-3, description="peak learning rate (AdamW, cosine schedule)")
    dropout: float = Field(0.2, description="dropout before the classifier")
    label_smoothing: float = Field(0.1, description="cross-entropy label smoothing")
    weight_decay: float = Field(1e-4, ge=0, le=0.5, description="AdamW weight decay")
    patience: int = Field(5, ge=0, description="stop after this many epochs without a better validation top-1 "
                          "(0 = never stop early)")
    recommended: bool = Field(False, description="derive epochs, lr and dropout from the dataset size (the card's "
                              "guidance); settings given explicitly win")
    dedup: bool = Field(False, description="remove training images that nearly duplicate a validation image "
                        "(otherwise they are only reported)")
    dedup_threshold: float = Field(0.97, description="embedding cosine at or above which two images are near-"
                                   "duplicates")
    target_precision: float = Field(0.9, description="per-class score thresholds are tuned on validation to "
                                    "reach this precision")
    seed: int = Field(0, description="seeds the split, the shuffling and the initialisation: head mode repeats "
                      "bit for bit on the same machine; recorded in the package")
    overwrite: bool = Field(False, description="replace a package already at output")
    id_column: str = Field("id", description="Parquet input: the id column")
    image_column: str = Field("image", description="Parquet input: the encoded-image column")
    label_column: str = Field("label", description="Parquet input: the class-name column")
    # finetune
    workers: int = Field(1, ge=1, description="finetune: Ray Train workers (DDP over gloo on CPU, NCCL on GPU)")
    use_gpu: bool = Field(False, description="finetune: one GPU per worker")
    cpus_per_worker: float | None = Field(None, gt=0, description="finetune: CPUs reserved per worker; None = "
                                          "share the cluster's CPUs less one, which is left to Ray Data's "
                                          "decode and augmentation tasks")
    unfreeze: Literal["top", "all"] = Field("top", description="finetune, second phase: unfreeze the top blocks "
                                            "or the whole backbone")
    finetune_epochs: int = Field(5, description="finetune: epochs of the network after the classifier is trained on "
                                 "its frozen features (validated after each; the best checkpoint is kept, the "
                                 "starting classifier included)")
    backbone_lr_mult: float = Field(0.1, description="finetune: the backbone learns at lr x this (the classifier at "
                                    "lr): a trained classifier is not undone by large backbone steps")
    warmup_epochs: float = Field(1.0, ge=0, le=10, description="finetune: linear learning-rate warm-up, then cosine "
                                 "decay to zero")
    freeze_bn_below: int = Field(64, ge=0, description="finetune: BatchNorm running statistics stay frozen when a "
                                 "worker's batch is smaller than this (small batches give noisy statistics)")
    finetune_min_per_class: int = Field(200, ge=1, description="mode auto: fine-tune too when the training split "
                                        "has at least this many images per class on average")
    checkpoint_storage: str | None = Field(None, description="finetune: where Ray Train keeps checkpoints (a "
                                           "shared path or s3:// prefix on a multi-node cluster); None = a local "
                                           "temporary directory (one machine)")
    max_failures: int = Field(2, ge=0, description="finetune: worker failures survived by resuming from the last "
                              "checkpoint")
    mlflow: MlflowConfig | None = Field(None, description="log the run to MLflow: settings, each epoch, the "
                                          "metrics, the confusion matrix and the package (lens train --mlflow)")
    address: str | None = Field(None, description="Ray cluster to join (auto, ray://HOST:10001, HOST:6379); None = "
                                "RAY_ADDRESS, else Lens's own local Ray instance")
    model: ModelConfig = Field(default_factory=ModelConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)

    @field_validator(*RANGES)
    @classmethod
    def _in_range(cls, v, info):
        lo, hi = RANGES[info.field_name]
        if not lo <= v <= hi:
            raise ValueError(f"{info.field_name} must be in {lo:g}..{hi:g} (the fine-tuning card's range), got {v:g}")
        return v

    @property
    def package_name(self) -> str:
        return self.name or self.output.rstrip("/").rsplit("/", 1)[-1]


def recommended(n_images: int) -> dict:
    """The card's settings for a training set of ``n_images``: small sets train longer, slower and with more
    dropout; large sets shorter, faster and with less."""
    if n_images < 1000:
        return {"epochs": 30, "lr": 5e-4, "dropout": 0.35}
    if n_images <= 10_000:
        return {"epochs": 15, "lr": 1e-3, "dropout": 0.2}
    return {"epochs": 8, "lr": 2e-3, "dropout": 0.12}


SETTINGS = ("epochs", "lr", "batch_size", "dropout", "label_smoothing", "weight_decay", "patience", "seed")


def effective_settings(cfg: TrainConfig, n_train: int) -> tuple[dict, dict]:
    """(settings used, what --recommended chose): recommended values apply to settings not given explicitly."""
    chosen = recommended(n_train) if cfg.recommended else {}
    explicit = cfg.model_fields_set
    applied = {k: v for k, v in chosen.items() if k not in explicit}
    settings = {k: getattr(cfg, k) for k in SETTINGS} | applied
    return settings, applied

"""The sections of params.yaml, one validated model each (data, model, train, evaluate, anomaly,
probe, generation, registry, promotion, orchestration, monitor): every knob, its default, its
bounds and what it does."""

from __future__ import annotations

import re
import zoneinfo
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = "fashion-mnist"
    """"fashion-mnist", `idx:<folder>` (the four MNIST-layout IDX files: MNIST, KMNIST,
    EMNIST, Fashion-MNIST; labels and a classes.txt optional), a folder of images, a
    .zip/.tar/.tar.gz/.tgz archive of images, or an S3 prefix s3://bucket/prefix (boto3;
    endpoint, region and credentials from the AWS chain)."""
    fashion_mnist_dir: str | None = "/usr/share/datasets/fashion-mnist"
    """Folder with the Fashion-MNIST IDX .gz files; None lets torchvision download them."""
    raw_dir: str = "data/raw"
    prepared_dir: str = "data/prepared"
    image_size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    limit: int | None = Field(None, ge=1)
    on_bad_image: Literal["skip", "fail"] = "skip"
    """skip = leave unusable files out and list them in the ingest report; fail = stop before
    anything is written, naming them."""
    max_image_pixels: int = Field(89_478_485, ge=1)
    """Images with more pixels (width x height, read from the header) are refused before
    decoding: the decompression-bomb guard. The default is Pillow's own limit."""
    decode_workers: int | None = Field(None, ge=1, le=256)
    """Processes that check and decode images at ingest and prepare (used from 4,096 files up;
    fewer are handled in-process); null = one per CPU core."""
    layout: Literal["shards", "files"] = "shards"
    """How a folder, archive or S3 source is snapshotted into raw_dir: shards = tar files in
    the WebDataset layout with a manifest (an append writes new shards, DVC versions a few
    large files); files = one file per image (one DVC object each: fine for thousands, hours
    at a million)."""
    shard_bytes: int = Field(128 * 2**20, ge=4096)
    """Size a shard is closed at (bytes; an image larger than that gets a shard of its own)."""
    remote: Literal["local", "s3"] = "local"
    s3_url: str | None = None
    push_attempts: int = Field(3, ge=1, le=20)
    """Tries of `dvc push` (with backoff) before an ingest gives up; a version is recorded only
    once its objects are in the remote."""

    @field_validator("source")
    @classmethod
    def _idx_folder(cls, value: str) -> str:
        if value.startswith("idx:") and not value[4:].strip():
            raise ValueError("idx: needs a folder, e.g. idx:/data/mnist")
        return value

    @field_validator("s3_url")
    @classmethod
    def _s3_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("s3://"):
            raise ValueError("must start with s3:// (e.g. s3://bucket/prefix)")
        return value


class ModelConfig(Section):
    latent_dim: int = Field(32, ge=1, le=4096)
    likelihood: Literal["bernoulli", "gaussian", "discretized_logistic"] = "bernoulli"
    """p(x|z): Bernoulli on the decoder's logits (the seed's BCE; a normalised density only of
    binarized data: see train.binarize), a Gaussian around sigmoid(logits) with one learned
    sigma, or a discretized logistic over the 256 levels of 8-bit pixels (mean and scale per
    pixel; the one whose bits/dim of intensity data compare with published tables)."""


class TrainConfig(Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0)
    nproc_per_node: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    """torchrun ranks on this node; auto = one per visible GPU when training on CUDA, 2 on
    CPU (gloo). A rank without a GPU of its own is refused."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(100, ge=1)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """DataLoader worker processes per rank when the split is not resident on the device;
    auto = 0 on CPU, up to 4 per rank on CUDA (pinned memory, prefetching)."""
    resident_data: bool | Literal["auto"] = "auto"
    """Keep the training and validation splits on the device as uint8 and gather each batch
    there (in the sampler's order: the same batches as the loader). auto = when they take at
    most 25% of the device's memory (a card's total memory; on CPU the RAM's share of each
    rank on the node); true = always; false = the loader."""
    max_bad_steps: int = Field(0, ge=0)
    """Steps with a non-finite loss or gradient to skip (optimizer step not taken) before
    stopping; 0 = stop at the first one, checked without a per-step host sync."""
    checkpoint_every: int = Field(0, ge=0)
    """Optimizer steps between mid-epoch checkpoints (0 = at the end of each epoch only). A
    restart resumes at the exact step: sampler position, noise and RNG states included."""
    kl_warmup_steps: int = Field(0, ge=0)
    """KL warm-up: the KL term's weight beta rises linearly from 0 to 1 over this many
    optimizer steps (0 = beta is 1 throughout: the plain ELBO)."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step on each rank; the global batch stays train.batch_size,
    so the result is the same, with less memory per micro-batch."""
    nnodes: int = Field(1, ge=1, le=1024)
    """Nodes (machines) in the job; > 1 needs train.rdzv_endpoint, and every node runs the
    same `vae-pipeline train` command."""
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous (on one of the nodes) when train.nnodes > 1."""
    rdzv_id: str = Field("vae-pipeline", min_length=1)
    """Rendezvous job id: the same on every node of one job, different for concurrent jobs."""
    max_restarts: int = Field(0, ge=0)
    """Times torchrun restarts the workers after a failure (e.g. a killed rank); each restart
    resumes from the last checkpoint."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = chosen by the step probe where bf16 runs at speed (CUDA cards with bf16; CPUs with
    AVX-512 BF16 or AMX): bf16 autocast or fp32, whichever is faster at this shape (bf16 pays
    at 3x250x250 on an H100, not at 1x32x32); fp32 elsewhere. bf16 = require it (refused where
    it is emulated, far slower than fp32). The likelihood head and the loss terms stay fp32."""
    channels_last: bool | Literal["auto"] = "auto"
    """Convolutions in NHWC memory layout; auto = chosen by the step probe (timed against NCHW
    on this device, shape and batch); the same numbers up to float rounding."""
    compile: bool | Literal["auto", "reduce-overhead"] = "auto"
    """torch.compile the training forward and backward; reduce-overhead = with CUDA graphs
    (for launch-bound small shapes, one rank). auto = probed on CUDA, off on CPU (compiling
    costs a minute and needs a C++ compiler there)."""
    fused_adam: bool | Literal["auto"] = "auto"
    """Adam's fused kernel (one launch for every parameter); auto = probed on CUDA, off on CPU
    (where the default implementation keeps the CPU runs' bits as they were); true works on
    CPU too."""
    deterministic: bool = True
    """true = bitwise-reproducible kernels on CUDA (cuDNN deterministic, no cuDNN benchmark, no
    TF32), so resume and rank parity hold bit for bit there as on CPU; false = cuDNN's fastest
    algorithms and TF32 (faster on a GPU, runs differ in the last bits). No effect on CPU."""
    autotune_cache: str | None = None
    """JSON file of step-probe results, per device, torch version, shape and batch (null =
    ~/.cache/vae-pipeline/step-plans.json, or under $XDG_CACHE_HOME)."""
    out_dir: str = "models"
    binarize: Literal["none", "fixed", "dynamic"] = "none"
    """How the Bernoulli likelihood meets [0, 1] intensities in training: as they are (the
    seed's loss; not a normalised density), thresholded at 0.5, or dynamic: a fresh seeded
    Bernoulli draw of every pixel each time an image is seen (the standard protocol of binarized
    MNIST benchmarks; independent of ranks and batching, exact across a resume)."""
    objective: Literal["elbo", "iwae"] = "elbo"
    """elbo = the VAE's one-sample bound; iwae = the importance-weighted bound with
    train.iw_samples samples per image (Burda et al. 2016): tighter, more active units,
    about K times the decoder's cost. With iw_samples 1 both are the ELBO."""
    iw_samples: int = Field(1, ge=1, le=4096)
    """K of the iwae objective (posterior samples per training image)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant, or cosine decay from train.lr to train.lr_min over the run's steps
    (train.epochs x steps per epoch); a function of the step, so a resume is exact."""
    lr_min: float = Field(0.0, ge=0.0)
    """Learning rate at the end of a cosine schedule."""
    lr_warmup_steps: int = Field(100, ge=0)
    """A learning rate above train.lr_warmup_start starts there and rises linearly to its
    schedule's value over this many optimizer steps (0 = none). Adam's first step moves every
    weight by about lr whatever the gradient's size; at lr 1e-2 that blew the encoder's
    log-variance up to exp overflow at step 2 (docs/training.md)."""
    lr_warmup_start: float = Field(1e-3, gt=0.0)
    """Where a larger learning rate's warm-up starts: the largest rate measured to take the
    first Adam step safely (the default lr). Rates up to it are used as they are from step 0."""

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port, e.g. 10.0.0.1:29400")
        return value

    @model_validator(mode="after")
    def _multi_node_needs_endpoint(self) -> TrainConfig:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"train.nnodes={self.nnodes} needs train.rdzv_endpoint=host:port, a port on one "
                "of the nodes that every node can reach"
            )
        return self


class EvaluateConfig(Section):
    iw_samples: int = Field(16, ge=1)
    iw_chunk: int = Field(16, ge=1)
    batch_size: int = Field(500, ge=1)
    seed: int = Field(0, ge=0)
    active_unit_threshold: float = Field(0.01, gt=0.0)
    n_samples: int = Field(64, ge=1, le=1024)
    reports_dir: str = "reports"
    mi_examples: int = Field(2000, ge=2, le=20000)
    nproc_per_node: int = Field(1, ge=1, le=256)
    """torchrun ranks that share the test examples (same numbers as 1; for several GPUs)."""
    binarize: Literal["auto", "none", "fixed", "dynamic"] = "auto"
    """How [0, 1] intensities meet the Bernoulli likelihood: auto = as the model was trained
    (train.binarize), none = as they are, fixed = thresholded at 0.5, dynamic = one seeded
    Bernoulli draw per pixel (the same draw for an image whatever the batch or rank).
    Recorded with the metrics and in the eval key: published NLLs differ by it."""


class AnomalyConfig(Section):
    """Anomaly detection: the held-out-class benchmark and the threshold stored with the model."""

    holdout_class: str | None = None
    """A label (its name, e.g. Bag, or its index) left out of training and validation; the test
    images of it are the anomalies for AUROC/AUPRC. null = no benchmark (the threshold is still
    calibrated). Likelihood scores rank simple images as typical: see the README."""
    score: Literal["iw_nll", "neg_elbo", "complexity", "typicality"] = "typicality"
    """The score the threshold applies to, higher = more anomalous: iw_nll (the negative IW
    bound, K = evaluate.iw_samples, nats), neg_elbo (nats), complexity (iw_nll minus the image's
    length under a generic compressor, nats) or typicality (the default: iw_nll, the image's
    structure and the corrected score, each tested two-sided against validation images; -log
    of a tail probability). Measured in docs/evaluation.md: only typicality flags noise and
    constant images; see `vae_pipeline.evaluate.anomaly`."""
    threshold_percentile: float = Field(99.0, gt=0.0, lt=100.0)
    """Threshold = this percentile of the validation images' scores: about (100 - p)% of
    normal images are flagged."""
    calibration_images: int = Field(4000, ge=4)
    """Validation images scored for the threshold (a seeded sample when there are more); for
    typicality half are its reference and half set the threshold."""

    @field_validator("holdout_class", mode="before")
    @classmethod
    def _name_or_index(cls, value: object) -> str | None:
        if value is not None and not isinstance(value, str | int) or isinstance(value, bool):
            raise ValueError("must be a label name or index, or null")
        if value is not None and not str(value).strip():
            raise ValueError("must be a label name or index, or null")
        return None if value is None else str(value)


class ProbeConfig(Section):
    """Few-label learning: logistic regression on latent means vs on raw pixels."""

    labels_per_class: list[int] = Field(default_factory=lambda: [10, 100], min_length=1)
    """Labelled training images per class (each N is measured separately)."""
    draws: int = Field(5, ge=1, le=100)
    """Independent label draws per N; accuracy is reported as mean and standard deviation."""
    seed: int = Field(0, ge=0)
    max_iter: int = Field(1000, ge=10)
    """Iterations of the logistic regression's solver (L-BFGS)."""

    @field_validator("labels_per_class")
    @classmethod
    def _positive_unique(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value) or len(set(value)) != len(value):
            raise ValueError("must be distinct positive counts, e.g. [10, 100]")
        return sorted(value)


class GenerationConfig(Section):
    """Sample quality: a Frechet distance in a feature space fitted here (no downloaded weights)."""

    fd_images: int = Field(2000, ge=10)
    """Prior samples, and real test images, compared by the Frechet distance."""
    fd_components: int = Field(32, ge=1, le=512)
    """Principal components of the test images that make the feature space."""


class RegistryConfig(Section):
    tracking_uri: str | None = None
    experiment: str = Field("vae-pipeline", min_length=1)
    model_name: str = Field("conv-vae", min_length=1)
    # each epoch's weights as a logged model of the run (tracking.CheckpointModels): 0.07 s
    # against an 82 s make-run epoch on CPU (measured, bench/checkpoint_models.py); the cost
    # is the artifact store's size (the weights once per epoch: 214 MB at the seed's size)
    log_checkpoints: bool = True


class PromotionConfig(Section):
    enabled: bool = True
    metric: Literal["iw_nll", "elbo_nll"] = "iw_nll"
    min_improvement_nats: float = Field(0.0, ge=0.0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    bootstrap_samples: int = Field(2000, ge=100, le=100_000)
    bootstrap_seed: int = Field(0, ge=0)
    min_active_units: int = Field(1, ge=0)
    lock_timeout_s: float = Field(300.0, gt=0.0)
    lock_stale_s: float = Field(900.0, gt=0.0)
    floors: dict[str, float] = Field(default_factory=dict)
    """Extra criteria on the uses' metrics: metric -> how much worse than the champion's the
    candidate's value may be (its own units), e.g. {anomaly_auroc: 0.01}. Compared only when
    both were measured the same way; see floor_metrics for the names."""

    @field_validator("floors")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if v < 0]
        if bad:
            raise ValueError(f"allowed worsening must be >= 0 (got {bad[0]}: {value[bad[0]]})")
        return value


# The uses' metrics that promotion.floors may name, and whether higher is better. The probe's
# accuracies are named per labels-per-class N (probe_latent_acc_n10, ...).
USE_METRICS_HIGHER_BETTER = {"anomaly_auroc": True, "anomaly_auprc": True, "sample_fd": False}


PROBE_METRIC = "probe_latent_acc_n{n}"


def floor_metrics(labels_per_class: list[int]) -> dict[str, bool]:
    """Every metric promotion.floors may name -> higher is better."""
    probes = {PROBE_METRIC.format(n=n): True for n in labels_per_class}
    return {**USE_METRICS_HIGHER_BETTER, **probes}


_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-?LW#]+$")


def check_cron(value: str | None) -> str | None:
    """A 5-field cron expression (minute hour day month weekday) or None; Prefect checks the
    ranges again when the deployment is created."""
    if value is not None:
        fields = value.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError("must be a 5-field cron expression, e.g. '0 3 * * 0', or null")
    return value


class OrchestrationConfig(Section):
    """How Prefect runs the retrain: deployments, schedule, retries, timeouts, the GPU lock."""

    work_pool: str = Field("vae-pipeline", min_length=1)
    """Prefect work pool the deployments run on; `vae-pipeline deploy` creates it (type
    process) when missing."""
    retrain_cron: str | None = "0 3 * * 0"
    """Cron schedule of the `retrain` deployment (null = no schedule: runs when triggered)."""
    timezone: str = Field("UTC", min_length=1)
    retries: int = Field(3, ge=0, le=20)
    """Retries of the steps that touch the network (MLflow, the DVC remote, S3); training is
    never retried (a divergence would only diverge again; a restart resumes its checkpoint)."""
    retry_delay_s: float = Field(10.0, ge=0.0)
    """First retry's delay; it doubles at each further retry (exponential backoff, jittered)."""
    step_timeout_s: float | None = Field(3600.0, gt=0.0)
    """Time limit of every step but training (null = none)."""
    train_timeout_s: float | None = Field(86400.0, gt=0.0)
    """Time limit of training; at the limit torchrun and its ranks are stopped (null = none)."""
    train_lock: str = Field("vae-pipeline-train@{host}", min_length=1)
    """Prefect global concurrency limit held while training: two retrains never train on the
    same GPUs at once. `{host}` becomes the worker's host name (one lock per GPU machine)."""
    train_lock_slots: int = Field(1, ge=1, le=64)
    """Trainings allowed at once under that lock."""

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone, e.g. UTC or Europe/Berlin") from None
        return value


class MonitorConfig(Section):
    """The `monitor` flow: score new data with the champion, retrain on a shift."""

    source: str | None = None
    """Where new images land (a folder, an archive or s3://bucket/prefix); null = data.source."""
    snapshot_dir: str = "data/monitor"
    """Local, incremental snapshot of monitor.source (not versioned: only scored)."""
    cron: str | None = "0 * * * *"
    """Cron schedule of the `monitor` deployment (null = no schedule)."""
    always_retrain: bool = False
    """The monitor schedule starts a retrain whatever the shift (the shift is still measured)."""
    max_images: int = Field(2000, ge=2)
    """Images scored per check (a seeded random sample when the snapshot holds more); the
    latent check compares them with as many of the prepared test images."""
    threshold_nats: float = Field(5.0, ge=0.0)
    """The likelihood check fires when the mean negative ELBO of the new images differs from
    the champion's on its own test set by more than this, either way (nats per image)."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """1 - the false-alarm rate of the whole decision on in-distribution images: each of the k
    checks runs at level (1 - confidence) / k (Bonferroni)."""
    latent_check: bool = True
    """Also test the new images' encoder means against the prepared test images' (MMD
    permutation test): sees changes the mean likelihood cannot."""
    permutations: int = Field(200, ge=20, le=100_000)
    """Permutations of the latent check's MMD test (its p-value's resolution is 1/(n+1))."""
    retrain_on: Literal["monitored", "data_source"] = "monitored"
    """What a drift-triggered retrain trains on: monitored = a new data version ingested from
    the monitored source (its images, old and new); data_source = data.source as scheduled
    (the new images enter only if they land there)."""
    seed: int = Field(0, ge=0)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return check_cron(value)

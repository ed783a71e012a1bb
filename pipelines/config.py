"""Typed, validated view of params.yaml: the only place defaults and limits live.

Every stage calls `load_params()` first, so an unknown key, a wrong type or an
impossible value stops the stage before any compute with a message naming the key.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gancore.augment import ADA_OPS, ADAPTIVE, POLICIES
from gancore.losses import LOSSES, SMOOTHABLE
from gancore.metrics.registry import SET_METRICS, MetricSettings
from gancore.models import FAMILIES, ModelSpec
from gancore.models.layers import IMAGE_SIZES, scaled_base_channels
from gancore.step import StepSettings
from pipelines.errors import UserError

PARAMS_FILE = Path("params.yaml")
AUTO_TRIALS = 4  # tune.num_samples: auto, up to 32 px
AUTO_MODE_SEEKING = 1.0  # model.mode_seeking: auto, for class-conditional models (MSGAN's own weight)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class ConfigError(UserError, ValueError):
    """params.yaml does not describe a runnable pipeline."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


def s3_or_local(uri: str, what: str) -> str:
    """`uri` when it is s3://... or a path; the pipeline reads and writes nothing else (gs://, az://, ...)."""
    if "://" in uri and not uri.startswith("s3://"):
        raise ValueError(f"{uri.split('://')[0]}:// {what} are not supported; use s3://bucket/prefix (any"
                         " S3-compatible store via AWS_ENDPOINT_URL) or a local or shared folder")
    return uri


class DataParams(Section):
    source: str
    image_size: int
    channels: Literal[1, 3]
    background: Literal["white", "black"]
    test_fraction: Fraction
    shard_size: PositiveInt
    split_seed: int
    download_workers: PositiveInt
    resize_filter: Literal["lanczos", "bicubic", "hamming", "bilinear", "box"]  # PIL's antialiasing filters, by name
    max_image_pixels: PositiveInt
    min_image_side: PositiveInt
    on_error: Literal["skip", "fail"]
    max_rejected_fraction: Annotated[float, Field(ge=0, lt=1)]

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value not in IMAGE_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, IMAGE_SIZES))} (a power of two the models support)")
        return value

    @field_validator("source")
    @classmethod
    def _source_uri(cls, value: str) -> str:
        if value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError("s3:// URI needs a bucket, e.g. s3://my-bucket/images")
        return s3_or_local(value, "sources").rstrip("/")


class FeaturenetParams(Section):
    epochs: PositiveInt
    encoder_steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    feature_dim: PositiveInt
    seed: int
    reference_images: Annotated[int, Field(ge=2)]


class ModelParams(Section):
    family: str
    latent_dim: PositiveInt
    base_channels: PositiveInt | Literal["auto"]
    conditional: bool | Literal["auto"]
    spectral_norm: bool
    minibatch_discrimination: bool
    loss: str
    critic_steps: PositiveInt
    gradient_penalty: NonNegativeFloat
    r1_gamma: NonNegativeFloat
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    feature_matching: NonNegativeFloat
    augment: list[str]
    upsample: Literal["transposed", "resize"]
    ada_adjust_images: PositiveInt
    mode_seeking: NonNegativeFloat | Literal["auto"]

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown family {value!r}; choose one of {', '.join(FAMILIES)}")
        return value

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in LOSSES:
            raise ValueError(f"unknown loss {value!r}; choose one of {', '.join(LOSSES)}")
        return value

    @field_validator("augment", mode="before")
    @classmethod
    def _adaptive_alone(cls, value: object) -> object:
        return [ADAPTIVE] if value == ADAPTIVE else value  # `augment: ada` is the list [ada]

    @field_validator("augment")
    @classmethod
    def _known_policies(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in (*POLICIES, ADAPTIVE)]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown}; choose from {', '.join(POLICIES)}, or {ADAPTIVE} alone")
        if ADAPTIVE in value and value != [ADAPTIVE]:
            raise ValueError(f"'{ADAPTIVE}' adapts its own ops ({', '.join(ADA_OPS)}) and stands alone: "
                             f"augment: {ADAPTIVE}, or a fixed list without it")
        return value

    @model_validator(mode="after")
    def _compatible(self) -> ModelParams:
        if self.gradient_penalty and self.family == "dcgan":
            raise ValueError("gradient_penalty needs a critic without batch norm (the penalty is per sample): "
                             "use family wgan_gp, sngan or mlp, or set gradient_penalty: 0")
        if self.label_smoothing and self.loss not in SMOOTHABLE:
            raise ValueError(f"label_smoothing needs a loss with a real target ({', '.join(SMOOTHABLE)}); "
                             f"{self.loss} has none: set label_smoothing: 0")
        return self

    def classes(self, num_classes: int) -> int:
        """Classes the model conditions on (0: unconditional), given the prepared data's class count; `auto`
        conditions on the labels when there are any."""
        if self.conditional == "auto":
            return num_classes if num_classes >= 2 else 0
        if self.conditional and num_classes < 2:
            raise ConfigError(f"model.conditional: true needs labelled data with at least 2 classes (one folder per "
                              f"class under data.source), but the prepared data has {num_classes}; set "
                              f"model.conditional: false or label the data")
        return num_classes if self.conditional else 0

    def mode_seeking_weight(self, num_classes: int) -> float:
        """`auto`: MSGAN's weight 1 for a class-conditional model, 0 otherwise. Measured on MNIST
        (docs/results/recall_ablation*.md): conditioning is what costs recall (unconditional 0.93, conditional
        0.71, real 0.90), and weight 1 brings a conditional model to 0.88 at FID 1.4x real-vs-real."""
        if self.mode_seeking == "auto":
            return AUTO_MODE_SEEKING if self.classes(num_classes) else 0.0
        return self.mode_seeking

    def step_settings(self, num_classes: int) -> StepSettings:
        """The training recipe for gancore's train_step; num_classes comes from the prepared data."""
        return StepSettings(
            latent_dim=self.latent_dim, loss=self.loss, num_classes=self.classes(num_classes),
            critic_steps=self.critic_steps, gradient_penalty=self.gradient_penalty, r1_gamma=self.r1_gamma,
            label_smoothing=self.label_smoothing, feature_matching=self.feature_matching,
            augment=tuple(self.augment), ada_adjust_images=self.ada_adjust_images, mode_seeking=self.mode_seeking_weight(num_classes),
        )

    def spec(self, channels: int, image_size: int, num_classes: int) -> ModelSpec:
        """The architecture for gancore's build_gan, for data of this shape."""
        return ModelSpec(
            family=self.family, latent_dim=self.latent_dim, channels=channels, image_size=image_size,
            base_channels=scaled_base_channels(image_size) if self.base_channels == "auto" else self.base_channels,
            num_classes=self.classes(num_classes),
            spectral_norm=self.spectral_norm, minibatch_discrimination=self.minibatch_discrimination,
            upsample=self.upsample,
        )


class OptimizerParams(Section):
    lr_g: PositiveFloat
    lr_d: PositiveFloat
    beta1: Annotated[float, Field(ge=0, lt=1)]
    beta2: Annotated[float, Field(ge=0, lt=1)]

    def optimizer(self) -> dict[str, float]:
        """Just the Adam settings (the keys tune may search), whichever section holds them."""
        return {key: getattr(self, key) for key in OptimizerParams.model_fields}


class HealthParams(Section):
    """When a run is stopped as diverged or mode-collapsed (and so never registered)."""

    max_grad_norm: PositiveFloat
    check_every: PositiveInt
    warmup_steps: Annotated[int, Field(ge=0)]
    samples: Annotated[int, Field(ge=2)]
    min_class_coverage: Annotated[float, Field(ge=0, le=1)]
    min_diversity: NonNegativeFloat
    min_conditional_accuracy: Annotated[float, Field(ge=0, le=1)]
    seed: int


class TrainParams(OptimizerParams):
    num_workers: PositiveInt | tuple[PositiveInt, PositiveInt]
    use_gpu: bool
    autocast: Literal["auto", "bf16", "off"]
    batch_size: PositiveInt
    steps: PositiveInt
    ema_decay: Annotated[float, Field(ge=0, lt=1)]
    log_every: PositiveInt
    checkpoint_every: PositiveInt
    checkpoints_kept: PositiveInt
    max_failures: Annotated[int, Field(ge=-1)]
    storage_path: str
    seed: int
    use_tuned: bool
    health: HealthParams

    def global_batch_size(self) -> int:
        """Images per generator step over all workers (at the most workers of an elastic range)."""
        workers = self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]
        return workers * self.batch_size

    @field_validator("storage_path")
    @classmethod
    def _supported_storage(cls, value: str) -> str:
        return s3_or_local(value, "storage paths")

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError("a [min, max] range needs min <= max")
        return value


class Distribution(Section):
    """One search-space entry: exactly one of the keys below."""

    loguniform: tuple[PositiveFloat, PositiveFloat] | None = None
    uniform: tuple[float, float] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in ("loguniform", "uniform", "choice") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform: [low, high], uniform: [low, high], choice: [...]")
        bounds = self.loguniform or self.uniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"low must be below high, got {list(bounds)}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self


class TuneParams(Section):
    search: Literal["random", "optuna", "pbt"]
    num_samples: PositiveInt | Literal["auto"]  # auto: trials(image_size)
    num_workers: PositiveInt
    steps: PositiveInt
    report_every: PositiveInt
    grace_period: PositiveInt  # random: reports before the first halving
    reduction_factor: Annotated[int, Field(ge=2)]  # random: 1/reduction_factor of the trials go on at each halving
    optuna_batch: PositiveInt  # optuna: trials suggested together, each batch from every finished one
    eval_samples: Annotated[int, Field(ge=2)]
    seed: int
    search_space: dict[str, Distribution]

    @field_validator("search_space")
    @classmethod
    def _tunable_keys(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        tunable = set(OptimizerParams.model_fields)
        unknown = sorted(set(value) - tunable)
        if unknown:
            raise ValueError(f"cannot tune {unknown}; tunable keys are {sorted(tunable)}")
        if not value:
            raise ValueError("search space is empty")
        return value

    def trials(self, image_size: int) -> int:
        """tune.num_samples; `auto` is 4 up to 32 px and 2 past it. A step costs ~1.7x more per doubling of the size
        (model.base_channels: auto) and a trial needs its 600 steps to predict the full run, so the search, not
        the training, gives way (on the photo patches, the 4 trials at 64 px took 10.5 of 24 minutes)."""
        if self.num_samples != "auto":
            return self.num_samples
        return AUTO_TRIALS if image_size <= 32 else AUTO_TRIALS // 2

    @model_validator(mode="after")
    def _search_can_run(self) -> TuneParams:
        if self.search != "pbt":
            return self
        if self.num_samples != "auto" and self.num_samples < 2:
            raise ValueError("pbt needs a population: set tune.num_samples to 2 or more")
        if self.steps <= self.report_every:
            raise ValueError("pbt exploits and explores between reports: tune.steps must exceed tune.report_every")
        frozen = sorted(key for key, distribution in self.search_space.items()
                        if distribution.choice is not None and len(distribution.choice) < 2)
        if frozen:
            raise ValueError(f"pbt cannot mutate a one-value choice ({', '.join(frozen)}): give it two or more "
                             f"values, or move the key to train.* and out of tune.search_space")
        return self


def _space_name(name: str) -> str:
    if not name.isidentifier() or name == "featurenet":
        raise ValueError("cannot name a feature space (metrics are logged as <name>_fid): use a word such as"
                         " inception_v3 or dinov2")
    return name


def _encoder_file(path: str) -> str:
    if not Path(path).is_file():
        raise ValueError("no such file; give a TorchScript encoder (inception-2015-12-05.pt as clean-fid and"
                         " StyleGAN3 use it, or DINOv2/CLIP exported with torch.jit)")
    return path


class EvalParams(Section):
    num_samples: Annotated[int, Field(ge=2)]
    kid_subset_size: Annotated[int, Field(ge=2)]
    kid_subsets: PositiveInt
    is_splits: PositiveInt
    bootstrap_resamples: PositiveInt
    precision_recall_k: PositiveInt
    density_coverage_k: PositiveInt
    feature_spaces: dict[Annotated[str, AfterValidator(_space_name)], Annotated[str, AfterValidator(_encoder_file)]]
    grid_size: PositiveInt
    seed: int

    def metric_settings(self) -> MetricSettings:
        """The eval.* keys the metric registry reads, under the same names."""
        return MetricSettings(**{field.name: getattr(self, field.name) for field in fields(MetricSettings)})


class RegisterParams(Section):
    model_name: Annotated[str, Field(min_length=1)]
    experiment: Annotated[str, Field(min_length=1)]
    gate_metric: str
    min_improvement: NonNegativeFloat
    max_fid_ratio: Annotated[float, Field(ge=1)]

    @field_validator("gate_metric")
    @classmethod
    def _registered_metric(cls, value: str) -> str:
        if value not in SET_METRICS:
            raise ValueError(f"not a metric; choose one of {', '.join(SET_METRICS)}")
        return value


with warnings.catch_warnings():
    # `register` is also a metaclass method (ABCMeta.register); instances still see the field.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class _RegisterField(Section):
        register: RegisterParams


class Params(_RegisterField):
    data: DataParams
    featurenet: FeaturenetParams
    model: ModelParams
    train: TrainParams
    tune: TuneParams
    eval: EvalParams

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.tune.report_every > self.tune.steps:
            raise ValueError("tune.report_every must not exceed tune.steps (a trial would never report)")
        if self.train.global_batch_size() % self.tune.num_workers:
            raise ValueError(f"tune.num_workers must divide the global batch train.num_workers x train.batch_size "
                             f"({self.train.global_batch_size()}): a trial trains with the same global batch")
        if self.eval.kid_subset_size > self.eval.num_samples:
            raise ValueError("eval.kid_subset_size must not exceed eval.num_samples")
        return self


def _describe(error: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid parameters ({error.error_count()} problem(s)); fix them and re-run:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<top level>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (typo? remove it or check the params reference in README.md)")
        elif item["type"] == "missing":
            lines.append(f"  - {key}: missing required key")
        elif isinstance(item.get("input"), dict):  # a cross-key check of a section: the message names the keys
            lines.append(f"  - {key}: {item['msg']}")
        else:
            lines.append(f"  - {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], path: Path = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, path)) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the repository root (where params.yaml lives)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, path)


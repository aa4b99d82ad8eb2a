"""Typed configuration: nested dataclasses, YAML files and `section.key=value` overrides.

Every key has a default whose type is the contract: a YAML file or an override that names an
unknown key, or gives a value that does not parse as the default's type, is a `ConfigError`. The
schema owns the allowed values: `Literal[...]` types list the choices (checked when a value is set
and when a section is constructed), `validate` checks the ranges whenever a config is built.
The resolved config is written as JSON into every run directory (`to_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# The choices of the string-valued keys: the one list each (data.FLIP_MODES, model.HEAD_NORMS and
# model.POOLINGS are these). data.format is checked by the registry that owns it.
Flip = Literal["plain", "swap", "off"]
LeakCheck = Literal["error", "warn", "off"]
OnMismatch = Literal["rebuild", "error"]
HeadNorm = Literal["none", "batchnorm", "layernorm"]
Pooling = Literal["avg", "attention"]
Amp = Literal["auto", "bf16", "fp16", "off"]  # train.amp (runtime.select_precision)
LossKind = Literal["infonce", "siglip"]  # train.loss (objectives.recipe_loss)
BatchSampler = Literal["random", "clustered"]  # data.batch_sampler (train.clustered)


# model.backbone: the torchvision ResNets model.BACKBONES builds (a test keeps the two lists equal).
# Checked here, with the rest of the config, so that a typo is refused before any data is read
# (and without importing torch).
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def choices(tp: Any) -> tuple[str, ...]:
    """The allowed values of a Literal type."""
    return tuple(typing.get_args(tp))


AMP_MODES = choices(Amp)


def _check_choices(section: Any, name: str) -> None:
    """ConfigError for a Literal-typed field of `section` holding a value outside its choices."""
    for key, tp in _field_types(type(section)).items():
        if typing.get_origin(tp) is Literal and getattr(section, key) not in choices(tp):
            raise ConfigError(f"{name}.{key} must be one of {', '.join(choices(tp))}, got {getattr(section, key)!r}")


@dataclass
class DataConfig:
    format: str = "auto"  # auto | coco | flickr | csv (also TSV) | jsonl | folder  (auto: detected from what --data is)
    train_split: str = "train"
    val_split: str = "val"
    # CSV/TSV/JSONL column (key) names; "" = auto: the first of filepath/image/file_name/... and
    # caption/text/captions/... present in the header (see data.IMAGE_COLUMNS / CAPTION_COLUMNS).
    image_column: str = ""
    caption_column: str = ""
    val_path: str = ""  # a second file/folder holding the validation data ("" = split --data itself)
    # CSV/JSONL/folder data without val_path: this fraction of the IMAGES (never single captions)
    # becomes the validation split, drawn with subset_seed. COCO keeps its own train/val layout.
    val_fraction: float = 0.1
    leak_check: LeakCheck = "error"  # images in both train and val (by content hash): error | warn | off
    image_size: int = 224
    train_images: int = 0  # 0 = the whole split; else a seeded random subset of images
    val_images: int = 0
    subset_seed: int = 0
    augment: bool = False  # random resized crop + horizontal flip on train images
    # Horizontal flip under augment: plain = flip the image only (a caption saying "left" becomes
    # wrong), swap = flip and use the caption with left/right swapped (its own cached embedding),
    # off = no flip (crop only).
    flip: Flip = "plain"
    # Use the decode-once uint8 image cache written by `clipft prepare-images` when it exists
    # (<cache dir>/images/<split>-<prepared_size>/); JPEG decoding otherwise. At prepared_size ==
    # image_size the cache holds exactly the pixels evaluation decodes (clipft.preprocess's rule);
    # a larger cache gives augmentation more pixels to crop from but is resized again (bilinear).
    prepared: bool = True
    prepared_size: int = 224
    color_jitter: float = 0.0  # train images: brightness/contrast/saturation jitter strength; 0 = off (hue never)
    num_workers: int = 4  # JPEG decoding processes (the prepared cache is read by one thread instead)
    # random = shuffled batches; clustered = batches drawn from k-means clusters of the cached caption
    # embeddings (harder in-batch negatives; seeded, cached beside the text cache; train/clustered.py).
    batch_sampler: BatchSampler = "random"
    # CLIP's own normalisation (the text tower was trained against images normalised like this).
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        _check_choices(self, "data")


@dataclass
class TextConfig:
    encoder: str = "openai/clip-vit-base-patch32"  # HF hub name or local dir (CLIP or sentence-transformers)
    max_length: int = 77
    batch_size: int = 256
    cache_dir: str = ""  # "" = <data root>/cache
    on_mismatch: OnMismatch = "rebuild"  # rebuild | error: what to do with a cache built from other captions/encoder

    def __post_init__(self) -> None:
        _check_choices(self, "text")


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 (torchvision) | timm:NAME (any timm model)
    # imagenet (torchvision's / timm's default tag) | none | timm:NAME.TAG | a .safetensors/.pth/.pt state dict file
    image_weights: str = "imagenet"
    image_weights_sha256: str = ""  # a weights file's sha256: recorded by the trainer (resume identity)
    grad_checkpointing: bool = False  # timm backbones: recompute activations in the backward (less memory)
    head_hidden: int = 1024
    head_layers: int = 2  # linear layers in the head; hidden widths head_hidden, head_hidden/2, ...
    head_norm: HeadNorm = "none"  # after each hidden linear layer
    head_dropout: float = 0.0  # dropout after each hidden activation; 0 = none
    head_residual: bool = False  # head(x) = MLP(x) + W x (a learned linear shortcut)
    pooling: Pooling = "avg"  # attention: CLIP-style QKV attention pooling over the final feature map
    trainable_stages: int = -1  # -1 = whole backbone; N = only its last N of (stem, layer1..layer4) / timm's stages
    freeze_bn_stats: bool = False  # backbone BatchNorm layers keep their running statistics (eval mode)
    temperature: float = 0.07
    learnable_temperature: bool = False
    max_logit_scale: float = 100.0  # clamp: 1/tau never exceeds this

    def __post_init__(self) -> None:
        _check_choices(self, "model")
        _check_image_weights(self.image_weights)


def _check_image_weights(w: str) -> None:
    """The form of model.image_weights (a file's existence and fit are checked by backbones.py)."""
    if w not in ("imagenet", "none") and not w.startswith("timm:") and not w.lower().endswith((".safetensors", ".pth", ".pt")):
        raise ConfigError(f"model.image_weights must be imagenet, none, timm:NAME.TAG or a .safetensors/.pth/.pt "
                          f"file, got {w!r}")


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 128  # per process: under torchrun the global batch (the negatives) is batch_size x processes
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    backbone_lr_ratio: float = 1.0  # backbone lr = lr * ratio (head and logit scale use lr)
    freeze_backbone_epochs: int = 0  # backbone frozen (no gradients, BN stats fixed) for the first N epochs
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping
    # auto | bf16 | fp16 | off. auto: CUDA bf16 where supported, else fp16 with a GradScaler; a CPU with
    # native bf16 (AVX512-BF16, AMX) bf16 autocast + channels_last; other CPUs fp32 (runtime.select_precision).
    # Also used for caption caching and image embedding. true/false (older configs) read as auto/off.
    amp: Amp = "auto"
    channels_last: bool = True  # NHWC where autocast runs (CUDA, CPU bf16); false keeps NCHW
    # Images per forward pass: 0 = the whole batch at once; N < batch_size = the batch's loss over all its
    # images with the tower run on N at a time (activations for one chunk, a second forward pass;
    # chunked.py). Every BatchNorm then uses its running statistics (eval mode, not updated): the gradient
    # is exactly the unchunked one with BatchNorm in eval mode. Refused with model.head_norm=batchnorm.
    embed_chunk: int = 0
    compile: bool = False  # torch.compile the training model (GPU runs: faster steps after a one-off compile)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    log_every: int = 20  # steps between metrics.jsonl step records
    max_steps_per_epoch: int = 0  # 0 = full epochs; >0 truncates (smoke runs)
    # K micro-batches per optimizer step: the gradient of a K x larger batch at the memory cost of one, but
    # NOT more negatives (each micro-batch's loss only sees its own batch_size x processes captions).
    grad_accum_steps: int = 1
    sync_batchnorm: bool = False  # multi-GPU: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only)
    tensorboard: bool = False  # also mirror metrics.jsonl to RUN/tensorboard/ (rank 0; the `tensorboard` extra)
    # A mid-epoch RUN/last.pt this often, so a SIGKILL (or a crash) loses at most this much work:
    # "Nmin" = every N minutes, "N" (or "Nsteps") = every N optimizer steps, "0" = at epoch ends only.
    checkpoint_every: str = "10min"
    # Recipe levers (objectives.py; all off by default). text_negatives: batch = in-batch captions only;
    # N = plus N captions drawn from the whole training caption cache each step; all = every training
    # caption (image->text side; an image's own captions are positives).
    text_negatives: str = "batch"
    image_queue: int = 0  # N > 0: the last N image embeddings are extra negatives of each caption (text->image)
    loss: LossKind = "infonce"  # infonce | siglip (sigmoid loss with a learnable bias)
    ema: float = 0.0  # EMA decay of the weights (e.g. 0.999); validation, best.pt and export use the EMA; 0 = off


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = (1, 5, 10)
    batch_size: int = 256
    every: int = 1  # evaluate recall every N epochs (and always after the last)
    # Zero-shot classification prompts: "{}" is the class name ("a {}" becomes "an {}" before a
    # vowel); a class's text embedding is the normalised mean over these templates.
    zeroshot_templates: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image showing a {}.",
                                           "a drawing of a {}.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- allowed values
# Ranges and choices live here, beside the schema, and are checked whenever a config is built
# (`load_config`, `from_dict`), before any work starts. (lo, hi) bounds are inclusive; None = open.
# A key missing here takes any value of its type; choices are the Literal types of the schema above.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.val_fraction": (0.0, 0.9), "data.image_size": (16, 4096), "data.train_images": (0, None),
    "data.val_images": (0, None), "data.subset_seed": (0, None), "data.prepared_size": (16, 4096),
    "data.color_jitter": (0.0, 1.0), "data.num_workers": (0, 256),
    "text.max_length": (1, 512), "text.batch_size": (1, 1 << 20),
    "model.head_hidden": (1, 1 << 16), "model.head_layers": (1, 16), "model.head_dropout": (0.0, 0.99),
    "model.trainable_stages": (-1, None), "model.max_logit_scale": (1.0, 1e4),
    "train.epochs": (1, 100000), "train.batch_size": (2, 1 << 20), "train.weight_decay": (0.0, 10.0),
    "train.warmup_steps": (0, None), "train.backbone_lr_ratio": (0.0, 100.0),
    "train.freeze_backbone_epochs": (0, None), "train.min_lr_ratio": (0.0, 1.0), "train.grad_clip": (0.0, None),
    "train.seed": (0, None), "train.max_bad_steps": (1, None), "train.log_every": (1, None),
    "train.max_steps_per_epoch": (0, None), "train.grad_accum_steps": (1, 4096), "train.embed_chunk": (0, 1 << 20),
    "train.image_queue": (0, 1 << 24), "train.ema": (0.0, 0.999999),
    "eval.batch_size": (1, 1 << 20), "eval.every": (1, None),
}
# Strictly positive (an open lower bound): 0 is as wrong as a negative value.
_POSITIVE = ("train.lr", "model.temperature")


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _num(x: float) -> str:
    """1048576, not 1.04858e+06: bounds are printed as the user would type them."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_INTERVAL = re.compile(r"\s*(?:(?P<steps>\d+)\s*(?:steps?)?|(?P<minutes>\d+(?:\.\d*)?|\.\d+)\s*(?:min|m))\s*")


def checkpoint_interval(value: str) -> tuple[str, float]:
    """train.checkpoint_every parsed: ("steps", N), ("minutes", N) or ("off", 0); ConfigError otherwise."""
    m = _INTERVAL.fullmatch(str(value))
    if m is None:
        raise ConfigError(f"train.checkpoint_every must be N (steps), Nsteps or Nmin (minutes), got {value!r}")
    if m["steps"] is not None:
        return ("steps", float(m["steps"])) if int(m["steps"]) > 0 else ("off", 0.0)
    return ("minutes", float(m["minutes"])) if float(m["minutes"]) > 0 else ("off", 0.0)


def parse_text_negatives(value: Any) -> int:
    """train.text_negatives as a number: 0 = batch (in-batch only), -1 = all, N > 0 = N bank captions.
    ConfigError for anything else."""
    v = str(value).strip().lower()
    if v == "batch":
        return 0
    if v == "all":
        return -1
    if v.isdigit() and int(v) > 0:
        return int(v)
    raise ConfigError(f"train.text_negatives must be batch, all or a positive integer, got {value!r}")


def validate(cfg: Config, source: str = "config") -> Config:
    """Check every value against its allowed range or choices; raise one ConfigError naming the key."""
    problems = []
    for key, (lo, hi) in _RANGES.items():
        v = _get(cfg, key)
        if not (v == v) or (lo is not None and v < lo) or (hi is not None and v > hi):  # v == v: NaN is refused
            want = (f">= {_num(lo)}" if hi is None else f"<= {_num(hi)}" if lo is None else f"in [{_num(lo)}, {_num(hi)}]")
            problems.append(f"{key} must be {want}, got {v!r}")
    for key in _POSITIVE:
        v = _get(cfg, key)
        if not (v > 0 and v < float("inf")):
            problems.append(f"{key} must be > 0, got {v!r}")
    for section in _sections():
        try:
            _check_choices(getattr(cfg, section), section)
        except ConfigError as e:
            problems.append(str(e))
    try:
        checkpoint_interval(cfg.train.checkpoint_every)
    except ConfigError as e:
        problems.append(str(e))
    # timm names are checked against timm's model list by model.check_model_config (before any data
    # is read); here only their form, so that validating a config never imports torch or timm.
    timm_name = cfg.model.backbone.startswith("timm:") and len(cfg.model.backbone) > len("timm:")
    if cfg.model.backbone not in BACKBONES and not timm_name:
        problems.append(f"model.backbone: unknown backbone {cfg.model.backbone!r} (choose from {', '.join(BACKBONES)}, "
                        "or any timm model as timm:NAME)")
    if not _DEVICE.fullmatch(cfg.train.device):
        problems.append(f"train.device must be auto, cpu, cuda or cuda:N, got {cfg.train.device!r}")
    if not cfg.eval.zeroshot_templates or any("{}" not in t for t in cfg.eval.zeroshot_templates):
        problems.append("eval.zeroshot_templates: every template needs {} where the class name goes, got "
                        f"{list(cfg.eval.zeroshot_templates)!r}")
    if not cfg.eval.ks or any(k < 1 for k in cfg.eval.ks):
        problems.append(f"eval.ks must be positive integers, got {list(cfg.eval.ks)!r}")
    try:
        _check_image_weights(cfg.model.image_weights)
    except ConfigError as e:
        problems.append(str(e))
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3 or any(not s > 0 for s in cfg.data.std):
        problems.append("data.mean and data.std must hold 3 values each, std > 0")
    if 0 < cfg.train.embed_chunk < cfg.train.batch_size and cfg.model.head_norm == "batchnorm":
        # A chunked step runs BatchNorm on running statistics (chunked.py); a new head's are never learned.
        problems.append(f"train.embed_chunk={cfg.train.embed_chunk} cannot be used with model.head_norm=batchnorm "
                        "(a chunked step runs BatchNorm on its running statistics, which the new head never "
                        "learns): use model.head_norm=layernorm or none, or train.embed_chunk=0")
    try:
        parse_text_negatives(cfg.train.text_negatives)
    except ConfigError as e:
        problems.append(str(e))
    if cfg.train.loss == "siglip" and cfg.train.image_queue > 0:
        problems.append("train.image_queue is for train.loss=infonce (its text->image softmax); SigLIP's sigmoid "
                        "loss has no such side: set train.image_queue=0")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return cfg


# --------------------------------------------------------------------------- conversion

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
# Keys that were booleans in older configs (and saved run directories): true/false -> today's value.
_BOOL_ALIASES: dict[str, dict[bool, str]] = {"train.amp": {True: "auto", False: "off"}}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, elem, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int or tp is float:  # a bool is neither (True == 1 would slip through), a string is parsed
        noun, accepted = ("an integer", (int,)) if tp is int else ("a number", (int, float))
        if not isinstance(value, bool):
            if isinstance(value, accepted):
                return tp(value)
            if isinstance(value, str):
                try:
                    return tp(value.strip())
                except ValueError:
                    pass
        raise ConfigError(f"{where}: expected {noun}, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is Literal:
        if isinstance(value, str) and value in choices(tp):
            return value
        raise ConfigError(f"{where} must be one of {', '.join(choices(tp))}, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - schema bug


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _sections() -> dict[str, type]:
    return {name: tp for name, tp in _field_types(Config).items()}


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` on cfg to `value`, converted to the default's type."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key {dotted!r}: expected section.key (e.g. train.lr)")
    section, key = parts
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} (known: {', '.join(sections)})")
    types = _field_types(sections[section])
    if key not in types:
        raise ConfigError(f"unknown config key {dotted!r} (known in {section}: {', '.join(types)})")
    if dotted in _BOOL_ALIASES and (isinstance(value, bool) or str(value).strip().lower() in _TRUE | _FALSE):
        value = _BOOL_ALIASES[dotted][_coerce(value, bool, dotted)]  # a key that used to be a bool
    setattr(getattr(cfg, section), key, _coerce(value, types[key], dotted))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings in order (later ones win)."""
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value)
    return cfg


def update_from_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> Config:
    """Merge a nested mapping (e.g. parsed YAML) into cfg, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: not a clipft config (expected YAML sections such as `train: {{epochs: 5}}`, "
                          f"got a {type(data).__name__})")
    for section, values in data.items():
        if section not in _sections():
            raise ConfigError(f"{source}: unknown config section {section!r}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for key, value in values.items():
            try:
                set_value(cfg, f"{section}.{key}", value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults (or `base`), then a YAML/JSON file, then overrides."""
    cfg = base if base is not None else Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: a folder, not a config file (--config takes a YAML file or a preset: "
                              f"{', '.join(PRESETS)})")
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (--config takes a YAML file or a preset: "
                              f"{', '.join(PRESETS)})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a checkpoint, an image, a zip: not text at all
            raise ConfigError(f"{path}: not a YAML config file (binary content); --config takes a YAML file "
                              f"or a preset: {', '.join(PRESETS)}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        if not text.strip():  # a file saved empty by mistake would silently train the defaults (ResNet50 on COCO)
            raise ConfigError(f"{path}: an empty config file; write the settings that differ from the defaults "
                              f"(e.g. `train: {{epochs: 5}}`) or use a preset: {', '.join(PRESETS)}")
        try:
            data = yaml.safe_load(text) or {}  # a file of comments only: the defaults, as written
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
        update_from_dict(cfg, data, source=str(path))
    apply_overrides(cfg, overrides or [])
    return validate(cfg, source=str(path) if path is not None and not overrides else "config")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples become lists), JSON/YAML serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of `to_dict` (strict)."""
    return validate(update_from_dict(Config(), data, source="saved config"), source="saved config")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


# --------------------------------------------------------------------------- presets (data, not code)
# Each preset is a nested mapping of overrides on the defaults; configs/<name>.yaml mirrors it
# (a test keeps them equal) so users can copy a file and edit it.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper-style run: ResNet50 (ImageNet) vs frozen CLIP ViT-B/32 text on COCO 2014, one GPU.
    "coco-rn50": {
        # best.pt chosen on Karpathy's val split when ROOT/dataset_coco.json is there (never on a Karpathy
        # test image); else on a seeded 5,000-image subset of val2014, with a warning (data/karpathy.py).
        "data": {"train_images": 0, "val_split": "karpathy-val", "val_images": 5000, "num_workers": 8},
        "text": {"encoder": "openai/clip-vit-base-patch32"},
        "model": {"backbone": "resnet50", "image_weights": "imagenet"},
        "train": {"epochs": 15, "batch_size": 128, "lr": 1e-4, "warmup_steps": 500},
    },
    # ConvNeXt-Tiny (timm, ImageNet-1k fine-tuned from 22k; 29.1 M tower parameters vs 26.1 M for coco-rn50):
    # more accurate ImageNet features at about ResNet50's cost. No accuracy measured here.
    "coco-convnext-tiny": {
        "data": {"train_images": 0, "val_images": 5000, "num_workers": 8},
        "text": {"encoder": "openai/clip-vit-base-patch32"},
        "model": {"backbone": "timm:convnext_tiny", "image_weights": "timm:convnext_tiny.fb_in22k_ft_in1k"},
        "train": {"epochs": 15, "batch_size": 128, "lr": 1e-4, "warmup_steps": 500},
    },
    # EfficientNet-Lite0 (timm, 5.2 M tower parameters): a small, fast tower for modest GPUs and edge export.
    "coco-effnet-lite0": {
        "data": {"train_images": 0, "val_images": 5000, "num_workers": 8},
        "text": {"encoder": "openai/clip-vit-base-patch32"},
        "model": {"backbone": "timm:tf_efficientnet_lite0", "image_weights": "imagenet"},
        "train": {"epochs": 15, "batch_size": 256, "lr": 3e-4, "warmup_steps": 500},
    },
    # The embedded demo: synthetic shapes, offline MiniLM text encoder, small tower from scratch, CPU.
    "demo": {
        "data": {"image_size": 64, "train_images": 2000, "val_images": 500, "num_workers": 0},
        "text": {"encoder": "sentence-transformers/all-MiniLM-L6-v2", "batch_size": 256},
        "model": {"backbone": "resnet18", "image_weights": "none", "head_hidden": 512},
        "train": {"epochs": 8, "batch_size": 128, "lr": 1e-3, "warmup_steps": 30, "weight_decay": 0.05,
                  "device": "cpu", "log_every": 5},  # 24 step records: enough for the report's spike check
    },
}


def preset_config(name: str) -> Config:
    """Defaults updated with the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return validate(update_from_dict(Config(), PRESETS[name], source=f"preset {name}"), source=f"preset {name}")


def resolve_config_arg(arg: str) -> tuple[str, str]:
    """What `--config ARG` names: ("preset", name) or ("file", path).

    A preset name wins unless ARG is a file: a folder called `demo` (say, the output of
    `clipft demo --out demo`) never shadows the demo preset, and a folder is never a config.
    A missing file or a folder is a ConfigError (one line)."""
    path = Path(arg)
    if path.is_file():
        return "file", arg
    if arg in PRESETS:
        return "preset", arg
    if path.is_dir():
        raise ConfigError(f"{arg}: a folder, not a config file (--config takes a YAML file or a preset: "
                          f"{', '.join(PRESETS)})")
    raise ConfigError(f"{arg}: config file not found (--config takes a YAML file or a preset: {', '.join(PRESETS)})")


def config_from_arg(arg: str | None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """`--config ARG` (a preset name or a YAML file, see `resolve_config_arg`; None = the defaults or
    `base`) with `overrides` applied."""
    if arg is None:
        return load_config(None, overrides, base=base)
    kind, value = resolve_config_arg(arg)
    if kind == "preset":
        return load_config(None, overrides, base=preset_config(value))
    return load_config(value, overrides, base=base)

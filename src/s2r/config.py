"""Strict, typed configuration: `params.yaml` -> dataclasses; every bad key is an error naming key and file."""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

SPLITS = ("train", "val", "test")  # the splits of every benchmark (s2r.data.benchmark) and of the params sections


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type; the message names key and file."""


class Schema:
    """Base of every dataclass `from_dict` builds (params sections, method Configs, data declarations): its
    `validate` runs on every instance built from a file, so no schema can skip its checks."""

    def validate(self) -> None:
        """Check values that depend on each other; raise ConfigError naming the key. Nothing by default."""


S = TypeVar("S", bound=Schema)


def from_dict(cls: type[S], raw: Any, where: str, prefix: str = "") -> S:
    """Build dataclass `cls` from `raw`, rejecting unknown keys, missing keys and wrong types.

    A field without a default must be given: the params schema (this module's `*Params` classes and every method's
    `Config`) has no defaults, so the file holds every value and a missing key is an error naming it. A section
    field (metadata `section=True`, typed `X | None = None`) may be left out whole: it is then None, and the code
    that needs it says so (`need`). Formats with optional keys (benchmark.yaml, a study's pruner settings) keep
    their documented defaults.
    """
    _require_schema(cls)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or '<root>'} must be a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {_join(prefix, unknown[0])!r} (allowed under {prefix or '<root>'}: "
            f"{sorted(fields)})"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in raw:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if not has_default:
                raise ConfigError(f"{where}: missing key {key!r}")
            continue
        kwargs[name] = _convert(hints[name], raw[name], where, key)
    obj = cls(**kwargs)
    try:
        obj.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if not prefix else f"{where}: in {prefix!r}: {e}") from None
    return obj


def _require_schema(cls: Any) -> None:
    """A dataclass read from a file must derive from Schema (a programming error otherwise, found by the first load)."""
    if not (isinstance(cls, type) and issubclass(cls, Schema) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is read from a file: make it a dataclass deriving from s2r.config.Schema")


def need(section: T | None, key: str, where: str = "params.yaml") -> T:
    """A params section the caller cannot run without (recipes leave unused sections out), or an error naming it."""
    if section is None:
        raise ConfigError(f"{where}: missing section {key!r} (this command reads it)")
    return section


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: key {key!r}: {value!r} does not match {_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: key {key!r}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)  # type: ignore[type-var]  # a Schema, checked by _require_schema
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key {key!r} must be a list, got {type(value).__name__}")
        (inner, *_) = get_args(tp) or (Any,)
        items = [_convert(inner, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {key!r} must be a mapping, got {type(value).__name__}")
        kt, vt = get_args(tp) or (Any, Any)
        return {k: _convert(vt, v, where, _join(key, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key {key!r} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key {key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 (no dot) as a string; accept numeric strings of that shape only.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key {key!r} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: key {key!r}: unsupported type {_name(tp)}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _StrictLoader:  # built lazily (PyYAML is imported on first use)
    cls: Any = None


def load_yaml(path: str | Path) -> Any:
    """Read a params file like `yaml.safe_load`, but refuse a key given twice in one mapping (PyYAML keeps the last)
    and YAML anchors, aliases and merge keys (`<<: *block`): DVC's `dvc exp run -S` rewrites the file and expands
    them into copies, so a variant names its block with `base:` instead (s2r.params resolves it).
    """
    import yaml

    if _StrictLoader.cls is None:
        class Loader(yaml.SafeLoader):
            def compose_node(self, parent: Any, index: Any) -> Any:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                if isinstance(event, yaml.NodeEvent) and event.anchor:  # `&name` on a node, or a `*name` alias
                    line = event.start_mark.line + 1 if event.start_mark is not None else "?"
                    raise ConfigError(f"line {line}: YAML anchor/alias "
                                      f"{event.anchor!r} (DVC's params rewrite expands them): "
                                      "write the variant as a block with `base: <block>` and its differences")
                return super().compose_node(parent, index)

            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                if isinstance(node, yaml.MappingNode):
                    seen: dict[Any, int] = {}
                    for key_node, _ in node.value:
                        line = key_node.start_mark.line + 1
                        if key_node.tag == "tag:yaml.org,2002:merge":
                            raise ConfigError(f"line {line}: YAML merge key '<<' (DVC's params rewrite expands it): "
                                              "write the variant as a block with `base: <block>`")
                        key = self.construct_object(key_node, deep=True)
                        if not isinstance(key, (str, int, float, bool)):
                            continue  # unhashable keys: PyYAML itself rejects them
                        if key in seen:
                            raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {seen[key]})")
                        seen[key] = line
                return super().construct_mapping(node, deep=deep)

        _StrictLoader.cls = Loader
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run from the project root or pass --params)")
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader.cls)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for logging and saving resolved configs)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value} (MLflow params, Optuna keys)."""
    d = to_dict(d)
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = _join(prefix, str(k))
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = d
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str = "override") -> None:
    """Set `a.b.c` in a nested dict; the path must already exist (no silent new keys)."""
    parts = key.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node, dict) or p not in node:
            raise ConfigError(f"{where}: key {'.'.join(parts[: i + 1])!r} does not exist")
        node = node[p]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"{where}: key {key!r} does not exist")
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------------------------
# params.yaml schema. Method sections are typed by each method module's own Config class (see registry).
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DigitsParams(Schema):
    """The `digits` benchmark: font-rendered synthetic digits vs scikit-learn's real handwritten digits."""

    image_size: int
    scenes_per_class: dict[str, int]
    variations: int  # renderings per synthetic scene (paired sampling, paper 1)
    real_split: dict[str, float]

    def validate(self) -> None:
        _check_splits("benchmarks.digits.scenes_per_class", self.scenes_per_class)
        _check_splits("benchmarks.digits.real_split", self.real_split)
        if abs(sum(self.real_split.values()) - 1.0) > 1e-6:
            raise ConfigError("key 'benchmarks.digits.real_split' must sum to 1")
        if self.image_size < 8 or self.variations < 1:
            raise ConfigError("key 'benchmarks.digits.image_size' must be >= 8 and 'variations' >= 1")


@dataclass
class ScenesParams(Schema):
    """The `scenes` benchmark: objects on a table with known factors, RGB + depth + mask, three domains."""

    image_size: int
    samples: dict[str, int]
    hues: int

    def validate(self) -> None:
        _check_splits("benchmarks.scenes.samples", self.samples)
        if self.hues < 12:
            raise ConfigError("key 'benchmarks.scenes.hues' must be >= 12 (paper 3's colour splits)")


def _check_splits(key: str, d: dict[str, Any]) -> None:
    if set(d) != set(SPLITS):
        raise ConfigError(f"key {key!r} must have exactly the splits {list(SPLITS)}, got {sorted(d)}")


SECTION = {"section": True}  # field metadata: a section a params file may leave out whole (it is then None)


@dataclass
class BenchmarksParams(Schema):
    """The embedded benchmarks' generators; a recipe on downloaded data leaves them out (`benchmarks: {}`)."""

    digits: DigitsParams | None = field(default=None, metadata=SECTION)
    scenes: ScenesParams | None = field(default=None, metadata=SECTION)
    scenes32: ScenesParams | None = field(default=None, metadata=SECTION)  # `scenes` at 32 px (paper 2's demo)


@dataclass
class TrainParams(Schema):
    """The shared training loop's settings."""

    device: Literal["auto", "cpu", "cuda"]
    amp: bool  # bf16/fp16 autocast when on a GPU; ignored on CPU
    deterministic: bool
    checkpoint_every: int  # steps
    # torch CPU threads: "auto" = the cores this process may use / local workers of its study (OMP_NUM_THREADS
    # wins if set), N = exactly N, 0 = torch's own default; the choice is logged as run tags (s2r.stages)
    threads: int | Literal["auto"]
    progress: bool
    prefetch: int  # batches drawn ahead in a background thread (pinned on CUDA); 0 = in the training thread
    channels_last: Literal["auto"] | bool  # NHWC weights; auto = off (not yet measured on a GPU)
    compile: Literal["auto"] | bool  # torch.compile each network; auto = off (not yet measured on a GPU)
    # under torchrun (s2r.distributed): BatchNorm statistics over the global batch (false: per rank, as plain DDP)
    sync_batchnorm: bool
    dist_timeout: float  # seconds a rank waits in a collective for the others before the run fails

    def validate(self) -> None:
        if self.prefetch < 0 or self.checkpoint_every < 1:
            raise ConfigError("keys 'train.prefetch' (>= 0) and 'train.checkpoint_every' (>= 1)")
        if self.dist_timeout <= 0:
            raise ConfigError(f"key 'train.dist_timeout' must be > 0 seconds, got {self.dist_timeout}")
        if self.threads != "auto" and self.threads < 0:
            raise ConfigError(f"key 'threads' must be 'auto' or an integer >= 0, got {self.threads!r}")


@dataclass
class TrackingParams(Schema):
    experiment: str  # prefix: a paper's runs go to <experiment>/paper<N>-<paper> (registry.experiment)
    log_model: bool
    # training curves (train/<loss>) = loss means every N steps; auto = about 100 points per run; 0 = epoch means
    log_every: int | Literal["auto"]
    system_metrics: bool  # CPU / memory / GPU use of training runs (MLflow system metrics)

    def validate(self) -> None:
        if self.log_every != "auto" and self.log_every < 0:
            raise ConfigError("key 'tracking.log_every' must be 'auto' or >= 0 (0 = epoch means only)")


@dataclass
class MixingTablesParams(Schema):
    """Paper 4's Tables 2 and 3 (`s2r tables mixing`): classifier runs per cell, shorter than the default."""

    seeds: list[int]
    ratios: list[float]  # real fractions f in (0, 1): lambda = Real:Synthetic = f : (1 - f)
    epochs: int
    steps_per_epoch: int

    def validate(self) -> None:
        if not self.seeds or not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ConfigError("keys 'seeds' and 'ratios' (real fractions in (0, 1)) must be non-empty")


@dataclass
class CutTablesParams(Schema):
    """Paper 5's Tables I and II (`s2r tables cut`): CUT per patch size -> refine -> segmenter, plus baselines."""

    patch_sizes: list[int]
    lambda_nce: float
    cut_epochs: int
    cut_steps_per_epoch: int
    seg_epochs: int
    seg_steps_per_epoch: int
    last_k: int  # epochs whose test mIoU make the distribution (paper 50)
    mix_patch_size: int  # the refined set used for the target + refined mix (Section IV-E)

    def validate(self) -> None:
        if not self.patch_sizes or any(p < 4 for p in self.patch_sizes):
            raise ConfigError("key 'patch_sizes' must be non-empty sizes >= 4 px")
        if min(self.cut_epochs, self.cut_steps_per_epoch, self.seg_epochs, self.seg_steps_per_epoch, self.last_k) < 1:
            raise ConfigError("keys 'cut_epochs', 'cut_steps_per_epoch', 'seg_epochs', 'seg_steps_per_epoch' and "
                              "'last_k' must be >= 1")
        if self.last_k > self.seg_epochs:
            raise ConfigError(f"key 'last_k' ({self.last_k}) must be <= 'seg_epochs' ({self.seg_epochs})")


@dataclass
class DepthSegmentationParams(Schema):
    """Paper 2's evaluation (s2r.evaluators.depth_segmentation): depth metric settings and the scored classes."""

    classes: list[str]  # seg_classes to score ([] = all of the benchmark's)
    depth_classes: list[str]  # [] = all pixels
    median_scaling: bool  # per-image median scaling of predicted depth (scale-ambiguous models)
    min_depth: float  # metres; truth below is invalid, predictions are clipped up to it
    max_depth: float  # metres; truth above is invalid, predictions clipped to it (0 = no cap)
    panels: int  # test samples in the input / depth / mask panel figure
    depth_average: Literal["images", "pixels"]  # images: per-image metrics, then mean (monodepth2)
    miou: Literal["all_classes", "present_classes"]  # all_classes: CSAIL eval (absent = 0)

    def validate(self) -> None:
        if self.min_depth <= 0 or self.max_depth < 0 or (self.max_depth and self.max_depth <= self.min_depth):
            raise ConfigError("keys 'min_depth' > 0 and 'max_depth' (0 = none, else > min_depth) required")
        if self.panels < 1:
            raise ConfigError("key 'panels' must be >= 1")


@dataclass
class DisentanglementParams(Schema):
    """Paper 3's metrics (s2r.evaluators.disentanglement): disentanglement_lib's definitions by default."""

    estimator: Literal["gbt", "lightgbm", "lasso"]  # DCI importances; gbt = sklearn GBT (the reference)
    sap_form: Literal["classification", "continuous"]  # reference: continuous_factors=False
    num_train: int  # points the DCI / SAP predictors fit, MIG and Modularity use (reference: 10000)
    num_test: int  # held-out points DCI informativeness / SAP score (reference: 5000)
    bins: int  # histogram discretizer bins for MIG / Modularity (reference: 20)
    ood_clip: bool  # clip OOD regressor predictions to [0, 1] before the MAE (paper 3: no clipping)

    def validate(self) -> None:
        if self.num_train < 1 or self.num_test < 1 or self.bins < 2:
            raise ConfigError("keys 'num_train', 'num_test' must be >= 1 and 'bins' >= 2")


@dataclass
class BetavaeTablesParams(Schema):
    """Paper 3's correlation study (`s2r tables betavae`): a grid of beta x supervision x noise x seed models."""

    betas: list[float]
    supervisions: list[str]
    noises: list[bool]
    seeds: list[int]
    latent_dims: list[int]  # [] = methods.betavae.latent_dim only
    warmup_fractions: list[float]  # [] = methods.betavae.warmup_fraction only
    epochs: int
    steps_per_epoch: int
    threads: int  # torch threads per model (1 is fastest on a shared 2-core CPU)

    def validate(self) -> None:
        if not self.betas or not self.supervisions or not self.noises or not self.seeds:
            raise ConfigError("keys 'betas', 'supervisions', 'noises', 'seeds' must be non-empty")
        if any(s not in ("unsupervised", "weak") for s in self.supervisions):
            raise ConfigError(f"key 'supervisions': each must be unsupervised or weak, got {self.supervisions}")
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ConfigError("keys 'epochs' and 'steps_per_epoch' must be >= 1")
        if any(d < 1 for d in self.latent_dims) or any(not 0.0 <= w <= 1.0 for w in self.warmup_fractions):
            raise ConfigError("keys 'latent_dims' must be >= 1 and 'warmup_fractions' in [0, 1]")


@dataclass
class AeTablesParams(Schema):
    """Paper 1's Table 10 (digits, multi-seed) and Table 1 (scenes) (`s2r tables ae`)."""

    seeds: list[int]
    epochs: int
    steps_per_epoch: int
    extractor: str
    scenes_epochs: int
    scenes_steps_per_epoch: int
    scenes_latent_dim: int
    scenes_sources: list[str]  # Table 1's "Trained on"

    def validate(self) -> None:
        if not self.seeds or min(self.epochs, self.steps_per_epoch, self.scenes_epochs,
                                 self.scenes_steps_per_epoch, self.scenes_latent_dim) < 1:
            raise ConfigError("keys 'seeds' (non-empty) and epochs / steps / latent sizes (>= 1) of ae_tables")


@dataclass
class VerdictsParams(Schema):
    """The rule of the paper verdicts (s2r.verdicts): Welch's t-test at `level`, seeds-needed at `power`."""

    level: float
    power: float

    def validate(self) -> None:
        if not 0.5 <= self.level < 1 or not 0 < self.power < 1:
            raise ConfigError("keys 'level' (in [0.5, 1)) and 'power' (in (0, 1)) of reports.verdicts")


@dataclass
class ReportsParams(Schema):
    """Evaluator conventions and the per-paper tables; a recipe keeps only the ones its stages read."""

    verdicts: VerdictsParams | None = field(default=None, metadata=SECTION)  # the paper verdicts' statistical rule
    mixing_tables: MixingTablesParams | None = field(default=None, metadata=SECTION)  # paper 4
    cut_tables: CutTablesParams | None = field(default=None, metadata=SECTION)  # paper 5
    depth_segmentation: DepthSegmentationParams | None = field(default=None, metadata=SECTION)  # paper 2
    disentanglement: DisentanglementParams | None = field(default=None, metadata=SECTION)  # paper 3 metrics
    betavae_tables: BetavaeTablesParams | None = field(default=None, metadata=SECTION)  # paper 3
    ae_tables: AeTablesParams | None = field(default=None, metadata=SECTION)  # paper 1


@dataclass
class ObjectiveSpec(Schema):
    metric: str
    direction: Literal["maximize", "minimize"]


@dataclass
class SearchParam(Schema):
    """One search dimension over a dotted params key. A declaration format: each type reads only its own keys
    (`choices` for categorical; `low`/`high`, optional `step` and `log` for float / int), as Optuna's suggest_*
    calls do, so the keys a type does not read are absent (None, `log` false) rather than written as values."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def validate(self) -> None:
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError("a categorical search parameter needs 'choices'")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ConfigError(f"a {self.type} search parameter needs 'low' <= 'high'")


@dataclass
class StudySpec(Schema):
    """An Optuna study declared in params.yaml (run by `s2r tune --study NAME`).

    Every setting the study uses is written in the file; the two that only some samplers and pruners read are
    required exactly where they are read (`n_startup_trials`: tpe / cmaes samplers and the median pruner;
    `pruner_warmup_epochs`: any pruner), and `timeout` may be left out (no time limit)."""

    method: str
    objectives: list[ObjectiveSpec]
    search_space: dict[str, SearchParam]
    sampler: Literal["tpe", "random", "grid", "cmaes"]
    pruner: Literal["median", "hyperband", "successive_halving", "none"]
    n_trials: int  # finished (complete + pruned) trials across all workers
    seed: int
    timeout: float | None = None  # seconds, per worker; absent = no limit
    n_startup_trials: int | None = None  # random trials before TPE / CMA-ES model, or the median pruner prunes
    pruner_warmup_epochs: int | None = None  # no pruning during the first N epochs (early accuracy can mislead)

    def startup_trials(self) -> int:
        """`n_startup_trials`, which validate() requires wherever the sampler or pruner reads it."""
        if self.n_startup_trials is None:
            raise ConfigError("key 'n_startup_trials' is required by this sampler / pruner")
        return self.n_startup_trials

    def warmup_epochs(self) -> int:
        """`pruner_warmup_epochs`, which validate() requires wherever a pruner runs."""
        if self.pruner_warmup_epochs is None:
            raise ConfigError("key 'pruner_warmup_epochs' is required by a pruner")
        return self.pruner_warmup_epochs

    def validate(self) -> None:
        if not self.objectives:
            raise ConfigError("key 'objectives' needs at least one {metric, direction}")
        if not self.search_space:
            raise ConfigError("key 'search_space' is empty")
        if len(self.objectives) > 1 and self.pruner != "none":
            raise ConfigError("key 'pruner': Optuna cannot prune multi-objective studies; use pruner: none")
        if self.n_trials < 1:
            raise ConfigError("key 'n_trials' must be >= 1")
        for key, p in self.search_space.items():
            if self.sampler == "grid" and p.type == "float" and p.step is None:
                raise ConfigError(f"key 'search_space.{key}': the grid sampler needs 'step' (or categorical choices)")
            if p.type == "int" and any(v is not None and float(v) != int(v) for v in (p.low, p.high, p.step)):
                raise ConfigError(f"key 'search_space.{key}': int bounds and step must be whole numbers")
            if p.log and (p.type == "categorical" or (p.low is not None and p.low <= 0) or p.step is not None):
                raise ConfigError(f"key 'search_space.{key}': log scale needs low > 0 and no step")
        if self.sampler == "cmaes" and all(p.type == "categorical" for p in self.search_space.values()):
            raise ConfigError("key 'sampler': CMA-ES needs at least one float or int dimension")
        if self.n_startup_trials is None and (self.sampler in ("tpe", "cmaes") or self.pruner == "median"):
            raise ConfigError(f"missing key 'n_startup_trials' (sampler {self.sampler} / pruner {self.pruner} "
                              "read it)")
        if self.pruner_warmup_epochs is None and self.pruner != "none":
            raise ConfigError(f"missing key 'pruner_warmup_epochs' (pruner {self.pruner} reads it)")


@dataclass
class Params(Schema):
    """The whole params.yaml. `studies` and `reports` may be left out whole (recipes): no studies, no reports."""

    seed: int
    benchmarks: BenchmarksParams
    train: TrainParams
    tracking: TrackingParams
    methods: dict[str, Any]
    studies: dict[str, StudySpec] = field(default_factory=dict, metadata=SECTION)
    reports: ReportsParams = field(default_factory=ReportsParams, metadata=SECTION)
    source: str = field(default="params.yaml", compare=False, metadata={"internal": True})  # the file, for errors

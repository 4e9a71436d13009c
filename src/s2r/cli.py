"""The `s2r` command line. Heavy libraries are imported inside commands so `s2r --help` stays fast."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from s2r import team

PARAMS_OPT = click.option("--params", "params_path", default="params.yaml", show_default=True,
                          type=click.Path(dir_okay=False), help="The params file to read.")


class S2RGroup(click.Group):
    """Turns known user errors into one clear line and an exit code instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        signal.signal(signal.SIGTERM, _sigterm)  # `kill`/dvc cancel -> KeyboardInterrupt -> run marked KILLED
        from s2r.tracking import redact_process_output

        redact_process_output()  # no password reaches the terminal, a worker log or a log file
        try:
            return super().invoke(ctx)
        except Exception as e:
            # Imported here, not before the command runs: s2r.data imports numpy, whose OpenBLAS starts its thread
            # pool at import, sized by the environment that `s2r parallel` sets only later (a process with that
            # pool running is not forked: s2r.parallel.single_threaded).
            from s2r.config import ConfigError
            from s2r.data.benchmark import DataError

            if isinstance(e, (ConfigError, DataError, FileNotFoundError)):
                click.secho(f"error: {e}", fg="red", err=True)
                sys.exit(2)
            if type(e).__name__ == "NonFiniteLossError":
                click.secho(f"error: {e}", fg="red", err=True)
                sys.exit(3)
            raise


def _from_argv(param: str) -> bool:
    """Whether the current command's option `param` was typed on the command line (not taken from the environment)."""
    return click.get_current_context().get_parameter_source(param) == click.core.ParameterSource.COMMANDLINE


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _overrides(sets: tuple[str, ...]) -> dict[str, Any]:
    """`--set KEY=VALUE` options -> {dotted key: YAML-parsed value}."""
    import yaml

    from s2r.config import ConfigError

    overrides = {}
    for s in sets:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected KEY=VALUE, e.g. methods.mixing.lr=0.01")
        k, v = s.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    return overrides


def _load(params_path: str, sets: tuple[str, ...] = ()) -> Any:
    from s2r.params import load_params

    return load_params(params_path, _overrides(sets))


@click.group(cls=S2RGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="s2r")
def main() -> None:
    """s2r: synthetic-to-real transfer experiments, tracked (MLflow), versioned (DVC) and tunable (Optuna).

    Typical flow (what `dvc repro` runs): data generate -> data validate -> data prepare -> train -> evaluate.
    """


@main.group()
def data() -> None:
    """Create, import, validate and prepare benchmarks."""


@data.command("generate")
@click.argument("name", type=click.Choice(["digits", "scenes", "scenes32"]))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Benchmark folder to write.")
@PARAMS_OPT
def data_generate(name: str, out: str, params_path: str) -> None:
    """Generate an embedded benchmark offline (sizes from params.yaml benchmarks.NAME).

    Example: s2r data generate digits --out data/benchmarks/digits
    """
    from s2r import stages

    params = _load(params_path)
    root = stages.generate(name, Path(out), params)
    click.echo(f"wrote benchmark {name!r} to {root}")


_IMPORT_OPTS = [
    click.option("--out", required=True, type=click.Path(file_okay=False), help="Benchmark folder to write."),
    click.option("--name", required=True, help="Benchmark name."),
    click.option("--source", required=True, help="Source (synthetic) domain name."),
    click.option("--target", required=True, help="Target (real) domain name."),
    click.option("--channels", type=click.Choice(["1", "3"]), help="Force grey (1) or RGB (3)."),
    click.option("--image-size", type=int, help="Resize to this square size at prepare time."),
    click.option("--unlabelled", multiple=True, help="A domain whose labels must not be used (repeatable)."),
    click.option("--classes", help="Declared class list, comma-separated (label order); other labels are refused."),
    click.option("--declaration", type=click.Path(exists=True, dir_okay=False),
                 help="YAML declaring classes, factors, factor_ranges, depth_scale, mask_classes, ... "
                      "(docs/datasets/generic.md)."),
    click.option("--allow-outside-root", is_flag=True,
                 help="Accept files (symlinks resolved) outside the dataset root; validation lists them."),
    click.option("--skip-bad-files", is_flag=True,
                 help="Drop broken symlinks / unreadable files with a warning instead of refusing the import."),
]


def _import_common(channels: str | None, image_size: int | None, classes: str | None,
                   declaration: str | None) -> dict[str, Any]:
    """The keyword arguments the import commands share (declared classes/channels/size + a declaration file)."""
    from s2r.data.adapters import load_declared

    return {"channels": int(channels) if channels else None, "image_size": image_size,
            "classes": [c.strip() for c in classes.split(",") if c.strip()] if classes else None,
            "declared": load_declared(Path(declaration)) if declaration else None}


def _echo_warnings(caught: list[Any]) -> None:
    for w in caught:  # what the user accepted explicitly (skipped files, files outside the root)
        if w.category.__name__ == "IngestWarning":
            click.secho(f"warning: {w.message}", fg="yellow", err=True)


def _import_opts(f: Any) -> Any:
    for opt in reversed(_IMPORT_OPTS):
        f = opt(f)
    return f


@data.command("import-folder")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@_import_opts
def data_import_folder(src: str, out: str, name: str, source: str, target: str, channels: str | None,
                       image_size: int | None, unlabelled: tuple[str, ...], classes: str | None,
                       declaration: str | None, allow_outside_root: bool, skip_bad_files: bool) -> None:
    """Register an image folder SRC/<domain>/<split>/<class>/*.png as a benchmark (files stay in place).

    Example: s2r data import-folder ~/mydata --out data/benchmarks/mine --name mine --source synthetic --target real
    """
    import warnings

    from s2r.data.adapters import from_image_folder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = from_image_folder(Path(src), Path(out), name=name, source=source, target=target,
                                 unlabelled=unlabelled, allow_outside_root=allow_outside_root,
                                 skip_bad_files=skip_bad_files,
                                 **_import_common(channels, image_size, classes, declaration))
    _echo_warnings(caught)
    click.echo(f"wrote benchmark {name!r} to {root}")


@data.command("import-manifest")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@_import_opts
@click.option("--root", type=click.Path(exists=True, file_okay=False),
              help="Base of relative paths [manifest's folder].")


def data_import_manifest(manifest: str, out: str, name: str, source: str, target: str, channels: str | None,
                         image_size: int | None, unlabelled: tuple[str, ...], classes: str | None,
                         declaration: str | None, allow_outside_root: bool, skip_bad_files: bool,
                         root: str | None) -> None:
    """Register a CSV/Parquet manifest (path, domain, split[, id, label, factor_*, depth_path, mask_path]).

    Example: s2r data import-manifest my.csv --out data/benchmarks/mine --name mine --source sim --target real
    """
    import warnings

    from s2r.data.adapters import from_manifest

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = from_manifest(Path(manifest), Path(out), name=name, source=source, target=target,
                            root=Path(root) if root else None, unlabelled=unlabelled,
                            allow_outside_root=allow_outside_root, skip_bad_files=skip_bad_files,
                            **_import_common(channels, image_size, classes, declaration))
    _echo_warnings(caught)
    click.echo(f"wrote benchmark {name!r} to {res}")


@data.command("validate")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--report", "report_path", required=True, type=click.Path(dir_okay=False),
              help="JSON report to write.")
@click.option("--no-files", is_flag=True, help="Skip opening every image (manifest checks only).")
def data_validate(root: str, report_path: str, no_files: bool) -> None:
    """Check a benchmark's manifest and files with Great Expectations; exit 1 on failure.

    Example: s2r data validate data/benchmarks/digits --report data/reports/digits/validation.json
    """
    from s2r.data.validation import validate_benchmark

    rep = validate_benchmark(Path(root), check_files=not no_files)
    rep.to_json(Path(report_path))
    if not rep.success:
        click.secho(rep.summary(), fg="red", err=True)
        sys.exit(1)
    click.echo(f"{root}: {rep.n_rows} rows, {len(rep.results)} expectations passed -> {report_path}")


@data.command("prepare")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Prepared folder to write.")
def data_prepare(root: str, out: str) -> None:
    """Decode a benchmark once into memory-mappable uint8 arrays (a failed run keeps the old copy).

    Example: s2r data prepare data/benchmarks/digits --out data/prepared/digits
    """
    from s2r.data.prepared import prepare

    click.echo(f"prepared {prepare(Path(root), Path(out))}")


# --- real datasets (issue 9): adapters for the papers' published datasets, merging, stand-ins -------------


def _options(pairs: tuple[str, ...], files: tuple[str, ...]) -> dict[str, Any]:
    """Adapter options from --options FILE[:dotted.key] (YAML mappings) then -o KEY=VALUE (YAML values)."""
    import yaml

    from s2r.data.benchmark import DataError

    out: dict[str, Any] = {}
    for spec in files:
        path, _, key = spec.partition(":")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"--options {spec}: cannot read {path}: {e}") from e
        for part in [k for k in key.split(".") if k]:
            if not isinstance(raw, dict) or part not in raw:
                raise DataError(f"--options {spec}: {path} has no key {key!r}")
            raw = raw[part]
        if not isinstance(raw, dict):
            raise DataError(f"--options {spec}: {key or path} is not a mapping of options")
        out.update(raw)
    for pair in pairs:
        if "=" not in pair:
            raise DataError(f"-o {pair!r}: expected KEY=VALUE, e.g. -o large_only=true")
        k, v = pair.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@data.command("add")
@click.argument("name")
@click.option("--from", "src", required=True, type=click.Path(), help="Your download of the dataset (a folder).")
@click.option("--out", type=click.Path(file_okay=False), help="Benchmark folder to write [data/benchmarks/NAME].")
@click.option("--kind", help="Adapter to use when NAME is not a dataset name (see `s2r data sources`).")
@click.option("-o", "--option", "pairs", multiple=True, metavar="KEY=VALUE", help="Adapter option (repeatable).")
@click.option("--options", "option_files", multiple=True, metavar="FILE[:KEY]",
              help="Adapter options from a YAML file (optionally a dotted key inside it).")
@click.option("--dvc/--no-dvc", default=True, show_default=True,
              help="`dvc add` the download and the benchmark (off inside DVC stages, whose outputs DVC tracks).")


def data_add(name: str, src: str, out: str | None, kind: str | None, pairs: tuple[str, ...],
             option_files: tuple[str, ...], dvc: bool) -> None:
    """Register a downloaded dataset (MPI3D, SVIRO, TICaM, KITTI, VKITTI 2, YCB-Video, BOP, ...) as a benchmark.

    s2r never downloads: when the folder is missing or not in the published layout, it prints where to get
    the dataset and the layout it expects. A folder with a dataset declaration dataset.yaml works for any data.

    Example: s2r data add mpi3d --from data/raw/mpi3d -o large_only=true -o max_scenes=50000
    """
    from s2r.data import sources

    res = sources.add(name, Path(src), Path(out or f"data/benchmarks/{name}"), kind=kind,
                      options=_options(pairs, option_files), dvc=dvc, log=click.echo)
    extra = f"; verified {len(res['verified'])} checksum(s)" if res["verified"] else ""
    tracked = f"; dvc add {', '.join(res['dvc'])}" if res["dvc"] else ""
    click.echo(f"wrote benchmark {name!r} ({res['kind']}) to {res['benchmark']}{extra}{tracked}")


@data.command("sources")
@click.argument("kind", required=False)
def data_sources(kind: str | None) -> None:
    """List the datasets `s2r data add` knows, or show where to get KIND and the layout it expects.

    Example: s2r data sources ticam
    """
    from s2r.data import sources

    if kind:
        click.echo(sources.describe(kind))
        return
    for k, src in sources.SOURCES.items():
        click.echo(f"{k:20s} {src.info.title}  (docs/datasets/{src.info.doc}.md)")


@data.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Benchmark folder to write.")
@click.option("--name", required=True, help="Name of the merged benchmark.")
@click.option("--source", required=True, help="Source (synthetic) domain.")
@click.option("--target", required=True, help="Target (real) domain.")
@click.option("--image-size", type=int, help="Common size prepare resizes to [the largest].")
def data_merge(parts: tuple[str, ...], out: str, name: str, source: str, target: str, image_size: int | None) -> None:
    """Put the domains of several benchmarks side by side (e.g. SVIRO sim + TICaM real) in one benchmark.

    Example: s2r data merge data/benchmarks/sviro data/benchmarks/ticam --out data/benchmarks/sviro_ticam
    --name sviro_ticam --source tesla --target ticam
    """
    from s2r.data.sources.generic import merge

    merge([Path(p) for p in parts], Path(out), name=name, source=source, target=target, image_size=image_size)
    click.echo(f"wrote merged benchmark {name!r} to {out}")


@data.command("fixture")
@click.argument("kind")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the stand-in into.")
def data_fixture(kind: str, out: str) -> None:
    """Write a tiny stand-in of dataset KIND in its exact published layout (to try `data add` and recipes).

    Example: s2r data fixture ticam --out /tmp/ticam-standin
    """
    from s2r.data import sources

    root = sources.write_fixture(kind, Path(out))
    click.echo(f"wrote a {kind} stand-in (NOT the real dataset) to {root}")


class MethodsCommand(click.Command):
    """A command whose help ends with the methods and their variants (params.yaml blocks) one can train."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        with formatter.section("Methods (variants = params.yaml blocks of ./params.yaml)"):
            formatter.write_text("\b\n" + "\n".join(method_catalogue()))


def method_catalogue(params_path: str = "params.yaml") -> list[str]:
    """Registered methods with their paper and the params blocks that train them (help texts, unknown-method errors)."""
    import yaml

    from s2r.methods import registry

    try:
        blocks = list((yaml.safe_load(Path(params_path).read_text()) or {}).get("methods") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        blocks = []
    return registry.catalogue(blocks)


@main.command("train", cls=MethodsCommand)
@click.argument("method")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Prepared benchmark folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--metrics", type=click.Path(dir_okay=False), help="Metrics JSON to write.")
@click.option("--plots", type=click.Path(file_okay=False), help="Folder for training-curve CSV.")
@click.option("--checkpoints", type=click.Path(file_okay=False), help="Checkpoint folder [data/checkpoints/METHOD].")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint (same MLflow run, same schedule).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a params.yaml key (repeatable).")
@click.option("--init", "init_dir", type=click.Path(exists=True, file_okay=False),
              help="Start from a trained model folder (e.g. twinvae_heads from data/models/twinvae).")
@click.option("--nproc-per-node", type=click.IntRange(min=1),
              help="Train on N processes of this machine (one per GPU): runs this command under `torchrun "
                   "--standalone` (docs/distributed.md; several nodes: call torchrun yourself).")
@PARAMS_OPT
def train_cmd(method: str, data_dir: str, out: str, metrics: str | None, plots: str | None,
              checkpoints: str | None, resume: bool, sets: tuple[str, ...], init_dir: str | None,
              nproc_per_node: int | None, params_path: str) -> None:
    """Train METHOD (a key of params.yaml `methods`) and log the run to MLflow as train@METHOD-seedN.

    Example: s2r train mixing --data data/prepared/digits --out data/models/mixing
    --set methods.mixing.real_fraction=0.25
    """
    from s2r import stages
    from s2r.config import ConfigError

    if nproc_per_node is not None:
        args = [method, "--data", data_dir, "--out", out, "--params", params_path, *(["--resume"] if resume else [])]
        for opt, value in (("--metrics", metrics), ("--plots", plots), ("--checkpoints", checkpoints),
                           ("--init", init_dir)):
            args += [opt, value] if value else []
        args += [a for s in sets for a in ("--set", s)]
        sys.exit(_torchrun_train(args, nproc_per_node, Path(checkpoints or Path("data/checkpoints") / method)))
    params = _load(params_path, sets)
    if method not in params.methods:
        raise ConfigError(f"{params_path}: no params block methods.{method}; the methods and their variants:\n  "
                          + "\n  ".join(method_catalogue(params_path)))
    summary = stages.train(stages.TrainRequest(method, Path(data_dir), Path(out),
                                               metrics_out=Path(metrics) if metrics else None,
                                               plots_out=Path(plots) if plots else None,
                                               ckpt_dir=Path(checkpoints) if checkpoints else None, resume=resume,
                                               init=Path(init_dir) if init_dir else None), params)
    if summary:  # ranks > 0 of a distributed training return nothing: rank 0 reports
        click.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


def _torchrun_train(args: list[str], nproc: int, ckpt_dir: Path) -> int:
    """`torchrun --standalone --nproc-per-node N -m s2r train ARGS`; its exit status. If it fails or is stopped,
    the MLflow run its rank 0 opened (run.json beside the checkpoints) is settled: KILLED once no rank holds it."""
    import json
    import subprocess

    from s2r import distributed, tracking

    if distributed.launched():
        raise click.UsageError("--nproc-per-node: this process already runs under torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "s2r", "train", *args]
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: torchrun stops its workers (SIGTERM, then SIGKILL after 30 s)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    if code != 0 and (ckpt_dir / "run.json").is_file():
        run_id = json.loads((ckpt_dir / "run.json").read_text()).get("run_id", "")
        if run_id and tracking.run_status(run_id) == "RUNNING":
            tracking.reconcile_deferring_interrupts()
    return code


@main.command("evaluate")
@click.argument("method")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Metrics JSON to write.")
@click.option("--plots", type=click.Path(file_okay=False), help="Folder for confusion matrix PNG/CSV.")
@PARAMS_OPT
def evaluate_cmd(method: str, model_dir: str, data_dir: str, out: str, plots: str | None, params_path: str) -> None:
    """Score a trained METHOD on the target domain's test split; logged as evaluate@METHOD.

    Example: s2r evaluate mixing --model data/models/mixing --data data/prepared/digits
    --out data/metrics/mixing/evaluate.json
    """
    from s2r import stages

    r = stages.evaluate(method, Path(model_dir), Path(data_dir), Path(out), Path(plots) if plots else None,
                        _load(params_path))
    if "accuracy" in r:
        click.echo(f"{method}: {r['domain']}/test accuracy {r['accuracy']:.4f} (n={r['n']})")
    else:  # other evaluators (segmentation_lastk, depth_segmentation, ...): their top-level numbers
        nums = ", ".join(f"{k} {v:.4f}" for k, v in r.items()
                         if isinstance(v, float) and not k.endswith(("_min", "_max")))
        click.echo(f"{method}: {r['domain']}/test {nums}")


@main.command("refine")
@click.argument("method")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Prepared benchmark to write.")
@click.option("--metrics", type=click.Path(dir_okay=False), help="Metrics JSON to write.")
@click.option("--plots", type=click.Path(file_okay=False), help="Folder for the refinement sample grid.")
@PARAMS_OPT
def refine_cmd(method: str, model_dir: str, data_dir: str, out: str, metrics: str | None, plots: str | None,
               params_path: str) -> None:
    """Translate a benchmark with a trained METHOD (translate capability) into a refined prepared benchmark.

    Example: s2r refine cyclegan --model data/models/cyclegan --data data/prepared/digits
    --out data/prepared/digits-cyclegan
    """
    from s2r import stages

    r = stages.refine(method, Path(model_dir), Path(data_dir), Path(out), Path(plots) if plots else None,
                      _load(params_path), metrics_out=Path(metrics) if metrics else None)
    click.echo(f"{method}: wrote {out} (source domain {r['source']!r}, data version {r['data_version'][:12]})")


@main.group("tables")
def tables() -> None:
    """Results tables in the format of the papers' tables (one subcommand per method).

    Example: s2r tables mixing --synthetic data/prepared/digits --cyclegan data/prepared/digits-cyclegan
    --mrgan data/prepared/digits-cyclegan-mrgan
    """


@tables.command("mixing")
@click.option("--synthetic", "syn", required=True, type=click.Path(exists=True, file_okay=False),
              help="Prepared benchmark with the original synthetic domain.")
@click.option("--cyclegan", type=click.Path(exists=True, file_okay=False),
              help="Prepared benchmark refined by CycleGAN (s2r refine cyclegan); with --mrgan: Table 3.")
@click.option("--mrgan", type=click.Path(exists=True, file_okay=False),
              help="Prepared benchmark refined by MrGAN's last stage (s2r refine mrgan).")
@click.option("--stage2", multiple=True, metavar="LABEL=PATH",
              help="Fig. 7: a benchmark refined by one MrGAN stage-2 mapping (repeat: RR-RS, R-RS, RR-S).")
@click.option("--out", default="data/tables/mixing", show_default=True, type=click.Path(file_okay=False))
@PARAMS_OPT
def tables_mixing_cmd(syn: str, cyclegan: str | None, mrgan: str | None, stage2: tuple[str, ...], out: str,
                      params_path: str) -> None:
    """Paper 4's Tables 3 and 2 and Fig. 7 (mean ± std over seeds, ratio cross-validated on real val).

    Without --cyclegan / --mrgan only Table 2 is run (e.g. on CIFAR-DA9).

    Example: s2r tables mixing --synthetic data/prepared/digits --cyclegan data/prepared/digits-cyclegan
    --mrgan data/prepared/digits-mrgan
    """
    from s2r.tables.mixing import mixing_tables

    maps: dict[str, Path] = {}
    for item in stage2:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_dir():
            raise click.BadParameter(f"{item!r}: expected LABEL=PATH with an existing folder", param_hint="--stage2")
        maps[label] = Path(path)
    datasets = {"synthetic": Path(syn)} | {k: Path(v) for k, v in (("cyclegan", cyclegan), ("mrgan", mrgan)) if v}
    try:
        res = mixing_tables(datasets, Path(out), Path(params_path), maps)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from e
    for name in ("table3", "table2", "fig7"):
        if name in res:
            click.echo((Path(out) / f"{name}.md").read_text())
    click.echo(f"{res['metrics']['n_runs']} classifier runs; files in {out}")


@tables.command("cut")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Prepared benchmark with masks in source and target (e.g. data/prepared/scenes).")
@click.option("--out", default="data/tables/cut", show_default=True, type=click.Path(file_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a params key in every run of the table (repeatable): reports.cut_tables.lambda_nce=2.")
@PARAMS_OPT
def tables_cut_cmd(data_dir: str, out: str, params_path: str, sets: tuple[str, ...]) -> None:
    """Paper 5's Table II (mIoU vs target-trained vs synthetic, per CUT patch size) and Table I (epoch time).

    Settings come from reports.cut_tables in params.yaml; every CUT and segmenter run is a nested MLflow run.

    Example: s2r tables cut --data data/prepared/scenes --out data/tables/cut --set reports.cut_tables.lambda_nce=2
    """
    from s2r.tables.cut import cut_tables

    overrides = _overrides(sets)
    res = cut_tables(Path(data_dir), Path(out), Path(params_path), overrides)
    click.echo((Path(out) / "table2.md").read_text())
    click.echo((Path(out) / "table1.md").read_text())
    verdict = "beat" if res["metrics"]["refined_beats_synthetic"] else "did NOT beat"
    click.echo(f"refinement {verdict} raw synthetic (best: {res['metrics']['best_refined']}); files in {out}")


@tables.command("twinvae")
@click.option("--ours", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Evaluate JSON of the twin VAE's heads (s2r evaluate twinvae_heads).")
@click.option("--lower", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Evaluate JSON of the sim-only lower bound (twinvae_simonly).")
@click.option("--upper", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Evaluate JSON of the target-supervised upper bound (twinvae_targetsup).")
@click.option("--out", default="data/tables/twinvae", show_default=True, type=click.Path(file_okay=False))
@PARAMS_OPT
def tables_twinvae_cmd(ours: str, lower: str, upper: str, out: str, params_path: str) -> None:
    """Paper 2's Table 1 (depth + segmentation: ours vs sim-only and target-supervised) as files + MLflow.

    Example: s2r tables twinvae --ours data/metrics/twinvae_heads/evaluate.json
    --lower data/metrics/twinvae_simonly/evaluate.json --upper data/metrics/twinvae_targetsup/evaluate.json
    """
    from s2r.methods import registry
    from s2r.tables.twinvae import twinvae_table

    experiment = registry.experiment(_load(params_path).tracking.experiment, "twinvae")
    res = twinvae_table(Path(ours), Path(lower), Path(upper), Path(out), experiment)
    click.echo(res["text"])
    click.echo(f"files in {out}")


@tables.command("betavae")
@click.option("--data", "data_dir", default="data/prepared/scenes", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="Prepared factor-labelled benchmark.")
@click.option("--out", default="data/tables/betavae", show_default=True, type=click.Path(file_okay=False))
@PARAMS_OPT
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a params key for every model (repeatable), e.g. methods.betavae.ood_factor=object_color.")


def tables_betavae_cmd(data_dir: str, out: str, params_path: str, sets: tuple[str, ...]) -> None:
    """Paper 3's study: train the reports.betavae_tables grid, Spearman heatmap + transfer table + MLflow.

    Example: s2r tables betavae --data data/prepared/scenes --out data/tables/betavae
    """
    from s2r.tables.betavae import betavae_tables

    overrides = _overrides(sets)
    res = betavae_tables(Path(data_dir), Path(out), Path(params_path), overrides)
    click.echo((Path(out) / "transfer.md").read_text())
    click.echo(" ".join(f"{k}={v}" for k, v in res["metrics"].items()))
    click.echo(f"{res['metrics']['n_models']} models; files in {out}")


@tables.command("ae")
@click.option("--digits", type=click.Path(exists=True, file_okay=False), default=None,
              help="Prepared digits benchmark: Table 10 (latent classifiers, all seeds of reports.ae_tables).")
@click.option("--scenes", type=click.Path(exists=True, file_okay=False), default=None,
              help="Prepared scenes benchmark: Table 1 (reconstructions, trained on toy and on sim).")
@click.option("--out", default="data/tables/ae", show_default=True, type=click.Path(file_okay=False))
@PARAMS_OPT
def tables_ae_cmd(digits: str | None, scenes: str | None, out: str, params_path: str) -> None:
    """Paper 1's Table 10 (KNN / RForest / SVM on real digits, mean ± std over seeds) and Table 1 as files + MLflow.

    Example: s2r tables ae --digits data/prepared/digits --scenes data/prepared/scenes
    """
    from s2r.tables.ae import ae_tables

    if digits is None and scenes is None:
        raise click.UsageError("give --digits and/or --scenes")
    ae_tables(Path(digits) if digits else None, Path(scenes) if scenes else None, Path(out), Path(params_path))
    for name in ("table10.md", "table1.md"):
        if (Path(out) / name).is_file():
            click.echo((Path(out) / name).read_text())
    click.echo(f"files in {out}")


@main.command("report")
@click.option("--metrics-dir", default="data/metrics", show_default=True, type=click.Path(file_okay=False))
@click.option("--verdicts", "verdicts_out", type=click.Path(dir_okay=False),
              help="Also write the paper verdicts as a metrics JSON (dvc metrics show).")
@click.option("--readme", type=click.Path(exists=True, dir_okay=False),
              help="Rewrite the generated results block of this README (between the s2r:verdicts markers).")
@click.option("--compare", type=click.Path(exists=True, dir_okay=False),
              help="Another run's verdicts JSON (e.g. the second-CPU run's): list the claims whose verdict differs.")
@PARAMS_OPT
def report_cmd(metrics_dir: str, verdicts_out: str | None, readme: str | None, compare: str | None,
               params_path: str) -> None:
    """Print the results table of every evaluated method (COLLAPSED models marked) and the paper verdicts.

    Example: s2r report --verdicts data/metrics/verdicts.json --readme README.md
    """
    from s2r.config import need
    from s2r.report import report

    params = _load(params_path)
    rule = need(params.reports.verdicts, "reports.verdicts", params.source)
    click.echo(report(Path(metrics_dir), rule, verdicts_out=Path(verdicts_out) if verdicts_out else None,
                      readme=Path(readme) if readme else None, compare=Path(compare) if compare else None))


@main.command("benchmark")
@click.argument("method", default="mixing")
@click.option("--data", "data_dir", default="data/prepared/digits", show_default=True,
              type=click.Path(exists=True, file_okay=False))
@click.option("--fractions", default="0,0.125,1", show_default=True, help="real_fraction values to compare.")
@click.option("--out", default="data/benchmark/mixing.json", show_default=True, type=click.Path(dir_okay=False))
@PARAMS_OPT
def benchmark_cmd(method: str, data_dir: str, fractions: str, out: str, params_path: str) -> None:
    """Measure loading throughput vs step time, MLflow overhead, and accuracy across real fractions.

    Example: s2r benchmark mixing --fractions 0,0.125,0.5,1
    """
    from s2r import bench

    res = bench.run(method, Path(data_dir), [float(f) for f in fractions.split(",")], Path(out), params_path)
    click.echo(bench.format_result(res))


@main.command("gpu-check")
@click.option("--reference", type=click.Path(exists=True, file_okay=False),
              help="A checkout of taesungp/contrastive-unpaired-translation to time side by side (never committed).")
@click.option("--out", default="data/gpu-check.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--methods", default="", help="Comma-separated method blocks (default: every block of params.yaml).")
@click.option("--steps", default=2, show_default=True, help="Training steps per epoch per method (2 epochs).")
@click.option("--skip-methods", is_flag=True, help="Only the CUT timing.")
@click.option("--skip-timing", is_flag=True, help="Only the per-method train / resume / evaluate check.")
def gpu_check_cmd(reference: str | None, out: str, methods: str, steps: int, skip_methods: bool,
                  skip_timing: bool) -> None:
    """On a CUDA machine: every method in bf16 (train, resume, evaluate) and CUT timed at paper settings.

    Without CUDA it says so and exits 0. Example: s2r gpu-check --reference ../contrastive-unpaired-translation
    """
    from s2r import gpucheck

    sys.exit(gpucheck.run(Path(out), Path(reference) if reference else None,
                          [m for m in methods.split(",") if m] or None, skip_methods, skip_timing, steps))


@main.group("registry")
def registry_group() -> None:
    """Register trained models as s2r-METHOD in MLflow, move aliases (candidate, champion), predict.

    Example: s2r registry register mixing --from data/metrics/mixing/train.json
    """


@registry_group.command("register")
@click.argument("method")
@click.option("--run-id", help="MLflow run id of a training run (train@METHOD).")
@click.option("--from", "from_file", type=click.Path(dir_okay=False),
              help="A train metrics JSON or a tuning best.yaml holding mlflow_run_id.")
@click.option("--alias", default="candidate", show_default=True, help="Alias to point at the new version.")
@click.option("--receipt", type=click.Path(dir_okay=False), help="JSON receipt to write (name, version, ...).")
def registry_register(method: str, run_id: str | None, from_file: str | None, alias: str,
                      receipt: str | None) -> None:
    """Register the model a training run logged as a new version of s2r-METHOD.

    Example: s2r registry register mixing --from data/metrics/mixing/train.json --receipt data/release/mixing.json
    """
    from s2r import model_registry

    r = model_registry.register(method, run_id=run_id, best_file=Path(from_file) if from_file else None, alias=alias,
                          receipt=Path(receipt) if receipt else None)
    click.echo(f"registered {r['name']} v{r['version']} @{r['alias']} from run {r['run_id']} ({r['model_uri']})")


@registry_group.command("list")
@click.argument("method", required=False)
def registry_list(method: str | None) -> None:
    """Show every registered version of the s2r models (or of METHOD's) with its aliases.

    Example: s2r registry list mixing
    """
    from s2r import model_registry

    click.echo(model_registry.format_models(model_registry.list_models(method)))


@registry_group.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--alias", default="champion", show_default=True, help="Alias to move to VERSION.")
def registry_promote(name: str, version: int, alias: str) -> None:
    """Point an alias of model NAME at VERSION (the other versions stay registered).

    Example: s2r registry promote s2r-mixing 2 --alias champion
    """
    from s2r import model_registry

    r = model_registry.promote(name, version, alias)
    was = f" (was v{r['previous']})" if r["previous"] is not None else ""
    click.echo(f"{r['name']}@{r['alias']} -> v{r['version']}{was}; load it as models:/{r['name']}@{r['alias']}")


@registry_group.command("predict")
@click.argument("name")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV to write.")
@click.option("--alias", default="champion", show_default=True, help="Alias of the version to use.")
@click.option("--version", "version", type=int, help="Use this version number instead of the alias.")
def registry_predict(name: str, folder: str, out: str, alias: str, version: int | None) -> None:
    """Classify every image under FOLDER (png/jpg/bmp, recursive) with a registered model; write a CSV.

    Example: s2r registry predict s2r-mixing photos/ --out predictions.csv --alias champion
    """
    from s2r import model_registry

    df = model_registry.predict_folder(name, Path(folder), Path(out), alias=alias, version=version)
    click.echo(f"{len(df)} images -> {out}")


@main.command("tune")
@click.option("--study", required=True, help="A study declared under `studies:` in params.yaml.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Prepared benchmark the trials train on.")
@click.option("--n-trials", type=int, help="Finished trials wanted in total (default: the study's n_trials).")
@click.option("--storage", envvar="S2R_OPTUNA_STORAGE", show_envvar=True,
              help="RDB URL (postgresql+psycopg2://…) or journal file [data/tuning/STUDY/journal.log]. A URL with a "
                   "password: give it by $S2R_OPTUNA_STORAGE or --storage-file, not here (argv shows in `ps`).")
@click.option("--storage-file", type=click.Path(exists=True, dir_okay=False),
              help="A file (mode 600) whose first line is the storage URL, instead of --storage.")
@click.option("--study-name", help="Name of the study in the storage [STUDY].")
@click.option("--resume", is_flag=True, help="Continue the stored study (or create it); other workers join this way.")
@click.option("--restart", is_flag=True, help="Delete the stored study of that name and start over.")
@click.option("--heartbeat-interval", default=10, show_default=True,
              help="Seconds between heartbeats (RDB trials; journal studies' worker files).")
@click.option("--grace-period", default=30, show_default=True,
              help="Seconds without a heartbeat before a worker on another host counts as dead (same host: its pid).")
@click.option("--max-retry", default=2, show_default=True,
              help="Retries of a trial whose worker died (the retry keeps its parameters).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder [data/tuning/STUDY].")
@PARAMS_OPT
@team.worker_options  # --workers / --gpus / --workers-per-gpu: launch worker processes (s2r/team.py)
def tune_cmd(study: str, data_dir: str, n_trials: int | None, storage: str | None, storage_file: str | None,
             study_name: str | None, resume: bool, restart: bool, heartbeat_interval: int, grace_period: int,
             max_retry: int, out_dir: str | None, params_path: str) -> None:
    """Run an Optuna study from params.yaml; every trial is a nested MLflow run; writes best.yaml.

    Example: s2r tune --study mixing_ratio --data data/prepared/digits --n-trials 10
    """
    from s2r import tune

    storage = tune.storage_option(storage, storage_file, from_argv=_from_argv("storage"))

    res = tune.run(tune.TuneOptions(
        study=study, data_dir=Path(data_dir), params_path=Path(params_path), storage=storage, study_name=study_name,
        n_trials=n_trials, resume=resume, restart=restart, heartbeat_interval=heartbeat_interval,
        grace_period=grace_period, max_retry=max_retry, out_dir=Path(out_dir) if out_dir else None))
    click.echo(" ".join(f"{k}={v}" for k, v in res["metrics"].items()))


def preload_stages() -> None:
    """Import what `s2r train / evaluate / refine` import, once, before `s2r parallel` forks its commands."""
    import importlib
    import pkgutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import mlflow.pytorch  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported by the first MlflowClient: ~1.1 s)
    import pandas  # noqa: F401  (the prepared benchmarks' manifests)
    import torch
    import torchvision  # noqa: F401

    import s2r.evaluators
    import s2r.methods
    from s2r import params, stages, tracking, train  # noqa: F401

    for pkg in (s2r.methods, s2r.evaluators):
        for m in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{m.name}")
    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled())  # its lazy imports
    _preload_package_map()


def _preload_package_map() -> None:
    """MLflow's map of the installed packages' modules, built once here instead of in every `log_model`.

    `mlflow.pytorch.log_model` checks the model's pip requirements against the installed packages and for that
    scans every installed package's file list (`importlib_metadata.packages_distributions`, ~2.4 CPU-seconds per
    trained model on the 2-core machine). MLflow caches the map in a module global, which forked children inherit.
    A private MLflow function: if a later MLflow renames it, each child builds its own map again (slower, same result).
    """
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()  # type: ignore[no-untyped-call]
    except (ImportError, AttributeError):
        pass


def forked_s2r(argv: list[str]) -> None:
    """`s2r ARGS` in a child forked by `s2r parallel`: torch's thread pool sized to this command's share first."""
    import os

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main.main(args=argv[1:], prog_name="s2r")


@main.command("parallel")
@click.argument("commands", nargs=-1, required=True)
@click.option("--jobs", "-j", default=0, show_default=True, type=click.IntRange(min=0),
              help="Commands run at once; 0 = one per CPU core (at most the number of commands).")
@click.option("--fork/--no-fork", default=True, show_default=True,
              help="Run `s2r ...` commands in children forked after one import of torch / MLflow / s2r.")
def parallel_cmd(commands: tuple[str, ...], jobs: int, fork: bool) -> None:
    """Run COMMANDS (each one quoted command line, or a chain "A && B") side by side, the cores split between them.

    Each gets OMP_NUM_THREADS = cores // jobs; they start in the order given as slots free up (longest first);
    the parts of a chain run one after the other in one slot; output lines are prefixed [i]; the first failure
    stops the others and fails naming its command. `s2r` commands are forked from this process after one import
    of the heavy libraries instead of each paying it (--no-fork: plain subprocesses).

    Example: s2r parallel "s2r train betavae --set seed=1 --data data/prepared/scenes --out data/models/b1"
    "s2r train betavae_weak --set seed=1 --data data/prepared/scenes --out data/models/w1"
    """
    from s2r.parallel import ForkServer, ParallelError, run

    server = ForkServer(preload_stages, forked_s2r) if fork else None
    try:
        seconds = run(commands, jobs, fork=server)
    except ParallelError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"s2r parallel: {len(seconds)} commands done ({', '.join(f'{s:.0f} s' for s in seconds)})")


@main.command("ui")
@click.option("--port", default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="uvicorn worker processes of the server (more for a team sharing it).")
def ui_cmd(port: int, host: str, workers: int) -> None:
    """Open the MLflow UI on the project's store and print a link per experiment (one per paper).

    Example: s2r ui --port 5000   (then browse http://127.0.0.1:5000)
    """
    import os

    from s2r.tracking import experiment_links, run_server, tracking_uri, ui_url

    uri = tracking_uri()
    click.echo(f"MLflow UI for {uri} on http://{host}:{port}")
    click.echo(f"experiments: {ui_url(host, port)}")
    for name, url in experiment_links(host, port):
        click.echo(f"  {name:<50} {url}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # One uvicorn worker and no GenAI job runner (its consumer processes serve LLM judges, unused here): on a
    # loaded 2-core machine four workers starting at once missed uvicorn's health check and were restarted
    # for minutes before the UI answered.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # its own process group: stopping `s2r ui` (Ctrl-C, SIGTERM) stops the server and its uvicorn workers too
    sys.exit(run_server([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                         "--host", host, "--port", str(port), "--workers", str(workers)]))


@main.group("recipe")
def recipe_group() -> None:
    """Full-scale paper recipes (pipelines/recipes/PAPER): try them on tiny stand-ins before spending GPU hours.

    Example: s2r recipe standin mixing-ratio-mrgan --out /tmp/recipe && cd /tmp/recipe
    && dvc repro pipelines/recipes/mixing-ratio-mrgan/dvc.yaml
    """


@recipe_group.command("standin")
@click.argument("paper")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Scratch DVC project to create.")
@click.option("--repo", default=".", show_default=True, type=click.Path(exists=True, file_okay=False),
              help="The s2r checkout holding pipelines/recipes/PAPER.")


def recipe_standin(paper: str, out: str, repo: str) -> None:
    """Create a scratch DVC project running recipe PAPER on stand-in data with its fixture.yaml overrides.

    Example: s2r recipe standin mixing-ratio-mrgan --out /tmp/recipe
    """
    from s2r import recipes

    root = recipes.standin(paper, Path(out), Path(repo))
    click.echo(f"stand-in project at {root}; run: cd {root} && dvc repro pipelines/recipes/{paper}/dvc.yaml")


@main.command("dvc-deps")
@click.argument("kind", required=False, type=click.Choice(["train", "refine", "evaluate", "parallel", "params"]))
@click.option("--evaluator", default="", help="evaluate: the evaluator module (default: any of them).")
@click.option("--check", "check", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A dvc.yaml to check: exit 1 naming each code file a stage of this kind runs but misses.")
@click.option("--write", "write", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A dvc.yaml whose `s2r train|refine|evaluate` stages get their code deps rewritten from the "
                   "import graph (data deps and comments kept).")
def dvc_deps_cmd(kind: str | None, evaluator: str, check: tuple[str, ...], write: tuple[str, ...]) -> None:
    """Print the source files a `s2r KIND` stage runs (its DVC code deps), read from the import graph; `params`
    checks every dvc.yaml of the project: a `s2r train BLOCK` stage lists methods.BLOCK and its `base:` blocks.

    Example: s2r dvc-deps train   |   s2r dvc-deps --write dvc.yaml   |   s2r dvc-deps params
    """
    from s2r import codegraph

    if write:
        for f in write:
            changed = codegraph.write_dvc(Path(f), Path.cwd())
            click.echo(f"{f}: code deps of {len(changed)} stage(s) rewritten" + (f": {changed}" if changed else ""))
        return
    if kind is None:
        raise click.UsageError("give a KIND (train, refine, evaluate, parallel, params) or --write DVC_YAML")
    if kind == "params":
        problems = codegraph.check_dvc_params(Path.cwd())
        for p in problems:
            click.secho(p, fg="red", err=True)
        click.echo(f"{len(problems)} stage(s) miss a params block")
        sys.exit(1 if problems else 0)
    if check:
        problems = [p for f in check for p in codegraph.check_dvc(Path(f), Path.cwd()) if kind in p.split("(s2r ")[-1]]
        for p in problems:
            click.secho(p, fg="red", err=True)
        sys.exit(1 if problems else 0)
    for f in codegraph.dvc_deps(kind, evaluator):
        click.echo(f"- {f}")


main.add_command(team.team_cli)  # s2r team up/down/status (s2r/team.py)


if __name__ == "__main__":
    main()

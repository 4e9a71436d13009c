"""The MLflow model registry for s2r: register trained runs as `s2r-<method>`, move aliases, load and predict.

A registered version's source is the model the training run logged (its `model_uri` tag, pickle format), and
the version carries the run's input contract as tags (image_size, channels, classes) plus its data version, so
a user can load `models:/s2r-<method>@champion` and feed it images without the project's params or data.
Promotion moves aliases (`candidate`, `champion`); MLflow's stages are deprecated and never used.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2r.data.benchmark import DataError
from s2r.files import atomic_path, write_json

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from mlflow import MlflowClient

PREFIX = "s2r-"
COPIED_TAGS = ("data_version", "benchmark", "seed", "image_size", "channels", "classes")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


class RegistryError(DataError):
    """A registry request that cannot be met (unknown model, version, alias or run); the CLI prints one line."""


def model_name(method: str) -> str:
    """The registered model name of a method: `s2r-<method>`, one name everywhere."""
    return f"{PREFIX}{method}"


def _client() -> MlflowClient:
    """A client on the project's store (or $MLFLOW_TRACKING_URI), which also holds the registry."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from s2r.tracking import reconcile_once, tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    reconcile_once(uri)  # settle runs of dead processes (s2r.tracking)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _paged(fetch: Any) -> list[Any]:
    """Every item of a paged MLflow search (fetch(page_token) -> PagedList)."""
    out: list[Any] = []
    token = None
    while True:
        page = fetch(token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _model_names(client: MlflowClient) -> list[str]:
    models = _paged(lambda t: client.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'",
                                                              page_token=t))
    return sorted(m.name for m in models)


def _versions(client: MlflowClient, name: str) -> list[Any]:
    mvs = _paged(lambda t: client.search_model_versions(filter_string=f"name = '{name}'", page_token=t))
    return sorted(mvs, key=lambda mv: int(mv.version))


def _registered(client: MlflowClient, name: str) -> Any:
    """The registered model `name`, or a RegistryError listing the s2r models that exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        known = _model_names(client)
        raise RegistryError(f"no registered model {name!r}; registered: {known or 'none yet (s2r registry register)'}"
                            ) from None


def _version(client: MlflowClient, name: str, version: int) -> Any:
    """Model version `name`/`version`, or a RegistryError listing the versions that exist."""
    from mlflow.exceptions import MlflowException

    _registered(client, name)
    try:
        return client.get_model_version(name, str(int(version)))
    except MlflowException as e:
        if not _not_found(e):
            raise
        known = [int(mv.version) for mv in _versions(client, name)]
        raise RegistryError(f"model {name!r} has no version {version}; existing versions: {known}") from None


def _by_alias(client: MlflowClient, name: str, alias: str) -> Any:
    """Model version behind `name@alias`, or a RegistryError listing the aliases that exist."""
    rm = _registered(client, name)
    if alias not in rm.aliases:
        have = ", ".join(f"{a}->v{v}" for a, v in sorted(rm.aliases.items())) or "none"
        raise RegistryError(f"model {name!r} has no alias {alias!r}; aliases: {have} "
                            f"(s2r registry promote {name} VERSION --alias {alias})")
    return client.get_model_version_by_alias(name, alias)


def run_id_from_file(path: Path) -> tuple[str, str | None]:
    """`mlflow_run_id` (and `method`, if present) from a tuning best.yaml or a train metrics JSON."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run `s2r train ... --metrics` or `s2r tune` first)")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RegistryError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict) or not data.get("mlflow_run_id"):
        raise RegistryError(f"{path}: has no key 'mlflow_run_id' (expected a train metrics JSON or a tuning "
                            "best.yaml)")
    method = data.get("method")
    return str(data["mlflow_run_id"]), str(method) if method is not None else None


def register(
    method: str,
    *,
    run_id: str | None = None,
    best_file: Path | None = None,
    alias: str = "candidate",
    receipt: Path | None = None,
) -> dict[str, Any]:
    """Register the model a training run logged as a new version of `s2r-<method>`, so it can be promoted."""
    from mlflow.exceptions import MlflowException

    if (run_id is None) == (best_file is None):
        raise RegistryError("give exactly one of --run-id ID or --from FILE (a train metrics JSON or best.yaml)")
    if best_file is not None:
        run_id, file_method = run_id_from_file(Path(best_file))
        if file_method is not None and file_method != method:
            raise RegistryError(f"{best_file}: is a result of method {file_method!r}, not {method!r}")
    assert run_id is not None
    client = _client()
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if not _not_found(e):
            raise
        raise RegistryError(f"no MLflow run {run_id!r} in {client.tracking_uri}") from None
    tags = run.data.tags
    if tags.get("method", method) != method:
        raise RegistryError(f"run {run_id} trained method {tags['method']!r}, not {method!r}")
    model_uri = tags.get("model_uri")
    if not model_uri:
        raise RegistryError(f"run {run_id} ({run.info.run_name}) logged no model (no 'model_uri' tag): train it "
                            "with tracking.log_model true to register it")
    name = model_name(method)
    try:
        client.create_registered_model(name, description=f"s2r method {method!r} (`s2r registry`)")
    except MlflowException as e:
        if getattr(e, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv_tags = {k: tags[k] for k in COPIED_TAGS if k in tags} | {"method": method}
    try:
        mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=mv_tags,
                                         description=f"from run {run_id} ({run.info.run_name})")
        client.set_registered_model_alias(name, alias, mv.version)
    except MlflowException as e:
        raise RegistryError(f"registering {model_uri} as {name}: {e.message}") from None
    result = {"name": name, "version": int(mv.version), "alias": alias, "run_id": run_id, "model_uri": model_uri,
              "data_version": tags.get("data_version")}
    if receipt is not None:
        write_json(Path(receipt), result)
    return result


def list_models(method: str | None = None) -> list[dict[str, Any]]:
    """Every version of the s2r models (or of one method's), with aliases, to choose what to promote."""
    client = _client()
    names = [model_name(method)] if method else _model_names(client)
    rows = []
    for name in names:
        rm = _registered(client, name)
        by_version: dict[int, list[str]] = {}
        for a, v in rm.aliases.items():  # search results may omit aliases: take them from the model
            by_version.setdefault(int(v), []).append(a)
        for mv in _versions(client, name):
            v = int(mv.version)
            rows.append({
                "name": name, "version": v, "aliases": sorted(by_version.get(v, [])), "run_id": mv.run_id,
                "data_version": mv.tags.get("data_version"),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(
                    timespec="seconds"),
            })
    return rows


def format_models(rows: list[dict[str, Any]]) -> str:
    """A readable table of list_models() rows."""
    if not rows:
        return "no registered s2r models yet (s2r registry register METHOD --from data/metrics/METHOD/train.json)"
    head = f"{'name':<20} {'version':>7}  {'aliases':<20} {'run id':<32}  {'data':<12}  created (UTC)"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<20} {r['version']:>7}  {','.join(r['aliases']) or '-':<20} {r['run_id'] or '-':<32}"
                     f"  {(r['data_version'] or '-')[:12]:<12}  {r['created'].replace('+00:00', '')}")
    return "\n".join(lines)


def promote(name: str, version: int, alias: str = "champion") -> dict[str, Any]:
    """Point `alias` at one version (older versions stay registered and loadable by number)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    mv = _version(client, name, version)
    previous = _registered(client, name).aliases.get(alias)
    try:
        client.set_registered_model_alias(name, alias, mv.version)
    except MlflowException as e:
        raise RegistryError(f"alias {alias!r} for {name} v{version}: {e.message}") from None
    return {"name": name, "version": int(mv.version), "alias": alias, "run_id": mv.run_id,
            "previous": int(previous) if previous is not None else None}


def _resolve(name: str, alias: str, version: int | None) -> tuple[str, Any]:
    client = _client()
    if version is not None:
        return f"models:/{name}/{int(version)}", _version(client, name, version)
    return f"models:/{name}@{alias}", _by_alias(client, name, alias)


def load(name: str, alias: str = "champion", version: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The registered torch module (eval mode, CPU) and its input contract, to use it outside the project."""
    import mlflow

    uri, mv = _resolve(name, alias, version)
    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    model.eval()
    tags = dict(mv.tags)
    info: dict[str, Any] = {"uri": uri, "name": name, "version": int(mv.version), "run_id": mv.run_id, "tags": tags}
    for key in ("image_size", "channels"):
        if key not in tags:
            raise RegistryError(f"{name} v{mv.version} has no {key!r} tag (registered outside s2r?)")
        info[key] = int(tags[key])
    info["classes"] = json.loads(tags.get("classes", "[]"))
    return model, info


def read_images(folder: Path, channels: int, size: int) -> tuple[list[Path], Any]:
    """Every image under `folder` (sorted, recursive) as uint8 (N, H, W, C) of the model's size and channels."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise RegistryError(f"model declares {channels} channels; only 1 (L) or 3 (RGB) are supported")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RegistryError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = np.empty((len(files), size, size, channels), np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                im.load()
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)  # as `s2r data prepare` does
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise RegistryError(f"{p}: not a readable image: {e}") from None
        out[i] = arr[:, :, None] if arr.ndim == 2 else arr  # (H, W) -> (H, W, 1)
    return files, out


def predict_folder(
    name: str,
    folder: Path,
    out_csv: Path,
    alias: str = "champion",
    version: int | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Classify every image in a folder with a registered model and write a CSV, to use it on new real data."""
    import numpy as np
    import pandas as pd
    import torch

    from s2r.methods.base import to_float

    model, info = load(name, alias, version)
    files, images = read_images(Path(folder), info["channels"], info["image_size"])
    probs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = to_float(images[i : i + batch_size], torch.device("cpu"))  # (B, H, W, C) -> (B, C, H, W)
            probs.append(torch.softmax(model(x).float(), 1).numpy())
    p = np.concatenate(probs)
    classes = info["classes"] or [str(k) for k in range(p.shape[1])]
    if len(classes) != p.shape[1]:
        raise RegistryError(f"{name} v{info['version']} outputs {p.shape[1]} scores but its 'classes' tag names "
                            f"{len(classes)}")
    top = p.argmax(1)
    folder = Path(folder)
    df = pd.DataFrame({"file": [f.relative_to(folder).as_posix() for f in files],
                       "predicted": [classes[k] for k in top], "probability": p[np.arange(len(p)), top]})
    for k, c in enumerate(classes):
        df[f"p_{c}"] = p[:, k]
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df

"""Inference weights of a model as safetensors plus a JSON sidecar, and loading them back.

``export_model(..., path="run/model.safetensors")`` writes

* ``model.safetensors``: every parameter and persistent buffer of the model
  (codebooks, EMA statistics and the step counter included; the CLUB nets
  are not part of the model), and
* ``model.json``: the variant, the model config as a dict, the input shapes,
  the srcid version, the SHA-256 of the weights file (hashed from the bytes
  written) and ``extra`` (e.g. the run directory and the training step),

each written under a temporary name and renamed (a failed write is one line
naming the file). :func:`load_model` checks the weights file against the
recorded SHA-256 first (a mismatch: one line saying the file is corrupt; a
sidecar without the key loads unverified), then rebuilds
the model with :func:`srcid.model.variants.build_model` from the JSON and
loads the tensors with safetensors, so nothing is ever unpickled. Every
problem (a missing file, a JSON that does not describe the weights, a tensor
that does not fit the config) is one :class:`SrcidError` line naming the file
and the key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from srcid import __version__
from srcid.config import from_dict, to_dict, with_absent_keys
from srcid.errors import CorruptFileError, SrcidError
from srcid.files import read_json_object, write_atomic, write_json_atomic
from srcid.model.config import ABSENT_MEANS, ModelConfig
from srcid.model.variants import build_model, get_variant

FORMAT = "srcid-model"
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_KEYS = ("format", "format_version", "variant", "config", "input_shapes", "srcid_version", "weights_sha256", "extra")
OPTIONAL_KEYS = ("weights_sha256",)  # absent or null: the weights load unverified


def sidecar_path(path) -> Path:
    """The JSON sidecar of a weights file: ``model.safetensors`` -> ``model.json``."""
    return Path(path).with_suffix(".json")


def _weights_path(path) -> Path:
    path = Path(path)
    if path.suffix != WEIGHTS_SUFFIX:
        raise SrcidError(f"{path}: an exported model file must end in {WEIGHTS_SUFFIX}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(model, *, variant: str, config: ModelConfig, input_shapes: dict, path, extra: dict | None = None) -> Path:
    """Write ``model``'s inference weights to ``path`` (``*.safetensors``) and its JSON sidecar; returns ``path``.

    ``extra`` (JSON-serialisable; paths are written as strings) is stored as is,
    e.g. ``{"run_dir": ..., "step": ...}``.
    """
    path = _weights_path(path)
    get_variant(variant)
    if getattr(model, "variant", variant) != variant:
        raise SrcidError(f"export {path}: the model is a {model.variant!r} model, not {variant!r}")
    config.validate()
    shapes = {m: [None if s is None else int(s) for s in shape] for m, shape in input_shapes.items()}
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    data = save(tensors, metadata={"format": "pt", "srcid": FORMAT, "variant": variant})
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "config": to_dict(config),
        "input_shapes": shapes,
        "srcid_version": __version__,
        "weights_sha256": hashlib.sha256(data).hexdigest(),  # of the bytes written, not read back
        "extra": dict(extra or {}),
    }
    write_atomic(path, data)
    write_json_atomic(sidecar_path(path), info, default=str, allow_nan=True)
    return path


def read_sidecar(path) -> dict:
    """The validated JSON sidecar of the weights file ``path``."""
    path = _weights_path(path)
    where = sidecar_path(path)
    if not where.is_file():
        raise SrcidError(f"{where}: missing: the exported model {path.name} needs its JSON sidecar")
    info = read_json_object(where)
    for key in SIDECAR_KEYS:
        if key not in info and key not in OPTIONAL_KEYS:
            raise SrcidError(f"{where}: key {key}: missing")
    unknown = sorted(set(info) - set(SIDECAR_KEYS))
    if unknown:
        raise SrcidError(f"{where}: key {unknown[0]}: unknown (valid keys: {', '.join(SIDECAR_KEYS)})")
    if info["format"] != FORMAT:
        raise SrcidError(f"{where}: key format: {info['format']!r} version {info['format_version']!r}, "
                         f"expected {FORMAT!r} version {FORMAT_VERSION}")
    version = info["format_version"]
    # exactly the integer: Python finds true and 1.0 equal to 1, but neither is a format version
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise SrcidError(f"{where}: key format_version: {json.dumps(version)} is not a supported version "
                         f"(expected the integer {FORMAT_VERSION})")
    if not isinstance(info["extra"], dict):
        raise SrcidError(f"{where}: key extra: must be an object")
    shapes = info["input_shapes"]
    if not isinstance(shapes, dict) or not all(isinstance(s, list) for s in shapes.values()):
        raise SrcidError(f"{where}: key input_shapes: must map each modality to a list of sizes")
    if not isinstance(info["config"], dict):
        raise SrcidError(f"{where}: key config: must be an object")
    return info


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def load_model(path, device="cpu") -> tuple:
    """Rebuild an exported model: ``(model in eval mode on device, sidecar info)``.

    Floating-point tensors stored in another float dtype (e.g. bf16) are cast
    to the dtype the rebuilt model uses. ``info`` is the sidecar's content
    plus ``"path"`` (the weights file).
    """
    path = _weights_path(path)
    if not path.is_file():
        raise SrcidError(f"{path}: no such model file")
    info = read_sidecar(path)
    where = sidecar_path(path)
    try:
        get_variant(info["variant"])
    except SrcidError as exc:
        raise SrcidError(f"{where}: key variant: {exc}") from None
    try:
        config = from_dict(ModelConfig, with_absent_keys(info["config"], ABSENT_MEANS), where="config")
    except SrcidError as exc:
        raise SrcidError(f"{where}: key {exc}") from None
    except (TypeError, AttributeError, ValueError) as exc:
        raise SrcidError(f"{where}: key config: does not describe a model config ({exc})") from None
    try:
        config.validate()
    except SrcidError as exc:
        raise SrcidError(f"{where}: key config: {exc}") from None
    except (TypeError, AttributeError, ValueError) as exc:
        raise SrcidError(f"{where}: key config: does not describe a model config ({exc})") from None
    shapes = {m: tuple(shape) for m, shape in info["input_shapes"].items()}
    try:
        model = build_model(info["variant"], config, shapes)
    except SrcidError as exc:
        raise SrcidError(f"{where}: key input_shapes: {exc}") from None
    expected = info.get("weights_sha256")
    if expected is not None:
        try:
            actual = _sha256(path)
        except OSError as exc:
            raise SrcidError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if actual != expected:
            raise CorruptFileError(
                f"{path}: is corrupt (SHA-256 expected {str(expected)[:12]}, found {actual[:12]}; the expected sum is "
                f"{where.name} key weights_sha256), or the two files come from different exports")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SrcidError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    expected = model.state_dict()
    for key, target in expected.items():
        if key not in tensors:
            raise SrcidError(f"{path}: key {key}: missing (the {info['variant']} model of {where.name} has it)")
        found = tensors[key]
        same_kind = found.dtype == target.dtype or (found.is_floating_point() and target.is_floating_point())
        if found.shape != target.shape or not same_kind:
            raise SrcidError(f"{path}: key {key}: {_describe(found)} does not fit the config of {where.name} "
                             f"(expected {_describe(target)})")
        tensors[key] = found.to(target.dtype)
    for key in tensors:
        if key not in expected:
            raise SrcidError(f"{path}: key {key}: not part of the {info['variant']} model of {where.name}")
    model.load_state_dict(tensors, strict=True)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SrcidError(f"device {device}: CUDA is not available on this machine")
    model.to(device).eval()
    return model, {**info, "path": str(path)}

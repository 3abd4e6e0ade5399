"""Model export (safetensors + JSON sidecar) and loading, without unpickling."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_model import SMALL_SHAPES, random_batch, tiny_model
from srcid import __version__
from srcid.config import to_dict
from srcid.errors import SrcidError
from srcid.model import build_mi_fitter, build_model, model_config
from srcid.model.export import _sha256, export_model, load_model, read_sidecar, sidecar_path
from helpers_training import build_optimizer, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(variant):
    """A tiny model after two training steps, so codebooks and EMA buffers are no longer their initial values."""
    model = tiny_model(variant, SMALL_SHAPES)
    fitter, optimizer = build_mi_fitter(model), build_optimizer(model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        batch = random_batch(SMALL_SHAPES, 8, generator=generator, words=12)  # ragged text, some longer than T = 10
        train_step(model, fitter, optimizer, batch, layer2_weight=1.0)
    return model


def export(model, path, variant=None, **extra):
    return export_model(model, variant=variant or model.variant, config=model.config, input_shapes=SMALL_SHAPES, path=path,
                        extra=extra or {"step": 2})


@pytest.mark.parametrize("variant", ["srcid", "dcid-rvq2", "dcid-fsq"])
def test_round_trip_gives_identical_encodings(tmp_path, variant):
    model = trained(variant)
    path = export(model, tmp_path / "out" / "model.safetensors", run_dir=tmp_path, step=2)
    loaded, info = load_model(path)
    assert not loaded.training
    assert info["variant"] == variant and info["extra"] == {"run_dir": str(tmp_path), "step": 2}
    original = model.state_dict()
    restored = loaded.state_dict()
    assert list(restored) == list(original)
    for key, value in original.items():
        assert torch.equal(restored[key], value), key
    generator = torch.Generator().manual_seed(5)
    batch = random_batch(SMALL_SHAPES, 7, generator=generator, words=12)
    layers = tuple(range(1, len(model.layers) + 1))
    for m in ("audio", "video", "text"):
        mask = batch.masks[m] if m == "text" else None
        a = model.encode(batch.features[m], m, mask=mask, layers=layers)
        b = loaded.encode(batch.features[m], m, mask=mask, layers=layers)
        for ia, ib, qa, qb in zip(a.indices, b.indices, a.quantized, b.quantized):
            assert torch.equal(ia, ib) and torch.equal(qa, qb)


def test_sidecar_describes_the_model(tmp_path):
    model = trained("srcid")
    path = export(model, tmp_path / "model.safetensors", step=7)
    info = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path) == tmp_path / "model.json"
    assert info["variant"] == "srcid" and info["srcid_version"] == __version__
    assert info["config"] == json.loads(json.dumps(to_dict(model.config)))
    assert info["input_shapes"] == {"audio": [10, 6], "video": [10, 5, 5, 4], "text": [None, 7]}
    assert info["extra"] == {"step": 7}
    assert info["weights_sha256"] == _sha256(path)
    tensors = load_file(str(path))
    assert set(tensors) == set(model.state_dict())
    assert any("codebook" in key for key in tensors)
    assert not any("club" in key.lower() for key in tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no temporary files left


def one_line_error(call, *needles):
    with pytest.raises(SrcidError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def rewrite_sidecar(path, change):
    info = json.loads(sidecar_path(path).read_text())
    change(info)
    sidecar_path(path).write_text(json.dumps(info))


def test_missing_files_and_bad_names(tmp_path):
    one_line_error(lambda: load_model(tmp_path / "none.safetensors"), "none.safetensors", "no such model file")
    one_line_error(lambda: load_model(tmp_path / "model.pt"), "model.pt", ".safetensors")
    path = export(tiny_model("srcid", SMALL_SHAPES), tmp_path / "model.safetensors")
    sidecar_path(path).unlink()
    one_line_error(lambda: load_model(path), "model.json", "missing")
    sidecar_path(path).write_text("{not json")
    one_line_error(lambda: load_model(path), "model.json", "not valid JSON")


@pytest.mark.parametrize("change, needles", [
    (lambda info: info.pop("config"), ("model.json", "key config", "missing")),
    (lambda info: info.update(colour="red"), ("model.json", "key colour", "unknown")),
    (lambda info: info.update(variant="dcid-xl"), ("model.json", "key variant", "dcid-xl")),
    (lambda info: info["config"].update(depth=3), ("model.json", "key config", "depth")),
    (lambda info: info["config"].update(hidden=-4), ("model.json", "key config", "hidden")),
    (lambda info: info["input_shapes"].update(audio=[10]), ("model.json", "key input_shapes", "audio")),
    (lambda info: info.update(format="other"), ("model.json", "key format")),
])
def test_sidecar_that_does_not_describe_a_model(tmp_path, change, needles):
    path = export(tiny_model("srcid", SMALL_SHAPES), tmp_path / "model.safetensors")
    rewrite_sidecar(path, change)
    one_line_error(lambda: load_model(path), *needles)


def test_weights_that_do_not_fit_the_config(tmp_path):
    path = export(tiny_model("srcid", SMALL_SHAPES), tmp_path / "model.safetensors")

    # another config (hidden 32 instead of 16): the JSON now promises other shapes than the file holds
    def wider(info):
        info["config"]["hidden"] = 32
        info["config"]["specific"] = 32
    rewrite_sidecar(path, wider)
    one_line_error(lambda: load_model(path), "model.safetensors", "key ", "does not fit the config", "expected")

    # weights of another export
    path = export(tiny_model("srcid", SMALL_SHAPES), tmp_path / "model.safetensors")
    other = export(tiny_model("srcid", SMALL_SHAPES, init_seed=3), tmp_path / "other.safetensors")
    path.write_bytes(other.read_bytes())
    message = one_line_error(lambda: load_model(path), "model.json", "key weights_sha256")
    assert "different exports" in message


def write_tensors(path, tensors):
    save_file(tensors, str(path))
    rewrite_sidecar(path, lambda info: info.update(weights_sha256=_sha256(path)))


def test_missing_extra_and_mistyped_tensors(tmp_path):
    path = export(tiny_model("srcid", SMALL_SHAPES), tmp_path / "model.safetensors")
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("codebook"))

    fewer = {k: v for k, v in tensors.items() if k != key}
    write_tensors(path, fewer)
    one_line_error(lambda: load_model(path), "model.safetensors", f"key {key}", "missing")

    write_tensors(path, {**tensors, "layers.9.weight": torch.zeros(2)})
    one_line_error(lambda: load_model(path), "model.safetensors", "key layers.9.weight", "not part of")

    write_tensors(path, {**tensors, key: tensors[key].double()})  # another float dtype is cast back
    assert torch.equal(dict(load_model(path)[0].state_dict())[key], tensors[key])

    write_tensors(path, {**tensors, key: tensors[key].to(torch.int32)})
    one_line_error(lambda: load_model(path), "model.safetensors", f"key {key}", "int32", "expected float32")

    write_tensors(path, {**tensors, key: tensors[key][:-1]})
    one_line_error(lambda: load_model(path), "model.safetensors", f"key {key}", "does not fit the config")

    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    rewrite_sidecar(path, lambda info: info.update(weights_sha256=_sha256(path)))
    one_line_error(lambda: load_model(path), "model.safetensors", "not a readable safetensors file")


def test_export_rejects_a_mislabelled_model(tmp_path):
    model = tiny_model("dcid", SMALL_SHAPES)
    one_line_error(lambda: export(model, tmp_path / "model.safetensors", variant="srcid"), "dcid", "srcid")
    one_line_error(lambda: export(model, tmp_path / "model.bin"), ".safetensors")
    assert list(tmp_path.iterdir()) == []


def test_read_sidecar_and_device(tmp_path):
    path = export(tiny_model("srcid", SMALL_SHAPES), tmp_path / "model.safetensors", step=3)
    assert read_sidecar(path)["extra"]["step"] == 3
    if not torch.cuda.is_available():
        one_line_error(lambda: load_model(path, device="cuda"), "CUDA")


def test_a_sidecar_saved_before_later_keys_loads_with_the_behaviour_it_had(tmp_path):
    """Keys added to the model config after a model was saved take the value the saving code meant, not today's
    default: a model without ``text_target`` rebuilt the BiLSTM output, so its decoder has the BiLSTM's width."""
    from srcid.model.config import ABSENT_MEANS

    config = model_config("tiny")
    for key, value in ABSENT_MEANS.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    torch.manual_seed(0)
    model = build_model("srcid", config, SMALL_SHAPES)
    model.eval()
    path = export(model, tmp_path / "model.safetensors")

    def forget(info):
        for key in ABSENT_MEANS:
            *parents, leaf = key.split(".")
            node = info["config"]
            for part in parents:
                node = node[part]
            del node[leaf]

    rewrite_sidecar(path, forget)
    assert "text_target" not in json.loads(sidecar_path(path).read_text())["config"]
    loaded, _ = load_model(path)
    assert to_dict(loaded.config) == to_dict(model.config)
    assert loaded.config.text_target == "lstm" and loaded.config.video_specific == "head"
    batch = random_batch(SMALL_SHAPES, 4, seed=3, words=12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).layers[1].quantized["audio"], model(batch).layers[1].quantized["audio"])


def test_round_trip_with_centred_layer2_keeps_the_running_mean(tmp_path):
    config = model_config("tiny")
    config.layer2_center = True
    torch.manual_seed(0)
    model = build_model("srcid", config, SMALL_SHAPES)
    fitter, optimizer = build_mi_fitter(model), build_optimizer(model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        batch = random_batch(SMALL_SHAPES, 8, generator=generator, words=12)
        train_step(model, fitter, optimizer, batch, layer2_weight=1.0)
    model.eval()
    path = export(model, tmp_path / "model.safetensors")
    loaded, _ = load_model(path)
    assert loaded.config.layer2_center and loaded.layers[1].centre.ready.item() == 1.0
    assert torch.equal(loaded.layers[1].centre.running_mean, model.layers[1].centre.running_mean)
    batch = random_batch(SMALL_SHAPES, 4, seed=3, words=12)
    with torch.no_grad():
        assert torch.equal(loaded(batch).layers[1].indices["video"], model(batch).layers[1].indices["video"])

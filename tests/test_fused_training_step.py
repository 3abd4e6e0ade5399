"""A whole training step with the fused kernels equals one with the reference ops.

Twin copies of one freshly built model (and of its CLUB fitter) take the same
steps on the same synthetic batches, one with ``--kernels reference`` and one
with ``--kernels fused`` (Triton's interpreter on a CPU): forward with the
codebook EMA, CLUB fitting, total loss, backward, clipping, Adam. After every
step the code indices must be identical and the loss terms, clipped
gradients, parameters, codebook buffers and CLUB networks must agree to
float32 tolerance.

Adam divides each gradient element by its own running magnitude, so an
element whose gradient is at rounding level (the CPC predictor biases and
the attention key biases, whose exact gradient is zero, and a few small
elements elsewhere) moves by up to ``lr`` in a direction set by rounding.
Such an element is recognised by its two gradients differing by more than
``ELEMENT_NOISE`` of their size (the per-tensor gradient check allows that
only for elements far below their tensor's scale); its parameter may differ
by up to ``2 lr`` per such optimizer step. All other elements get the plain
tolerance. Because those elements then feed the next forward pass, two runs
drift apart from the second step on whatever computes the step (two reference
runs with inputs perturbed by 1e-7 drift the same way), so after each
compared step the fused twin is reset to the reference state (model,
optimizer, CLUB fitter) and the next step starts from identical states.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import srcid.kernels
from srcid import ops
from srcid.data.reader import ShardLoader
from srcid.data.synth import PRESETS, World, write_dataset
from srcid.model import build_mi_fitter, build_model_from_manifest, model_config
from helpers_training import build_optimizer, train_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the kernels run in Triton's interpreter
BATCH = 7  # clips per step: 70 rows per modality, ragged against every kernel tile
STEP_SEED = 1000
FUSED_OPS = ("nearest_code_fused", "ema_update_fused_", "club_loglik_fused")

TERM_RTOL, TERM_ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_GLOBAL_ATOL = 1e-4, 1e-5  # per tensor: |dg| <= rtol * max|g_tensor| + atol * max|g_model|
STATE_RTOL, STATE_ATOL = 1e-5, 1e-6  # parameters and float buffers after a step
ELEMENT_NOISE = 1e-4


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """The manifest and first batches of the tiny synthetic pretraining split (ragged text)."""
    out = tmp_path_factory.mktemp("fused-step")
    write_dataset(World(PRESETS["tiny"], 0), "pretrain", out, progress=False)
    loader = ShardLoader(out / "pretrain", "train", batch_size=BATCH, seed=0)
    epoch = iter(loader.epoch(0))
    return loader.manifest, [next(epoch).to(DEVICE) for _ in range(2)]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach each fused kernel entry point."""
    calls = dict.fromkeys(FUSED_OPS, 0)
    for name in FUSED_OPS:
        original = getattr(srcid.kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(srcid.kernels, name, counted)
    return calls


class GradientRecorder:
    """Keeps a copy of every gradient an optimizer is about to apply (after clipping)."""

    def __init__(self, optimizer, named_params):
        self.named_params = list(named_params)
        self.steps: list = []
        optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        self.steps.append({name: p.grad.detach().clone() for name, p in self.named_params if p.grad is not None})


class Trainee:
    """A model, its CLUB fitter and its optimizer, with recorders on both optimizers and on the forward output."""

    def __init__(self, model, fitter):
        self.model, self.fitter = model, fitter
        self.optimizer = build_optimizer(model)
        self.main_grads = GradientRecorder(self.optimizer, model.named_parameters())
        self.club_grads = GradientRecorder(fitter.optimizer, fitter.estimator.named_parameters())
        self.outputs = []
        model.register_forward_hook(lambda module, args, output: self.outputs.append(output))

    def step(self, impl: str, batch, layer2_weight: float, seed: int) -> "StepRecord":
        """One :func:`train_step` with the ``impl`` kernels; everything it computed and changed."""
        self.main_grads.steps.clear()
        self.club_grads.steps.clear()
        self.outputs.clear()
        ops.set_kernels(impl)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the same dropout masks in both runs
                terms = train_step(self.model, self.fitter, self.optimizer, batch, layer2_weight=layer2_weight)
        finally:
            ops.set_kernels(None)
        (output,) = self.outputs
        return StepRecord(
            terms={key: float(value) for key, value in terms.items()},
            indices=[{m: idx.clone() for m, idx in layer.items()} for layer in output.indices],
            grads=list(self.main_grads.steps),
            club_grads=list(self.club_grads.steps),
            state={key: value.detach().clone() for key, value in self.model.state_dict().items()},
            club_state={key: value.detach().clone() for key, value in self.fitter.estimator.state_dict().items()},
        )

    def copy_state_from(self, other: "Trainee") -> None:
        self.model.load_state_dict(other.model.state_dict())
        self.optimizer.load_state_dict(copy.deepcopy(other.optimizer.state_dict()))
        self.fitter.load_state_dict(copy.deepcopy(other.fitter.state_dict()))


@dataclasses.dataclass
class StepRecord:
    terms: dict  # loss terms as floats
    indices: list  # per layer {modality: indices}
    grads: list  # per optimizer step of the main model: {name: clipped gradient}
    club_grads: list  # per CLUB fitting step: {name: gradient}
    state: dict  # model parameters and buffers after the step
    club_state: dict  # CLUB networks after the step


def check_gradients(what: str, reference: dict, fused: dict) -> dict:
    """Per-tensor gradient agreement; returns each tensor's rounding-level elements."""
    assert reference.keys() == fused.keys(), f"{what}: gradients exist for different parameters"
    global_scale = max(g.abs().max().item() for g in reference.values())
    noisy = {}
    for name, g_ref in reference.items():
        g_fused = fused[name]
        diff = (g_ref - g_fused).abs()
        bound = GRAD_RTOL * g_ref.abs().max().item() + GRAD_GLOBAL_ATOL * global_scale
        assert diff.max().item() <= bound, (
            f"{what}: gradient of {name} differs by {diff.max().item():.3e} (bound {bound:.3e}; "
            f"tensor scale {g_ref.abs().max().item():.3e})"
        )
        noisy[name] = diff > ELEMENT_NOISE * torch.maximum(g_ref.abs(), g_fused.abs())
    return noisy


def adam_slack(noisy_steps: list, lr: float) -> dict:
    """Per element, ``2 lr`` for each optimizer step whose gradient there was at rounding level."""
    slack = {}
    for noisy in noisy_steps:
        for name, mask in noisy.items():
            slack[name] = slack.get(name, 0.0) + 2.0 * lr * mask.to(torch.float32)
    return slack


def check_state(what: str, reference: dict, fused: dict, slack: dict) -> None:
    assert reference.keys() == fused.keys()
    for name, a in reference.items():
        b = fused[name]
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{what}: {name} differs ({a.tolist()} vs {b.tolist()})"
            continue
        diff = (a - b).abs()
        excess = (diff - (STATE_ATOL + STATE_RTOL * a.abs() + slack.get(name, 0.0))).max().item()
        assert excess <= 0.0, f"{what}: {name} differs by up to {diff.max().item():.3e} (over its bound by {excess:.3e})"


def assert_same_step(step: int, ref: StepRecord, fus: StepRecord, lr: float, club_lr: float, club_steps: int) -> None:
    """Everything one step computed and changed agrees; the first difference fails with its name."""
    where = f"step {step}"
    assert len(ref.indices) == len(fus.indices)
    for layer, (idx_ref, idx_fus) in enumerate(zip(ref.indices, fus.indices), start=1):
        assert idx_ref.keys() == idx_fus.keys()
        for m in idx_ref:
            same = idx_ref[m] == idx_fus[m]
            assert bool(same.all()), f"{where}: layer {layer} {m} code indices differ at {int((~same).sum())} of {same.numel()}"
    assert ref.terms.keys() == fus.terms.keys()
    for key, value in ref.terms.items():
        assert math.isclose(fus.terms[key], value, rel_tol=TERM_RTOL, abs_tol=TERM_ATOL), \
            f"{where}: loss term {key}: reference {value!r}, fused {fus.terms[key]!r}"

    assert len(ref.grads) == len(fus.grads) == 1
    noisy = check_gradients(f"{where}, model", ref.grads[0], fus.grads[0])
    check_state(f"{where}, model", ref.state, fus.state, adam_slack([noisy], lr))

    assert len(ref.club_grads) == len(fus.club_grads) == club_steps
    noisy = [check_gradients(f"{where}, CLUB fitting step {i}", g_ref, g_fus)
             for i, (g_ref, g_fus) in enumerate(zip(ref.club_grads, fus.club_grads))]
    check_state(f"{where}, CLUB", ref.club_state, fus.club_state, adam_slack(noisy, club_lr))


def compare_runs(variant: str, manifest, batches, layer2_weights, fused_calls) -> list:
    """Step both twins through ``batches``; compare every step, then reset the fused twin to the reference state."""
    torch.manual_seed(0)
    model = build_model_from_manifest(variant, model_config("tiny"), manifest).to(DEVICE)
    fitter = build_mi_fitter(model)
    twin_model, twin_fitter = copy.deepcopy((model, fitter))
    reference, fused = Trainee(model, fitter), Trainee(twin_model, twin_fitter)
    initial = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith(".codebook")}
    lr, club_lr = reference.optimizer.param_groups[0]["lr"], fitter.optimizer.param_groups[0]["lr"]
    records = []
    for k, (batch, weight) in enumerate(zip(batches, layer2_weights)):
        before = dict(fused_calls)
        ref = reference.step("reference", batch, weight, STEP_SEED + k)
        assert fused_calls == before, f"step {k}: the reference step reached fused kernels: {fused_calls}"
        fus = fused.step("fused", batch, weight, STEP_SEED + k)
        assert all(fused_calls[name] > before[name] for name in FUSED_OPS), f"step {k}: the fused step skipped a kernel"
        assert_same_step(k, ref, fus, lr, club_lr, fitter.steps)
        fused.copy_state_from(reference)
        records.append(ref)
    assert initial and all(not torch.equal(buf, model.get_buffer(name)) for name, buf in initial.items()), \
        "a codebook was never updated"
    return records


def test_srcid_steps_fused_equal_reference(batches, fused_calls, one_thread):
    manifest, data = batches
    # layer 2 off (as in the warm-start stage), then on
    records = compare_runs("srcid", manifest, data, (0.0, 1.0), fused_calls)
    assert len(records) == 2 and all(len(r.indices) == 2 for r in records)
    assert "L2/mi" in records[0].terms and not any(name.startswith("layers.1.") for name in records[0].grads[0])
    assert any(name.startswith("layers.1.") for name in records[1].grads[0])


def test_rvq_step_fused_equals_reference(batches, fused_calls, one_thread):
    manifest, data = batches
    (record,) = compare_runs("dcid-rvq2", manifest, data[:1], (1.0,), fused_calls)
    assert all(idx.shape == (BATCH, 10, 2) for idx in record.indices[0].values())

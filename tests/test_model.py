"""The res25 network, its checkpoint format, calibration, runtime helpers and attention map.

Everything here uses the reduced model (widths 8-16-32-64) on a 25 x 32 x 32 grid so the file
runs in a few seconds on 2 shared cores; the full-size network is exercised by
``tests/test_fidelity.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.attention import (
    attention_from_features,
    attention_map,
    combine,
    grad_cam,
    hot_region_outline,
    peak,
    to_image_coordinates,
)
from inference.model import (
    Calibration,
    CheckpointError,
    ModelCard,
    Res25,
    Res25Config,
    demonstration_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
    weights_sha256,
)
from inference.model.res25 import seeded_init_, slice_by_slice_forward
from inference.model.runtime import autocast, fold_batch_norm, prepare, run, select_device

GRID = (25, 32, 32)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _model(variant: str = "nonlocal", seed: int = 0) -> Res25:
    return seeded_init_(Res25(config=Res25Config.reduced(variant)), seed).eval()  # type: ignore[arg-type]


def _volumes(batch: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, *GRID, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["nonlocal", "plain"])
def test_output_shapes_and_softmax_weights(variant: str) -> None:
    model = _model(variant)
    with torch.inference_mode():
        out = model(_volumes(), return_features=True)
    assert out.logits.shape == (2, 1)
    assert out.aux_logits.shape == (2, 5)
    assert out.slice_scores.shape == (2, 25)
    assert torch.allclose(out.slice_weights, torch.softmax(out.slice_scores, dim=1))
    assert torch.allclose(out.slice_weights.sum(dim=1), torch.ones(2))
    assert out.features is not None and out.features.shape == (2, 25, 64, 1, 1)
    assert model.variant == variant
    has_nonlocal = any(name.endswith(".g.weight") for name in model.state_dict())
    assert has_nonlocal == (variant == "nonlocal")


def test_layer3_layout_matches_the_original() -> None:
    full = Res25("nonlocal")
    names = [type(m).__name__ for m in full.layer3]
    assert names == ["BasicBlock"] * 5 + ["NonLocalBlock2d", "BasicBlock"]
    assert [type(m).__name__ for m in Res25("plain").layer3] == ["BasicBlock"] * 6


def test_batched_forward_equals_slice_by_slice_original_order() -> None:
    model = _model()
    volumes = _volumes()
    with torch.inference_mode():
        batched = model(volumes)
        looped = slice_by_slice_forward(model, volumes)
    for name in ("logits", "slice_weights"):
        torch.testing.assert_close(getattr(batched, name), getattr(looped, name), rtol=1e-5, atol=1e-6)
    for name in ("aux_logits", "slice_scores"):  # large values: relative tolerance
        torch.testing.assert_close(getattr(batched, name), getattr(looped, name), rtol=1e-4, atol=1e-5)


def test_eval_is_bit_for_bit_deterministic_and_dropout_off() -> None:
    volumes = _volumes()
    first, second = _model(), _model()  # two builds from the same seed
    with torch.inference_mode():
        a = first(volumes)
        b = first(volumes)
        c = second(volumes)
    for name in ("logits", "aux_logits", "slice_weights"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert torch.equal(getattr(a, name), getattr(c, name))
    # Dropout exists and is active in training only: batch norm frozen, two passes differ.
    trained = _model()
    trained.train()
    for module in trained.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        d = trained(volumes)
        e = trained(volumes)
    assert not torch.equal(d.slice_scores, e.slice_scores)
    trained.eval()
    with torch.inference_mode():
        assert torch.equal(trained(volumes).logits, a.logits)


def test_cases_in_a_batch_are_independent() -> None:
    model = _model()
    volumes = _volumes(batch=3)
    with torch.inference_mode():
        together = model(volumes)
        alone = model(volumes[1:2])
    torch.testing.assert_close(together.logits[1:2], alone.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.slice_weights[1:2], alone.slice_weights, rtol=1e-5, atol=1e-7)


def test_each_aux_head_reads_its_own_group() -> None:
    model = _model()
    volumes = _volumes()
    with torch.inference_mode():
        before = model(volumes).aux_logits
        model.group_heads[3].bias.add_(1.0)
        after = model(volumes).aux_logits
    changed = (after - before).abs().amax(dim=0) > 0
    assert changed.tolist() == [False, False, False, True, False]
    torch.testing.assert_close(after[:, 3] - before[:, 3], torch.ones(2))
    # Perturbing slices of group 1 only moves aux head 1 (groups do not see each other).
    moved = volumes.clone()
    moved[:, :, 5:10] += 1.0
    with torch.inference_mode():
        aux_moved = model(moved).aux_logits
    changed = (aux_moved - after).abs().amax(dim=0) > 1e-6
    assert changed.tolist() == [False, True, False, False, False]


def test_bad_inputs_and_configs_raise_naming_the_value() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"got 2 x 25"):
        model(torch.zeros(1, 2, 25, 32, 32))
    with pytest.raises(ValueError, match="expected"):
        model(torch.zeros(3, 25, 32, 32))
    with pytest.raises(ValueError, match="multiple of group_size"):
        Res25Config(n_slices=24)
    with pytest.raises(ValueError, match="variant"):
        Res25Config(variant="cbam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_heads"):
        Res25Config(num_heads=3)
    with pytest.raises(ValueError, match="unknown Res25Config fields: depth"):
        Res25Config.from_dict({"depth": 50})
    config = Res25Config.reduced("plain", n_slices=10, group_size=5, in_channels=2)
    assert Res25Config.from_dict(config.to_dict()) == config
    small = Res25(config=config).eval()
    with torch.inference_mode():
        out = small(torch.zeros(1, 2, 10, 32, 32))
    assert out.aux_logits.shape == (1, 2) and out.slice_weights.shape == (1, 10)


# ------------------------------------------------------------------------- checkpoint format


def _card(model: Res25, **fields: object) -> ModelCard:
    values: dict[str, object] = {
        "name": "res25-test",
        "version": "1.2.0",
        "architecture": model.config,
        "grid": GRID,
        "recipe": {"name": "default", "version": 1, "channels": ["ncct", "cta", "ncct_stroke"]},
        "precision": "bf16",
        "threshold": 0.42,
        "calibration": Calibration("platt", {"a": 1.5, "b": -0.25}),
        "training": {"cases": 120, "folds": 5, "auc_mean": 0.81},
    }
    values.update(fields)
    return ModelCard(**values)  # type: ignore[arg-type]


def test_node_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model("plain")
    path = tmp_path / "model.pt"
    written = save_checkpoint(path, model, _card(model))
    assert written.weights_sha256 == weights_sha256(model.state_dict())
    # Plain types only: the file loads with weights_only=True.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "fpe-node/res25" and raw["card"]["variant"] == "plain"
    loaded = load_checkpoint(path)
    assert loaded.source == "node" and not loaded.model.training
    assert loaded.card == written
    assert loaded.card.recipe == {"name": "default", "version": 1, "channels": ["ncct", "cta", "ncct_stroke"]}
    info = loaded.card.model_info()
    assert (info.name, info.version, info.variant, info.precision) == ("res25-test", "1.2.0", "plain", "bf16")
    assert info.calibrated and info.threshold == 0.42 and not info.demonstration and info.recipe_from_checkpoint
    volumes = _volumes()
    with torch.inference_mode():
        assert torch.equal(loaded.model(volumes).logits, model(volumes).logits)


def test_node_checkpoint_tampered_weights_or_keys_are_refused(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, _card(model))
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["slice_mix.bias"] += 1.0
    torch.save(raw, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path / "tampered.pt")
    raw = torch.load(path, weights_only=True)
    del raw["state_dict"]["layer3.1.g.weight"]
    raw["state_dict"]["extra.weight"] = torch.zeros(1)
    raw["card"]["weights_sha256"] = weights_sha256(raw["state_dict"])
    torch.save(raw, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: layer3\.1\.g\.weight.*unexpected keys: extra\.weight"):
        load_checkpoint(tmp_path / "keys.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_model_card_validation_names_the_field() -> None:
    model = _model()
    with pytest.raises(ValueError, match="precision"):
        _card(model, precision="int8")
    with pytest.raises(ValueError, match="threshold"):
        _card(model, threshold=1.5)
    with pytest.raises(ValueError, match="grid slices 20"):
        _card(model, grid=(20, 32, 32))
    with pytest.raises(ValueError, match="recipe"):
        _card(model, recipe={"bad": object()})
    with pytest.raises(ValueError, match="unknown model card fields: colour"):
        ModelCard.from_dict({**_card(model).to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="variant"):
        ModelCard.from_dict({**_card(model).to_dict(), "variant": "plain"})
    with pytest.raises(ValueError, match="architecture"):
        save_checkpoint(Path("unused.pt"), _model("plain"), _card(model))


def test_calibration_maps_logits_and_validates() -> None:
    assert Calibration().apply(0.0) == 0.5 and not Calibration().calibrated
    assert math.isclose(Calibration("temperature", {"temperature": 2.0}).apply(2.0), 1 / (1 + math.exp(-1)))
    platt = Calibration.from_dict({"method": "platt", "params": {"a": 2.0, "b": 1.0}})
    assert math.isclose(platt.apply(-0.5), 0.5) and platt.calibrated
    assert Calibration().apply(-1000.0) == 0.0 and Calibration().apply(1000.0) == 1.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Calibration("temperature", {"temperature": 0.0})
    with pytest.raises(ValueError, match=r"needs params \['a', 'b'\]"):
        Calibration("platt", {"a": 1.0})


def test_demonstration_weights_are_deterministic_and_flagged() -> None:
    config = Res25Config.reduced()
    first, second = demonstration_model(config), demonstration_model(config)
    assert first.card.demonstration and first.card.model_info().demonstration
    assert first.card.weights_sha256 == second.card.weights_sha256
    assert demonstration_model(config, seed=1).card.weights_sha256 != first.card.weights_sha256
    assert "untrained demonstration weights" in first.notes
    assert load_model(None, config).card.weights_sha256 == first.card.weights_sha256
    volumes = _volumes(batch=1)
    with torch.inference_mode():
        assert torch.equal(first.model(volumes).logits, second.model(volumes).logits)


def test_runtime_helpers_on_cpu() -> None:
    device = select_device("cpu")
    assert device.type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    model = prepare(_model(), device, channels_last=True)
    volumes = _volumes()
    fp32 = run(model, volumes, device)
    again = run(model, volumes, device)
    assert torch.equal(fp32.logits, again.logits) and fp32.logits.dtype == torch.float32
    bf16 = run(model, volumes, device, "bf16")
    assert bf16.logits.dtype == torch.float32
    torch.testing.assert_close(bf16.slice_weights, fp32.slice_weights, atol=0.05, rtol=0.2)
    with pytest.raises(ValueError, match="precision"):
        autocast(device, "fp8")
    with pytest.raises(RuntimeError, match="eval"):
        run(model.train(), volumes, device)


def test_folded_batch_norm_computes_the_same_function() -> None:
    model = _model("plain")
    with torch.no_grad():  # non-trivial running statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
                module.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(4))
    folded = fold_batch_norm(prepare(model, torch.device("cpu")))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    volumes = _volumes()
    with torch.inference_mode():
        expected, got = model(volumes), folded(volumes)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.aux_logits, expected.aux_logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- attention map


def test_grad_cam_matches_full_graph_autograd() -> None:
    model = _model()
    volumes = _volumes(batch=1)
    out, cam = grad_cam(model, volumes, target_sign=1.0)
    # Independent computation: the whole graph with the layer4 maps retained.
    maps = model.trunk(model.slice_images(volumes))
    maps.retain_grad()
    model.head(maps, 1).logits.sum().backward()
    assert maps.grad is not None
    expected = torch.relu((maps.grad.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1)).reshape(1, 25, *maps.shape[2:])
    torch.testing.assert_close(cam, expected.detach(), rtol=1e-4, atol=1e-6)
    assert cam.shape == (1, 25, 1, 1)
    model.zero_grad(set_to_none=True)


def test_attention_map_on_the_model_grid_and_under_inference_mode() -> None:
    model = _model()
    volumes = _volumes(batch=1)
    with torch.inference_mode():  # works even when the caller is in inference mode
        out, amap = attention_map(model, volumes)
        reference = model(volumes)
    torch.testing.assert_close(out.logits, reference.logits)
    assert amap.heat.shape == GRID and amap.heat.dtype == np.float32
    assert float(amap.heat.min()) >= 0.0 and math.isclose(float(amap.heat.max()), 1.0)
    np.testing.assert_allclose(amap.slice_weights, reference.slice_weights[0].numpy(), rtol=1e-6)
    assert amap.target_sign == (1.0 if float(out.logits) >= 0 else -1.0)
    hot = peak(amap.heat)
    assert math.isclose(hot.value, 1.0)
    assert hot.outline[0] == hot.outline[-1] and len(hot.outline) >= 5
    with pytest.raises(ValueError, match="one case"):
        attention_map(model, _volumes(batch=2))


def test_attention_from_one_forward_equals_attention_map() -> None:
    """The predictor's path: run() returns the layer4 maps, only the head is differentiated."""
    model = prepare(_model(), torch.device("cpu"))
    volumes = _volumes(batch=1)
    output = run(model, volumes, torch.device("cpu"), return_features=True)
    assert output.features is not None and output.features.shape[:2] == (1, GRID[0])
    for sign in (1.0, -1.0):
        head_out, from_features = attention_from_features(model, output.features, GRID[1:], target_sign=sign)
        _, reference = attention_map(model, volumes, target_sign=sign)
        assert from_features.target_sign == sign
        np.testing.assert_array_equal(from_features.cam, reference.cam)
        np.testing.assert_array_equal(from_features.heat, reference.heat)
        torch.testing.assert_close(head_out.logits, output.logits)
    with pytest.raises(ValueError, match="one case"):
        attention_from_features(model, torch.zeros(2, *output.features.shape[1:]), GRID[1:])


def test_combine_weights_slices_and_falls_back_without_cam() -> None:
    weights = np.array([0.1, 0.6, 0.3], dtype=np.float32)
    cam = np.zeros((3, 2, 2), dtype=np.float32)
    cam[:, 0, 0] = 1.0
    heat = combine(weights, cam, (4, 4))
    assert heat.shape == (3, 4, 4) and math.isclose(float(heat.max()), 1.0)
    assert np.unravel_index(int(np.argmax(heat)), heat.shape) == (1, 0, 0)
    assert math.isclose(float(heat[2].max()), 0.5, rel_tol=1e-6)
    flat = combine(weights, np.zeros((3, 2, 2)), (4, 4))
    np.testing.assert_allclose(flat[:, 0, 0], weights / weights.max(), rtol=1e-6)
    assert float(flat[1].min()) == 1.0


def test_peak_outline_surrounds_the_hot_region() -> None:
    heat = np.zeros((3, 8, 10), dtype=np.float32)
    heat[1, 2:5, 3:6] = 0.8  # 3x3 block ...
    heat[1, 3, 4] = 1.0  # ... with its maximum in the middle
    heat[1, 6, 8] = 0.7  # a separate spot: not part of the region
    heat[2, 0, 0] = 0.9
    hot = peak(heat)
    assert (hot.slice_index, hot.row, hot.column, hot.value) == (1, 3, 4, 1.0)
    assert hot.outline == ((1.5, 2.5), (1.5, 5.5), (4.5, 5.5), (4.5, 2.5), (1.5, 2.5))
    assert to_image_coordinates(hot.outline)[0] == (3.0, 2.0)


def test_outline_is_simple_at_diagonal_touches_and_for_single_pixels() -> None:
    ring = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float32)
    outline = hot_region_outline(ring, 0, 1)
    assert outline == ((-0.5, 0.5), (-0.5, 2.5), (2.5, 2.5), (2.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))
    assert len(set(outline[:-1])) == len(outline) - 1  # no vertex visited twice
    single = np.zeros((4, 4), dtype=np.float32)
    single[0, 0] = 1.0
    assert hot_region_outline(single, 0, 0) == ((-0.5, -0.5), (-0.5, 0.5), (0.5, 0.5), (0.5, -0.5), (-0.5, -0.5))

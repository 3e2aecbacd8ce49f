"""Fidelity to the published res25 network, through the original-checkpoint loader.

``../shared/reference/res25_reference.json`` (see its README) lists every key of the original's
``state_dict()`` and the outputs of the original code for seeded weights and a seeded input.
These tests rebuild those weights exactly as the README says, write them as checkpoints of the
original code (bare, ``module.``-prefixed, ``{"state_dict": ...}``), load them through
``inference.model.checkpoint`` and reproduce the outputs within the README's tolerances, for
both variants. The fixture is required: a missing file fails the tests.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.model import CheckpointError, load_checkpoint, load_original_state_dict, save_checkpoint
from inference.model.checkpoint import detect_variant

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "res25_reference.json"
_ALIAS_PREFIXES = (
    (re.compile(r"^shared_features\.0\."), "conv1."),
    (re.compile(r"^shared_features\.1\."), "bn1."),
    (re.compile(r"^shared_features\.4\."), "layer1."),
    (re.compile(r"^ind_features\.\d+\.0\."), "layer2."),
    (re.compile(r"^ind_features\.\d+\.1\."), "layer3."),
    (re.compile(r"^ind_features\.\d+\.2\."), "layer4."),
)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    with REFERENCE.open() as handle:  # FileNotFoundError fails the test: the fixture is required
        data: dict[str, Any] = json.load(handle)
    return data


@pytest.fixture(scope="module")
def states(reference: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Original-style state dicts per variant, built once per module (read-only for the tests)."""
    return {variant: original_state_dict(reference[variant]) for variant in ("nonlocal", "plain")}


def _readme_tensor(name: str, shape: list[int]) -> torch.Tensor:
    """One tensor as the fixture README defines it."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=gen)
    if len(shape) == 1 and name.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1:
        return 0.1 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


def original_state_dict(entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The original's full ``state_dict()``: every key, aliases sharing their canonical tensor."""
    shapes = {key: shape for key, shape in entry["state_dict"]}
    canonical = {name: _readme_tensor(name, shapes[name]) for name in entry["canonical_keys"]}
    state: dict[str, torch.Tensor] = {}
    for key, _shape in entry["state_dict"]:
        target = key
        for pattern, prefix in _ALIAS_PREFIXES:
            if pattern.match(key):
                target = pattern.sub(prefix, key, count=1)
                break
        state[key] = canonical[target]
    assert list(state) == [key for key, _ in entry["state_dict"]]
    return state


def reference_input() -> torch.Tensor:
    return torch.randn(2, 3, 25, 224, 224, generator=torch.Generator().manual_seed(2024))


@pytest.mark.parametrize("variant", ["nonlocal", "plain"])
def test_original_checkpoints_reproduce_the_reference_outputs(
    variant: str, reference: dict[str, Any], states: dict[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    torch.set_num_threads(2)
    entry = reference[variant]
    state = states[variant]
    styles = {
        "bare": state,
        "dataparallel": {f"module.{key}": tensor for key, tensor in state.items()},
        "wrapped": {"state_dict": state, "epoch": 30},
    }
    loaded = {}
    for style, payload in styles.items():
        path = tmp_path / f"{style}.pth"
        torch.save(payload, path)
        loaded[style] = load_checkpoint(path)

    first = loaded["bare"]
    for style, result in loaded.items():
        assert result.source == "original" and result.card.variant == variant, style
        assert result.card.weights_sha256 == first.card.weights_sha256, style
        assert not result.card.recipe_from_checkpoint and not result.card.model_info().recipe_from_checkpoint
        assert any("default recipe applied" in note for note in result.notes)
        assert any("attn_2, attn_3, attn_4, attn_5, fc" in note for note in result.notes)
        for key, tensor in result.model.state_dict().items():
            assert torch.equal(tensor, first.model.state_dict()[key]), (style, key)
    assert any("module." in note for note in loaded["dataparallel"].notes)
    assert any("epoch" in note for note in loaded["wrapped"].notes)
    n_params = sum(t.numel() for key, t in state.items() if not key.startswith(("shared_features", "ind_features"))
                   and not key.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_params == entry["n_params"]

    with torch.inference_mode():
        out = first.model(reference_input())
    torch.testing.assert_close(out.logits, torch.tensor(entry["logits"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.slice_weights, torch.tensor(entry["slice_weights"]), rtol=0, atol=1e-4)
    aux = torch.tensor(entry["aux_logits"])[..., 0].T  # 5 x (2x1) -> (2, 5)
    torch.testing.assert_close(out.aux_logits, aux, rtol=1e-3, atol=1e-5)

    # Re-saved in the node's format it keeps its identity and says it has no recipe.
    resaved = save_checkpoint(tmp_path / "node.pt", first.model, first.card)
    again = load_checkpoint(tmp_path / "node.pt")
    assert again.source == "node" and again.card.weights_sha256 == resaved.weights_sha256 == first.card.weights_sha256
    assert not again.card.recipe_from_checkpoint


def test_variant_is_detected_from_the_keys(reference: dict[str, Any]) -> None:
    assert detect_variant(key for key, _ in reference["nonlocal"]["state_dict"]) == "nonlocal"
    assert detect_variant(key for key, _ in reference["plain"]["state_dict"]) == "plain"
    assert "layer3.5.g.weight" in {key for key, _ in reference["nonlocal"]["state_dict"]}


def test_missing_unexpected_and_inconsistent_keys_are_named(states: dict[str, dict[str, torch.Tensor]]) -> None:
    state = states["plain"]

    missing = {k: v for k, v in state.items() if not re.search(r"(^|\.)(layer2\.1\.conv1\.weight|0\.1\.conv1\.weight)$", k)}
    missing = {k: v for k, v in missing.items() if k != "fc_0_2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: fc_0_2\.bias, layer2\.1\.conv1\.weight"):
        load_original_state_dict(missing)

    unexpected = dict(state, **{"layer5.0.conv1.weight": torch.zeros(1), "cbam.fc.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: cbam\.fc\.weight, layer5\.0\.conv1\.weight"):
        load_original_state_dict(unexpected)

    reshaped = dict(state, **{"classifier.1.weight": torch.zeros(1, 24)})
    with pytest.raises(CheckpointError, match=r"classifier\.1\.weight \(1, 24\) != \(1, 25\)"):
        load_original_state_dict(reshaped)

    disagreeing = dict(state)
    disagreeing["ind_features.3.1.0.conv1.weight"] = state["layer3.0.conv1.weight"] + 1
    with pytest.raises(CheckpointError, match=r"ind_features\.3\.1\.0\.conv1\.weight != layer3\.0\.conv1\.weight"):
        load_original_state_dict(disagreeing)

    with pytest.raises(CheckpointError, match="not tensors: epoch"):
        load_original_state_dict(dict(state, epoch=3))

    # A nonlocal checkpoint without its non-local block reads as plain and fails on the extra block.
    nonlocal_state = states["nonlocal"]
    no_block = {k: v for k, v in nonlocal_state.items()
                if not re.match(r"(layer3|ind_features\.\d\.1)\.5\.(g|theta|phi)\.", k)}
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*layer3\.5\.W_z\.0\.weight.*layer3\.6\.conv1\.weight"):
        load_original_state_dict(no_block)

"""ArchSpec presets, JSON round-trip, model shapes, decode, state-dict keys and size figures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from yolofps.model import ArchSpec, build_model, model_info, preset
from yolofps.model.spec import DEFAULT_ANCHORS, LayerSpec

# unfused parameter counts printed by ultralytics/yolov5 v6+ for the 80-class models
OFFICIAL_PARAMS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557, "l": 46_563_709, "x": 86_749_405}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["n", "s", "m", "tiny"])
def test_preset_output_shapes(name):
    torch.manual_seed(0)
    num_classes = 5
    model = build_model(preset(name, num_classes))
    images = torch.randn(2, 3, 64, 64)
    raw = model.train()(images)
    assert [tuple(r.shape) for r in raw] == [(2, 3, s, s, 5 + num_classes) for s in (8, 4, 2)]
    with torch.no_grad():
        decoded = model.eval()(images)
    assert decoded.shape == (2, 3 * (8 * 8 + 4 * 4 + 2 * 2), 5 + num_classes)
    assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("name", ["l", "x"])
def test_large_presets_parameter_count(name):
    assert num_params(build_model(preset(name, 80))) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize(("name", "gflops"), [("n", 4.5), ("s", 16.5)])
def test_official_size_figures(name, gflops):
    info = model_info(build_model(preset(f"yolov5{name}", 80)), 640)
    assert info["params"] == pytest.approx(OFFICIAL_PARAMS[name], rel=0.01)
    assert info["gflops"] == pytest.approx(gflops, rel=0.01)


def test_eval_decode_matches_yolov5_formula_on_non_square_input():
    torch.manual_seed(0)
    model = build_model(preset("tiny", 2)).eval()
    detect = model.detect
    features = [torch.randn(1, c.in_channels, h, w) for c, (h, w) in zip(detect.m, [(12, 8), (6, 4), (3, 2)])]
    raw = detect.train()(features)
    with torch.no_grad():
        decoded = detect.eval()(features)
    level, anchor, row, col = 1, 2, 5, 3
    y = raw[level][0, anchor, row, col].sigmoid()
    stride = 16
    expected_xy = (y[:2] * 2 - 0.5 + torch.tensor([col, row])) * stride
    expected_wh = (y[2:4] * 2) ** 2 * torch.tensor(DEFAULT_ANCHORS[level][2 * anchor : 2 * anchor + 2])
    flat = 3 * 12 * 8 + (anchor * 6 + row) * 4 + col  # level-major, then anchor, row, column
    torch.testing.assert_close(decoded[0, flat], torch.cat((expected_xy, expected_wh, y[4:])))
    assert model(torch.zeros(1, 3, 96, 64)).shape == (1, 3 * (12 * 8 + 6 * 4 + 3 * 2), 7)


def test_decode_follows_loaded_anchors_and_survives_inference_mode():
    torch.manual_seed(0)
    model = build_model(preset("tiny", 2)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = model(images)
    state = model.state_dict()
    state["model.24.anchors"] = state["model.24.anchors"] * 2
    model.load_state_dict(state)
    after = model(images)  # outside inference mode, with autograd on: cached grids must still be usable
    torch.testing.assert_close(after[..., 2:4], before[..., 2:4] * 2)
    torch.testing.assert_close(after[..., :2], before[..., :2])


def test_state_dict_uses_official_key_names():
    model = build_model(preset("s", 80))
    keys = set(model.state_dict())
    for key in ["model.0.conv.weight", "model.0.bn.running_var", "model.2.m.0.cv1.conv.weight",
                "model.9.cv2.conv.weight", "model.23.cv3.bn.bias", "model.24.anchors",
                "model.24.m.0.weight", "model.24.m.2.bias"]:  # fmt: skip
        assert key in keys, key
    assert not any("stride" in key or "grid" in key for key in keys)
    assert model.state_dict()["model.24.m.0.weight"].shape == (255, 128, 1, 1)
    # upstream stores anchors divided by their stride
    expected = torch.tensor(DEFAULT_ANCHORS).view(3, 3, 2) / torch.tensor([8.0, 16.0, 32.0]).view(3, 1, 1)
    torch.testing.assert_close(model.state_dict()["model.24.anchors"], expected)


def test_detect_bias_prior_gives_low_objectness():
    model = build_model(preset("tiny", 80)).eval()
    with torch.no_grad():
        pred = model(torch.zeros(1, 3, 64, 64))
    assert pred[..., 4].max() < 0.1  # log(8 / (640/s)^2) prior: few objects per image
    assert pred[..., 5:].mean() < 0.05  # log(0.6 / (nc - 0.99)) prior


def test_preset_widths_follow_make_divisible():
    spec = preset("n", 80)
    assert [layer.out_channels for layer in spec.layers[:10]] == [16, 32, 32, 64, 64, 128, 128, 256, 256, 256]
    assert [spec.layers[i].repeats for i in (2, 4, 6, 8, 13, 17, 20, 23)] == [1, 2, 3, 1, 1, 1, 1, 1]
    assert [preset("x", 80).layers[i].repeats for i in (2, 4, 6)] == [4, 8, 12]
    assert spec.layers[2].hidden_channels == 16 and spec.layers[9].hidden_channels == 128


@pytest.mark.parametrize("name", ["n", "s", "m", "l", "x", "tiny"])
def test_spec_json_round_trip(name, tmp_path):
    spec = preset(name, 7)
    path = tmp_path / "arch.json"
    spec.to_json(path)
    assert ArchSpec.from_json(path) == spec
    assert ArchSpec.from_dict(spec.to_dict()) == spec


def test_pruned_spec_builds_and_round_trips(tmp_path):
    spec = preset("tiny", 3)
    layers = list(spec.layers)
    layers[4] = dataclasses.replace(layers[4], hidden_channels=12, bypass_channels=5, bottleneck_channels=(3, 7))
    layers[9] = dataclasses.replace(layers[9], hidden_channels=9)
    layers[17] = dataclasses.replace(layers[17], out_channels=20)
    pruned = dataclasses.replace(spec, name="tiny-pruned", layers=tuple(layers))
    pruned.to_json(tmp_path / "arch.json")
    assert ArchSpec.from_json(tmp_path / "arch.json") == pruned
    model = build_model(pruned)
    assert model.model[4].m[1].cv1.conv.out_channels == 7
    assert model.model[24].m[0].in_channels == 20
    assert len(model.train()(torch.zeros(1, 3, 64, 64))) == 3


def test_from_dict_rejects_bad_input():
    data = preset("tiny", 3).to_dict()
    with pytest.raises(ValueError, match="unknown keys.*depth"):
        ArchSpec.from_dict({**data, "depth": 0.33})
    with pytest.raises(ValueError, match="missing keys.*anchors"):
        ArchSpec.from_dict({k: v for k, v in data.items() if k != "anchors"})
    bad_layer = [dict(layer) for layer in data["layers"]]
    bad_layer[0]["hidden_channels"] = 4
    with pytest.raises(ValueError, match=r"layers\[0\].*unknown keys"):
        ArchSpec.from_dict({**data, "layers": bad_layer})
    with pytest.raises(ValueError, match="integer"):
        ArchSpec.from_dict({**data, "num_classes": 3.5})
    with pytest.raises(ValueError, match="topology"):
        ArchSpec.from_dict({**data, "layers": data["layers"][:-1]})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("q", 3)
    with pytest.raises(ValueError, match="non-positive"):
        dataclasses.replace(preset("tiny", 3), layers=(LayerSpec("Conv", 0), *preset("tiny", 3).layers[1:]))


def test_activation_is_part_of_the_spec():
    relu = dataclasses.replace(preset("tiny", 3), activation="relu")
    assert ArchSpec.from_dict(relu.to_dict()) == relu
    model = build_model(relu)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.ReLU in kinds and torch.nn.SiLU not in kinds
    assert set(build_model(relu).state_dict()) == set(build_model(preset("tiny", 3)).state_dict())
    written_before = {k: v for k, v in preset("tiny", 3).to_dict().items() if k != "activation"}
    assert ArchSpec.from_dict(written_before).activation == "silu"  # arch.json files from earlier runs still load
    with pytest.raises(ValueError, match="activation must be one of"):
        dataclasses.replace(preset("tiny", 3), activation="gelu")
    with pytest.raises(ValueError, match="expected a mapping"):  # a corrupt arch.json stays a named error
        ArchSpec.from_dict([written_before])

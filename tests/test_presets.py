"""The released configurations: sizes, shapes and heads as computed from the original modules."""

import dataclasses
import json

import pytest

from admkit.cli import main
from admkit.compat import model_and_diffusion_defaults
from admkit.errors import UserError
from admkit.presets import (
    build_model,
    find_matching_preset,
    get_preset,
    list_presets,
    matching_presets,
    preset_shapes,
)

# reference/guided-diffusion.md §2.3: parameters, state-dict keys, input and output blocks
SIZES = {
    "imagenet64": (295_904_454, 541, 16, 16),
    "imagenet128": (421_529_606, 493, 15, 15),
    "imagenet256": (553_838_086, 567, 18, 18),
    "imagenet256-uncond": (552_814_086, 566, 18, 18),
    "imagenet512": (558_997_638, 645, 21, 21),
    "upsampler-64-256": (311_795_910, 567, 18, 18),
    "upsampler-128-512": (308_835_270, 537, 18, 18),
    "lsun-bedroom": (552_814_086, 566, 18, 18),
    "lsun-cat": (552_814_086, 566, 18, 18),
    "lsun-horse": (552_814_086, 566, 18, 18),
    "lsun-horse-nodropout": (552_814_086, 566, 18, 18),
    "classifier64": (65_438_568, 307, None, None),
    "classifier128": (42_568_040, 221, None, None),
    "classifier256": (54_096_360, 249, None, None),
    "classifier512": (54_448_360, 281, None, None),
}

# reference §3.4 and §3.15: spot-checked shapes
SHAPES = {
    "imagenet64": {
        "time_embed.0.weight": (768, 192),
        "time_embed.2.weight": (768, 768),
        "label_emb.weight": (1000, 768),
        "input_blocks.0.0.weight": (192, 3, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (384, 768),
        "middle_block.1.qkv.weight": (2304, 768, 1),
        "output_blocks.0.0.in_layers.0.weight": (1536,),
        "output_blocks.0.0.skip_connection.weight": (768, 1536, 1, 1),
        "out.2.weight": (6, 192, 3, 3),
    },
    "imagenet512": {"input_blocks.0.0.weight": (128, 3, 3, 3), "out.2.weight": (6, 128, 3, 3)},
    "upsampler-64-256": {"input_blocks.0.0.weight": (192, 6, 3, 3)},
    "upsampler-128-512": {"input_blocks.0.0.weight": (192, 6, 3, 3)},
    "classifier128": {
        "out.0.weight": (512,),
        "out.2.positional_embedding": (512, 65),
        "out.2.qkv_proj.weight": (1536, 512, 1),
        "out.2.c_proj.weight": (1000, 512, 1),
    },
}


@pytest.mark.parametrize("name", list(SIZES))
def test_every_preset_has_the_released_size(name):
    model = build_model(name, device="meta")
    num_params, num_keys, num_in, num_out = SIZES[name]
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert len(model.state_dict()) == num_keys
    if num_in is not None:
        assert (len(model.input_blocks), len(model.output_blocks)) == (num_in, num_out)
    shapes = preset_shapes(name)
    for key, shape in SHAPES.get(name, {}).items():
        assert shapes[key] == shape, key


def test_attention_heads_and_order():
    def heads(model, path):
        module = model
        for part in path.split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        return module.num_heads, module.new_order

    m64 = build_model("imagenet64", device="meta")
    assert heads(m64, "middle_block.1") == (12, True)
    assert heads(m64, "input_blocks.5.1") == (6, True)
    assert heads(m64, "output_blocks.4.1") == (9, True)
    m128 = build_model("imagenet128", device="meta")
    assert heads(m128, "input_blocks.7.1") == (4, False)
    assert heads(m128, "output_blocks.0.1") == (4, False)
    m256 = build_model("imagenet256", device="meta")
    assert heads(m256, "input_blocks.10.1") == (8, False)
    assert heads(m256, "input_blocks.13.1") == (16, False)
    up = build_model("upsampler-128-512", device="meta")
    assert heads(up, "middle_block.1") == (12, False)
    clf = build_model("classifier128", device="meta")
    assert heads(clf, "input_blocks.7.1") == (4, False)
    assert clf.out[2].num_heads == 8


def test_uncond_differs_from_cond_only_by_the_label_embedding():
    cond, uncond = preset_shapes("imagenet256"), preset_shapes("imagenet256-uncond")
    assert set(cond) - set(uncond) == {"label_emb.weight"}
    assert all(cond[key] == shape for key, shape in uncond.items())


def test_find_matching_preset():
    shared = ["imagenet256-uncond", "lsun-bedroom", "lsun-cat", "lsun-horse"]
    shared.append("lsun-horse-nodropout")
    for name in list_presets():
        found = find_matching_preset(preset_shapes(name))
        if name in shared:
            assert found == shared[0]
            assert matching_presets(preset_shapes(name)) == shared
        else:
            assert found == name
    shapes = dict(preset_shapes("imagenet128"))
    shapes["out.2.weight"] = (3, 256, 3, 3)  # learn_sigma False
    assert find_matching_preset(shapes) is None
    del shapes["out.2.weight"]
    assert find_matching_preset(shapes) is None
    # a state dict works too (tensors stand for their shapes)
    assert find_matching_preset(build_model("classifier64", "meta").state_dict()) == "classifier64"


def test_preset_entries():
    assert len(list_presets()) == 15
    preset = get_preset("imagenet64")
    assert preset.kind == "diffusion" and preset.checkpoint == "64x64_diffusion.pt"
    # full flag set: defaults, then the published flags
    assert set(preset.flags) == set(model_and_diffusion_defaults())
    assert preset.flags["num_heads"] == 4 and preset.flags["num_head_channels"] == 64
    assert preset.flags["noise_schedule"] == "cosine"
    with pytest.raises(TypeError):
        preset.flags["image_size"] = 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.name = "x"
    guidance = {
        name: (get_preset(name).classifier, get_preset(name).classifier_scale)
        for name in ["imagenet64", "imagenet128", "imagenet256", "imagenet256-uncond"]
    }
    assert guidance == {
        "imagenet64": ("classifier64", 1.0),
        "imagenet128": ("classifier128", 0.5),
        "imagenet256": ("classifier256", 1.0),
        "imagenet256-uncond": ("classifier256", 10.0),
    }
    assert get_preset("imagenet512").classifier_scale == 4.0
    assert get_preset("lsun-cat").timestep_respacing == "1000"
    assert get_preset("classifier64").flags["classifier_depth"] == 4
    assert get_preset("upsampler-128-512").flags["attention_resolutions"] == "32,16"
    with pytest.raises(UserError, match="imagenet256-uncond"):
        get_preset("imagenet1024")


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in list_presets())
    assert main(["presets", "upsampler-64-256"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["flags"]["large_size"] == 256 and printed["kind"] == "upsampler"
    assert main(["presets", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err

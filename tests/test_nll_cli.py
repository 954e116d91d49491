"""``admkit nll``: the variational bound of held-out images, averaged as the original does, with
each image's class given to a class-conditional model by name."""

import json

import numpy as np
import torch
from PIL import Image

from admkit.checkpoint import save_checkpoint
from admkit.cli import main
from admkit.cli.models import build_diffusion, build_network, load_model
from admkit.compat import script_util
from admkit.data import open_dataset
from admkit.generate import image_generators, network_fn
from admkit.losses import calc_bpd_loop

FLAGS = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_head_channels=16,
    class_cond=True,
    learn_sigma=True,
    diffusion_steps=6,
    noise_schedule="cosine",
    num_classes=2,
)


def _run(tmp_path):
    flags = {**script_util.model_and_diffusion_defaults(), **FLAGS}
    torch.manual_seed(0)
    network = build_network("diffusion", flags)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.03)
        network.label_emb.weight.normal_(0, 3)  # so that the class given changes the bound
    run = tmp_path / "run"
    run.mkdir()
    config = {"kind": "diffusion", "flags": flags, "num_classes": 2, "cfg_null_label": None}
    (run / "config.json").write_text(json.dumps({**config, "class_names": ["ant", "bee"]}))
    save_checkpoint(run, 1, {"model": network.state_dict()}, {"step": 1})
    return run


def _folder(tmp_path, names):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _bound(run, folder, label, seed, batch_size):
    """The mean bound computed directly from the library, batch by batch as the command goes."""
    model = load_model(run, "diffusion")
    model_fn = network_fn(model.network, class_conditional=True)
    diffusion = build_diffusion(model.flags)
    data = open_dataset(folder, 8)
    images = torch.stack([data[i][0] for i in range(len(data))])
    totals = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            y = torch.full((len(batch),), label, dtype=torch.long)
            generators = image_generators(seed, range(start, start + len(batch)), 0)
            out = calc_bpd_loop(
                diffusion, model_fn, batch, model_kwargs={"y": y}, generator=generators
            )
            totals.append(out["total_bpd"])
    return torch.cat(totals).double().mean().item()


def test_nll_is_the_mean_bound_with_classes_matched_by_name(tmp_path, capsys):
    run = _run(tmp_path)
    # Only the model's second class is in the data, so its label is 1 although it is the data's 0.
    folder = _folder(tmp_path, ["bee_0.png", "bee_1.png", "bee_2.png"])
    out = [*("--json", tmp_path / "n.json", "--terms", tmp_path / "t.npz")]
    argv = ["nll", "--model", run, "--data", folder, "--batch_size", 2, "--seed", 5, *out]
    assert main([str(a) for a in argv]) == 0
    assert "bits/dim" in capsys.readouterr().out
    numbers = json.loads((tmp_path / "n.json").read_text())
    assert numbers["num_images"] == 3 and numbers["num_timesteps"] == 6
    assert np.isclose(numbers["bpd"], _bound(run, folder, 1, seed=5, batch_size=2), rtol=1e-9)
    assert not np.isclose(numbers["bpd"], _bound(run, folder, 0, seed=5, batch_size=2), rtol=1e-5)
    # Each image has its own noise, so the batch size does not change the figure.
    one_by_one = [*argv[:-4], "--batch_size", 1, "--json", tmp_path / "one.json"]
    assert main([str(a) for a in one_by_one]) == 0
    alone = json.loads((tmp_path / "one.json").read_text())["bpd"]
    assert np.isclose(alone, numbers["bpd"], rtol=1e-6)
    assert not np.isclose(alone, _bound(run, folder, 1, seed=6, batch_size=1), rtol=1e-5)
    # The per-step terms: T of them, and their sum plus the prior term is the bound.
    with np.load(tmp_path / "t.npz") as terms:
        assert {name: terms[name].shape for name in terms.files} == {
            "vb": (6,),
            "mse": (6,),
            "xstart_mse": (6,),
        }
        assert np.isclose(terms["vb"].sum() + numbers["prior_bpd"], numbers["bpd"], rtol=1e-6)


def test_nll_refuses_classes_the_model_does_not_know_and_unlabelled_data(tmp_path, capsys):
    run = _run(tmp_path)
    folder = _folder(tmp_path, ["ant_0.png", "cow_0.png"])
    assert main(["nll", "--model", str(run), "--data", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not trained on: cow" in err[0], err
    unlabelled = tmp_path / "plain.npz"
    np.savez(unlabelled, np.zeros((2, 8, 8, 3), np.uint8))
    assert main(["nll", "--model", str(run), "--data", str(unlabelled)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no labels" in err[0], err

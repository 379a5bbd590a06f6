"""ImageFolder transforms come from timm's data config of the backbone (timm.data.create_transform), not from a
hand-written ImageNet mean and std."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import resolve_model_data_config

from ensemblekit.backbones.transforms import data_config, image_transform
from ensemblekit.training.config import DataConfig, ModelConfig, build_ensemble
from ensemblekit.training.data import load_dataset
from ensemblekit.training.trainer import backbone_data_config, load_split

TINY = {"backbone": "resnet10t", "backbone_options": {"stem_width": 8, "channels": [8, 16, 32, 64]},
        "num_classes": 10, "image_size": 16, "topology": {"name": "tree", "depth": 1}}


def fake_imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_transforms_come_from_the_data_config(tmp_path):
    root = fake_imagefolder(tmp_path / "images")
    ens = build_ensemble(ModelConfig(**TINY))
    config = resolve_model_data_config(ens)
    config["mean"], config["std"] = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # a backbone with its own statistics
    test, info = load_dataset("imagefolder", "test", root=root, data_config=config)
    assert info.image_size == 176 and info.mean == (0.5, 0.4, 0.3) and info.std == (0.2, 0.25, 0.3)
    image, _ = test[0]
    expected = image_transform(config, augment=False)(Image.open(root / "val/cat/0.png").convert("RGB"))
    assert image.shape == (3, 176, 176) and torch.equal(image, expected)
    train, _ = load_dataset("imagefolder", "train", root=root, data_config=config, image_size=32)
    assert train[0][0].shape == (3, 32, 32)  # the data section's image_size comes first
    _, default = load_dataset("imagefolder", "test", root=root)
    assert (default.image_size, default.mean) == (224, (0.485, 0.456, 0.406))  # timm's defaults


def test_a_run_on_an_imagefolder_uses_the_backbones_config(tmp_path):
    root = fake_imagefolder(tmp_path / "images")
    data = DataConfig(name="imagefolder", root=str(root))
    config = backbone_data_config(ModelConfig(**TINY))
    assert config == data_config("resnet10t") and config["input_size"] == (3, 176, 176)
    _, info = load_split(data, "train", data_config=config)
    assert info.image_size == 176
    vit = backbone_data_config(ModelConfig(backbone="vit_tiny_patch16_224", backbone_options={"img_size": 64}))
    assert vit["input_size"] == (3, 64, 64) and vit["mean"] == (0.5, 0.5, 0.5)


def test_data_config_of_a_name_a_model_and_defaults():
    assert data_config("resnet10t")["input_size"] == (3, 176, 176)
    assert data_config("resnet10t", image_size=(48, 64), in_chans=1)["input_size"] == (1, 48, 64)
    assert data_config("resnet10t", use_test_size=True)["input_size"] == (3, 224, 224)
    ens = build_ensemble(ModelConfig(**TINY))
    assert data_config(ens) == resolve_model_data_config(ens)
    assert data_config() == {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                             "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    augmented = image_transform(data_config("resnet10t", image_size=32), augment=True)
    image = Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    assert augmented(image).shape == (3, 32, 32)


def test_train_and_evaluate_an_imagefolder_from_the_command_line(tmp_path):
    from ensemblekit.cli.main import main

    root = fake_imagefolder(tmp_path / "images")
    config = tmp_path / "folder.toml"
    config.write_text(f"""
[model]
backbone = "resnet10t"
backbone_options = {{ stem_width = 8, channels = [8, 16, 32, 64] }}
topology = {{ name = "tree", depth = 1 }}

[data]
name = "imagefolder"
root = "{root}"
image_size = 32

[train]
epochs = 1
batch_size = 8
progress = "none"
device = "cpu"
""")
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU
    try:
        assert main(["train", str(config), "--out", str(run)]) == 0
        assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "eval/report.json").is_file()

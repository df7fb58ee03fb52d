"""trainers.build: what a config's values become."""
import importlib

from trainers import build


def test_a_backbone_picked_on_the_command_line_leaves_out_the_config_s_own_backbone_kwargs(capsys):
    config = importlib.import_module("configs.image_folder").get_config()  # resnet18_cifar, backbone_kwargs width=64
    config.model.backbone = "small_cnn"  # as --config.model.backbone=small_cnn gives it
    config.model.backbone_kwargs.width = 64
    config.data.image_size = 16
    backbone = build.make_backbone(config)
    assert backbone.name == "small_cnn" and backbone.input_shape == (None, 16, 16, 3)
    assert "config.model.backbone_kwargs width left out: small_cnn does not take them (it takes widths, mean, std)" \
        in capsys.readouterr().err
    config.model.backbone = "resnet18_cifar"  # its own backbone: the kwargs are used, nothing said
    assert build.make_backbone(config).name.startswith("resnet18") and capsys.readouterr().err == ""

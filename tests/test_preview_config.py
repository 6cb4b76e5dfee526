"""`model=consisid_preview` carries the released ConsisID dimensions (built on the meta device)."""

from __future__ import annotations

import torch
from conftest import CONF
from hydra import compose, initialize_config_dir

from consisid_lab.utils.instantiate import instantiate


def test_consisid_preview_config_has_the_released_sizes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["model=consisid_preview"])
    m = cfg.model
    assert not m.global_encoder.use_kps and m.local_encoder.arcface_layer == "last"
    assert m.text_encoder.max_length == 226
    with torch.device("meta"):
        backbone = instantiate(m.backbone, in_channels=32, out_channels=16, text_dim=4096)
        # id_cond = ArcFace 512 + CLIP 768; five EVA-CLIP hidden states of width 1024.
        fuser = instantiate(m.fuser, id_dim=1280, token_dims=[1024] * 5)
        injector = instantiate(
            m.injector, dim=backbone.inner_dim, kv_dim=fuser.output_dim, num_layers=backbone.num_layers
        )
    backbone.set_injector(injector)
    total = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in fuser.parameters())
    identity = sum(p.numel() for p in injector.parameters()) + sum(p.numel() for p in fuser.parameters())
    assert total == 6_162_495_040
    assert identity == 592_015_360
    assert len(injector.layers) == 21 and injector.position == "after_block"

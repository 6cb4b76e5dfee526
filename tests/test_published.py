"""The published ConsisID layout at tiny sizes: strict loading, error messages, pipeline exactness, the generate task.

One tiny model is saved in the released diffusers layout (random weights everywhere, a tiny ArcFace ONNX graph and
a tiny EVA-style CLIP as ``face_encoder/``) and shared by the tests of this module.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cogvideox_vae
from torch import nn

from consisid_lab.faces.analysis import NoFaceError
from consisid_lab.models.consisid import from_diffusers
from consisid_lab.models.published import (
    ARCFACE_SUBDIR,
    CLIP_CHECKPOINT,
    RELEASED_CONFIG,
    CompositionMismatchError,
    check_layout,
    load_denoiser,
    load_published,
    resolve_model_path,
)

FRAMES, HEIGHT, WIDTH = 9, 16, 24  # tiny VAE: x4 spatial, x4 temporal -> latents 3 x 4 x 6
LATENT_C = 4
TEXT_LEN, TEXT_DIM = 8, 16
ARC_DIM, CLIP_PROJ, CLIP_WIDTH, CLIP_BLOCKS = 512, 16, 192, (2, 4)
CLIP_NAME = "consisid-lab-test-eva-tiny"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*estimate.*:FutureWarning"),  # insightface's skimage call
    pytest.mark.filterwarnings("ignore:.*TorchScript-based ONNX export.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _transformer_config(**overrides) -> dict:
    heads, head_dim = 3, 16  # inner 48 -> identity-token width 32
    cfg = {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": 2 * LATENT_C,
        "out_channels": LATENT_C,
        "time_embed_dim": 16,
        "text_embed_dim": TEXT_DIM,
        "num_layers": 4,
        "sample_width": WIDTH // 4,
        "sample_height": HEIGHT // 4,
        "sample_frames": FRAMES,
        "patch_size": 2,
        "max_text_seq_length": TEXT_LEN,
        "temporal_compression_ratio": 4,
        "use_rotary_positional_embeddings": True,
        "use_learned_positional_embeddings": True,
        "is_train_face": True,
        "is_kps": False,
        "cross_attn_interval": 2,
        "cross_attn_dim_head": 8,
        "cross_attn_num_heads": 2,
        "LFE_id_dim": ARC_DIM + CLIP_PROJ,
        "LFE_vit_dim": CLIP_WIDTH,
        "LFE_depth": 4,
        "LFE_dim_head": 8,
        "LFE_num_heads": 2,
        "LFE_num_id_token": 3,
        "LFE_num_querie": 4,
        "LFE_output_dim": heads * head_dim * 2 // 3,
        "LFE_ff_mult": 2,
        "LFE_num_scale": len(CLIP_BLOCKS),
        "local_face_scale": 1.0,
    }
    return {**cfg, **overrides}


def _tiny_pipeline(**config):
    from diffusers import ConsisIDPipeline, ConsisIDTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from consisid_lab.models.diffusion import make_scheduler

    torch.manual_seed(0)
    transformer = ConsisIDTransformer3DModel(**_transformer_config(**config)).eval()
    with torch.no_grad():  # every parameter random (diffusers zero-initialises some): no path is vacuously equal
        for p in transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    vae = tiny_cogvideox_vae(LATENT_C, HEIGHT, WIDTH).eval()
    words = ["a", "person", "smiles", "at", "the", "camera", "walks", "in", "park"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    ).eval()
    return ConsisIDPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=make_scheduler()
    )


class _TinyArcFace(nn.Module):
    """Strided convs -> (B, C, 7, 7) -> flatten -> 512, the shape of insightface's recognition graphs."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Conv2d(3 if i == 0 else c, c, 3, 2, 1) for i in range(4)))
        self.fc = nn.Linear(c * 7 * 7, ARC_DIM)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


def _write_face_encoder(root) -> None:
    import open_clip

    from consisid_lab.faces.eva_clip import EvaClipEncoder

    arc_dir = root / ARCFACE_SUBDIR
    arc_dir.mkdir(parents=True)
    torch.manual_seed(1)
    torch.onnx.export(
        _TinyArcFace().eval(),
        torch.zeros(1, 3, 112, 112),
        str(arc_dir / "glintr100.onnx"),
        dynamo=False,
        input_names=["data"],
        output_names=["fc1"],
        dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}},
    )
    clip_cfg = {
        "embed_dim": CLIP_PROJ,
        "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224", "timm_pool": "token"},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
        "custom_text": True,
    }
    cfg_path = root / "face_encoder" / f"{CLIP_NAME}.json"
    cfg_path.write_text(json.dumps(clip_cfg))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(2)
    enc = EvaClipEncoder(None, model_name=CLIP_NAME, blocks=CLIP_BLOCKS)
    torch.save({f"visual.{k}": v for k, v in enc.visual.state_dict().items()}, root / CLIP_CHECKPOINT)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("consisid_tiny")
    pipe = _tiny_pipeline()
    pipe.save_pretrained(root)
    _write_face_encoder(root)
    return root, pipe


def _features(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    id_cond = torch.randn(1, ARC_DIM + CLIP_PROJ, generator=g)
    vit = [torch.randn(1, 9, CLIP_WIDTH, generator=g) for _ in CLIP_BLOCKS]
    return id_cond, vit


def _face_image(seed: int = 4):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------- (a) exactness
@pytest.mark.parametrize("dynamic", [False, True])
def test_generate_path_equals_the_diffusers_pipeline(published, dynamic):
    from consisid_lab.generate import sample_published

    root, pipe = published
    model = load_published(root, need_face_encoder=False)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    negative = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    id_cond, vit = _features()
    image = _face_image()
    common = {
        "num_frames": FRAMES,
        "height": HEIGHT,
        "width": WIDTH,
        "guidance_scale": 6.0,
        "use_dynamic_cfg": dynamic,
    }

    def theirs(output_type):
        return pipe(
            image=image,
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
            id_cond=id_cond,
            id_vit_hidden=vit,
            **common,
        ).frames

    def ours(cond=id_cond, decode=True, **kw):
        args = {**common, **kw}
        gen = torch.Generator().manual_seed(0)
        return sample_published(
            model, image, cond, vit, prompt, negative, num_steps=4, generator=gen, decode=decode, **args
        )

    # Latents: the whole sampling loop (image-latent sample, noise, CFG, solver steps with their noise).
    ref_latents = theirs("latent")  # (B, f, C, h, w)
    our_latents = ours(decode=False)
    assert our_latents.shape == ref_latents.shape == (1, 3, LATENT_C, HEIGHT // 4, WIDTH // 4)
    torch.testing.assert_close(our_latents, ref_latents, rtol=1e-5, atol=1e-5)
    # Decoded video: the pipeline's postprocessing maps [-1, 1] to [0, 1].
    ref = theirs("pt")  # (B, F, 3, H, W) in [0, 1]
    video = ours()  # (B, F, 3, H, W) in [-1, 1]
    assert video.shape == ref.shape == (1, FRAMES, 3, HEIGHT, WIDTH)
    inside = ((ref > 0.01) & (ref < 0.99)).float().mean()
    assert inside > 0.5, "decoded video saturated: the comparison would be vacuous"
    torch.testing.assert_close((video / 2 + 0.5).clamp(0, 1), ref, rtol=0, atol=1e-5)

    # The identity input and dynamic CFG both change the result: the comparison above is not vacuous.
    scale = ref_latents.abs().mean()
    assert (ours(cond=id_cond + 1, decode=False) - our_latents).abs().mean() > 1e-3 * scale
    assert (ours(decode=False, use_dynamic_cfg=not dynamic) - our_latents).abs().mean() > 1e-3 * scale


def test_keypoint_latent_matches_the_pipeline_for_is_kps_models(tmp_path):
    from consisid_lab.generate import sample_published

    pipe = _tiny_pipeline(is_kps=True)
    pipe.save_pretrained(tmp_path)
    model = load_published(tmp_path, need_face_encoder=False)
    assert model.is_kps
    g = torch.Generator().manual_seed(6)
    prompt, negative = torch.randn(2, 1, TEXT_LEN, TEXT_DIM, generator=g)
    id_cond, vit = _features()
    image = _face_image()
    kps = np.array([[20, 24], [44, 24], [32, 36], [22, 48], [42, 48]], dtype=np.float32)
    common = {"num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "guidance_scale": 3.0, "use_dynamic_cfg": False}
    ref = pipe(
        image=image,
        prompt_embeds=prompt,
        negative_prompt_embeds=negative,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        id_cond=id_cond,
        id_vit_hidden=vit,
        kps_cond=kps,
        **common,
    ).frames

    def ours(points):
        gen = torch.Generator().manual_seed(0)
        return sample_published(
            model,
            image,
            id_cond,
            vit,
            prompt,
            negative,
            num_steps=3,
            generator=gen,
            kps=points,
            decode=False,
            **common,
        )

    latents = ours(kps)
    torch.testing.assert_close(latents, ref, rtol=1e-5, atol=1e-5)
    assert (ours(kps + 8) - latents).abs().mean() > 1e-3 * latents.abs().mean()  # the keypoint image matters
    with pytest.raises(ValueError, match="is_kps"):
        ours(None)


def test_loaded_denoiser_equals_from_diffusers(published):
    root, pipe = published
    ours = load_denoiser(root / "transformer")
    ref = from_diffusers(pipe.transformer)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not any(p.requires_grad for p in ours.parameters())


# ------------------------------------------------------------------------------------------- (b) missing pieces
def test_missing_subfolders_are_all_named(published, tmp_path):
    root, _ = published
    copy = tmp_path / "model"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "vae")
    shutil.rmtree(copy / "face_encoder")
    (copy / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        check_layout(copy)
    msg = str(err.value)
    for part in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert part in msg
    assert ARCFACE_SUBDIR in msg and CLIP_CHECKPOINT in msg and str(copy) in msg
    assert "transformer/" not in msg  # present parts are not reported
    with pytest.raises(FileNotFoundError, match="vae/config.json"):
        load_published(copy, need_face_encoder=False)


def test_hub_id_offline_names_what_was_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"(?s)nobody/no-such-model.*hub cache.*HF_HUB_OFFLINE"):
        resolve_model_path("nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "not" / "here")


# ------------------------------------------------------------------------------------- (c) another composition
def test_checkpoint_of_another_composition_lists_the_components(published, tmp_path):
    root, _ = published
    folder = tmp_path / "transformer"
    shutil.copytree(root / "transformer", folder)
    cfg = json.loads((folder / "config.json").read_text())
    # The weights stay those of in_channels 8, 4 layers, interval 2, LFE_id_dim 528; the config claims otherwise.
    cfg.update(in_channels=16, num_layers=6, cross_attn_interval=3, LFE_id_dim=1280, LFE_depth=10)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompositionMismatchError) as err:
        load_denoiser(folder)
    msg = str(err.value)
    for name in ("in_channels", "num_layers", "cross_attn_interval", "LFE_id_dim", "LFE_depth"):
        assert name in msg
    assert "LFE_vit_dim" not in msg  # matching components are not reported

    # The tiny checkpoint is not the released composition: every differing released value is listed.
    with pytest.raises(CompositionMismatchError) as err:
        load_denoiser(root / "transformer", expected=RELEASED_CONFIG)
    msg = str(err.value)
    for name in ("num_layers: checkpoint has 4", "in_channels: checkpoint has 8", "LFE_vit_dim", "text_embed_dim"):
        assert name in msg
    assert "cross_attn_interval" not in msg and "is_kps" not in msg


def test_transformer_that_does_not_fit_the_vae_is_rejected(published, tmp_path):
    root, _ = published
    copy = tmp_path / "model"
    shutil.copytree(root, copy)
    vae_cfg = json.loads((copy / "vae" / "config.json").read_text())
    vae_cfg["latent_channels"] = 16
    (copy / "vae" / "config.json").write_text(json.dumps(vae_cfg))
    with pytest.raises(CompositionMismatchError, match=r"(?s)in_channels: 8.*32.*out_channels: 4"):
        load_published(copy, need_face_encoder=False)


# -------------------------------------------------------------------------------------------- (d) the generate task
def _compose(root, tmp_path, *overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "generate",
            overrides=[
                f"model_path={root}",
                f"output_dir={tmp_path / 'out'}",
                "prompt='a person smiles at the camera'",
                f"num_frames={FRAMES}",
                f"height={HEIGHT}",
                f"width={WIDTH}",
                "num_steps=2",
                "progress=false",
                f"face_encoder.clip_model={CLIP_NAME}",
                f"face_encoder.clip_model_config={root / 'face_encoder' / (CLIP_NAME + '.json')}",
                f"face_encoder.clip_blocks=[{','.join(map(str, CLIP_BLOCKS))}]",
                *overrides,
            ],
        )


def test_generate_task_writes_video_and_sheet_from_a_face_photo(published, tmp_path, caplog):
    from PIL import Image
    from skimage import data

    from consisid_lab.generate import generate

    root, _ = published
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    long_prompt = " ".join(["a person walks in the park"] * 3)  # 18 words + </s>: over the 8 tokens of this T5
    cfg = _compose(root, tmp_path, f"face={photo}", f"prompt='{long_prompt}'")
    with caplog.at_level(logging.WARNING, logger="consisid_lab.models.text_encoder"):
        files = generate(cfg)
    assert files["video"].stat().st_size > 0 and files["contact_sheet"].stat().st_size > 0
    import imageio.v3 as iio

    frames = iio.imread(files["video"], plugin="pyav")
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    sheet = iio.imread(files["contact_sheet"])
    assert sheet.shape == (HEIGHT, 8 * WIDTH, 3)
    assert any("dropped 11 tokens" in r.getMessage() for r in caplog.records)


def test_generate_task_without_a_face_raises_and_writes_nothing(published, tmp_path):
    from PIL import Image

    from consisid_lab.generate import generate

    root, _ = published
    photo = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(photo)
    with pytest.raises(NoFaceError, match="noise.png"):
        generate(_compose(root, tmp_path, f"face={photo}"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("num_frames=10", r"8k\+1.*1, 9, 17"),
        ("height=18", r"height to be a positive multiple of 4"),
        ("width=20", r"multiple of 8"),
    ],
)
def test_sizes_the_vae_cannot_take_are_rejected_with_valid_values(published, tmp_path, override, pattern):
    from consisid_lab.generate import generate

    root, _ = published
    with pytest.raises(ValueError, match=pattern):
        generate(_compose(root, tmp_path, f"face={tmp_path / 'unused.png'}", override))


@pytest.mark.slow
def test_generate_task_from_one_of_our_training_checkpoints(train_cfg, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from PIL import Image
    from skimage import data

    from consisid_lab.generate import generate
    from consisid_lab.train import train

    cfg = train_cfg("trainer.max_steps=1", "test=false", "model.sampling.num_steps=1")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        gen_cfg = compose(
            "generate",
            overrides=[
                f"ckpt_path={ckpt}",
                f"face={photo}",
                "prompt='a person smiles'",
                f"output_dir={tmp_path / 'gen'}",
                f"num_frames={cfg.data.num_frames}",
                f"height={cfg.data.height}",
                f"width={cfg.data.width}",
                "num_steps=2",
                "guidance_scale=2.0",
                "progress=false",
            ],
        )
    files = generate(gen_cfg)
    import imageio.v3 as iio

    assert iio.imread(files["video"], plugin="pyav").shape == (cfg.data.num_frames, cfg.data.height, cfg.data.width, 3)

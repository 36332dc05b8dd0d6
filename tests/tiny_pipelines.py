"""Builders of tiny random-weight pipeline components for the tests: nothing is downloaded.

Every builder seeds torch itself, so a component is the same in every test. The sizes are the smallest that the
diffusers blocks accept: 8x8 images, 4x4 latents (one downsampling), 8-wide text embeddings of 8 tokens.
"""

import json
import os

import torch

IMAGE_SIZE = 8
LATENT_SIZE = 4
TEXT_DIM = 8
MAX_TOKENS = 8
SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_vae(latent_channels=4, scaling_factor=0.5, shift_factor=None):
    """An `AutoencoderKL` from 3x8x8 images to `latent_channels`x4x4 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=scaling_factor,
        shift_factor=shift_factor, mid_block_add_attention=False,
    ).eval()


def tiny_vq_model(scaling_factor=0.5):
    """A `VQModel` from 3x8x8 images to 3x4x4 latents (as `LDMPipeline`'s `vqvae`)."""
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=3,
        num_vq_embeddings=16, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=scaling_factor,
        mid_block_add_attention=False,
    ).eval()


def tiny_unet(in_channels=3, sample_size=LATENT_SIZE):
    """A `UNet2DModel` (unconditional) on `in_channels`x`sample_size`^2 samples."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_conditional_unet(in_channels=4):
    """A `UNet2DConditionModel` on `in_channels`x4x4 latents with 8-wide cross-attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 8), norm_num_groups=4, cross_attention_dim=TEXT_DIM, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def tiny_tokenizer(folder):
    """A `CLIPTokenizer` over single letters (no merges), from a vocab.json and merges.txt written into `folder`."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as handle:
        json.dump(vocab, handle)
    with open(merges_file, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=MAX_TOKENS)


def tiny_text_encoder(vocab_size=54):
    """A one-layer `CLIPTextModel` with 8-wide hidden states."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def tiny_stable_diffusion(folder, img2img=False, prediction_type="epsilon"):
    """A `StableDiffusionPipeline` (or `StableDiffusionImg2ImgPipeline`) of tiny random components with a DDIM
    scheduler of Stable Diffusion's schedule; `prediction_type="v_prediction"` makes it SD-2 style."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(folder),
        unet=tiny_conditional_unet(), scheduler=DDIMScheduler(prediction_type=prediction_type, **SCALED_LINEAR),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_tiny_stable_diffusion(folder, **kwargs):
    """`tiny_stable_diffusion` saved as a pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    `tokenizer/`, `scheduler/`), as `--model` takes it; returns the folder."""
    import pathlib

    folder = pathlib.Path(folder)
    sources = folder.parent / f"{folder.name}-tokenizer"
    sources.mkdir(parents=True, exist_ok=True)
    tiny_stable_diffusion(sources, **kwargs).save_pretrained(folder)
    return folder


def tiny_ldm():
    """An unconditional `LDMPipeline` (VQModel + UNet2DModel) of tiny random components."""
    from diffusers import DDIMScheduler, LDMPipeline

    pipe = LDMPipeline(vqvae=tiny_vq_model(), unet=tiny_unet(), scheduler=DDIMScheduler(**SCALED_LINEAR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_images(count=4, seed=0):
    """`count` random 3x8x8 images in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1

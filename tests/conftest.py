import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one thread: on small CPU machines the many small ops of these tests run fastest without thread hand-offs
torch.set_num_threads(1)


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture
def tiny_unet():
    """A random-weight `UNet2DModel` of the smallest useful size (1 channel, 8x8)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()

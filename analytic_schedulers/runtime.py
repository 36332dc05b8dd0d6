"""How the package's tasks run: devices and processes, seeds, the one model call, atomic writes, and the checkpoint
format (tensors in safetensors files, everything else in JSON).

Every task (`estimate_gamma`, `nll_bits_per_dim`, head training, sampling) and every command goes through these
functions, so that a model is called, a seed is read and a file is written the same way everywhere.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, IO, Optional, Tuple, Union

import numpy as np
import torch

GeneratorLike = Optional[Union[int, torch.Generator]]

__all__ = [
    "GeneratorLike",
    "call_model",
    "load_checkpoint",
    "make_accelerator",
    "make_generator",
    "model_device_dtype",
    "model_output_tensor",
    "save_checkpoint",
    "seed_of",
    "stream_seed",
    "to_device",
    "write_atomically",
    "write_json_atomically",
    "write_text_atomically",
]


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def model_device_dtype(model) -> Tuple[torch.device, torch.dtype]:
    """The device and floating dtype of a module's first floating parameter or buffer (CPU/float32 otherwise)."""
    if isinstance(model, torch.nn.Module):
        for tensor in itertools.chain(model.parameters(), model.buffers()):  # lazily: usually the first one
            if tensor.is_floating_point():
                known = tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                return tensor.device, tensor.dtype if known else torch.float32
    return torch.device("cpu"), torch.float32


def model_output_tensor(output) -> torch.Tensor:
    """The prediction of a model's output: the tensor itself, a diffusers output's `.sample`, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"The model returned {type(output).__name__}; expected a tensor, a diffusers output with `.sample` or a tuple."
    )


def call_model(model: Callable, sample: torch.Tensor, timestep, dtype: Optional[torch.dtype] = None,
               **model_kwargs) -> torch.Tensor:
    """
    One call of a diffusion model, `model(sample, timestep, **model_kwargs)`, as every task of the package makes it.

    Args:
        model: a `UNet2DModel`-like module or any callable with that signature.
        sample: `x_t`, `[N, ...]`; cast to `dtype` (default: the model's floating dtype).
        timestep: an int, or a tensor of one timestep per sample (`[N]`); ints become a long tensor `[N]` on the
            sample's device.
        model_kwargs: passed through (`encoder_hidden_states`, `class_labels`, ...).

    Returns:
        The output tensor (`.sample` of a diffusers output), as the model computed it (its dtype).
    """
    if dtype is None:
        dtype = model_device_dtype(model)[1]
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.full((sample.shape[0],), int(timestep), dtype=torch.long, device=sample.device)
    return model_output_tensor(model(sample.to(dtype), timestep, **model_kwargs))


def to_device(tensor: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """
    `tensor.to(device)` without making the host wait for the device.

    A plain copy from ordinary (pageable) host memory to a CUDA device synchronises the stream, so the host could not
    queue the next batch while the device works; a CPU tensor bound for CUDA goes through pinned memory with
    `non_blocking=True` instead. Anything else is `tensor.to(device)`.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------------
# Seeds: every task takes `generator=`, an int seed or a `torch.Generator`
# ---------------------------------------------------------------------------------------------------------------------


def seed_of(generator: GeneratorLike) -> int:
    """The integer seed behind `generator`: the int itself, 0 for `None`, or one draw from a `torch.Generator`."""
    if generator is None:
        return 0
    if isinstance(generator, bool) or not isinstance(generator, (int, np.integer, torch.Generator)):
        raise TypeError(f"`generator` must be an int seed or a torch.Generator, got {type(generator).__name__}.")
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return int(generator)


def stream_seed(*keys: int) -> int:
    """An independent 63-bit seed for a named stream, e.g. `(seed, world_size, rank, timestep)`."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_generator(seed: int, device: Union[str, torch.device, None] = None) -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `seed` (on the CPU for devices without their own generators)."""
    try:
        return torch.Generator(device=device or "cpu").manual_seed(int(seed))
    except RuntimeError:
        return torch.Generator().manual_seed(int(seed))


def as_generator(generator: GeneratorLike, device: Union[str, torch.device, None] = None) -> Optional[torch.Generator]:
    """`generator` as a `torch.Generator`: an int seeds a new one on `device`; a generator is returned as it is."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return make_generator(seed_of(generator), device)


# ---------------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------------


def make_accelerator(device: Optional[str] = None, **kwargs):
    """
    The `accelerate.Accelerator` of a command: every process of `accelerate launch`, or one process alone.

    `device="cpu"` (or no CUDA) keeps every process on the CPU. Raises `ValueError` when the launcher started more
    processes than Accelerate joined (each would then repeat the whole job).
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available(), **kwargs)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world_size:
        raise ValueError(
            f"Launched as {world_size} processes but Accelerate set up {accelerator.num_processes}: each would "
            "repeat the whole job. Check the `accelerate launch` configuration."
        )
    return accelerator


def command_device(accelerator, device: Optional[str]) -> torch.device:
    """The device a command runs on: `--device` when it names one other than cpu/cuda, else the accelerator's."""
    if device is None or device in ("cpu", "cuda"):
        return accelerator.device
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------------------------
# Files: atomic writes and checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def write_atomically(path: Union[str, os.PathLike], write: Callable[[IO[bytes]], None]) -> None:
    """
    Writes a file so that a reader sees either the old file or the complete new one, never a half: `write(handle)`
    fills a temporary file beside `path` (binary), which is synced, given the usual permissions and renamed over it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomically(path: Union[str, os.PathLike], text: str) -> None:
    """`write_atomically` for UTF-8 text."""
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_atomically(path: Union[str, os.PathLike], state: Any, indent: Optional[int] = None) -> None:
    """`write_atomically` for JSON (NaN and inf are refused: store them as `null`)."""
    write_text_atomically(path, json.dumps(state, allow_nan=False, indent=indent) + "\n")


CHECKPOINT_STATE = "trainer_state.json"


def save_checkpoint(folder: Union[str, os.PathLike], tensors: Dict[str, Dict[str, torch.Tensor]],
                    state: Dict[str, Any]) -> None:
    """
    Writes a checkpoint folder of safetensors and JSON only: one `<name>.safetensors` per entry of `tensors`, and
    `trainer_state.json`.

    The folder is written beside its final place and renamed into it, so a reader (or a resumed run) only ever sees
    complete checkpoints; `trainer_state.json` is written last and marks a folder as complete.
    """
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, group in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, os.path.join(tmp, f"{name}.safetensors"))
    write_json_atomically(os.path.join(tmp, CHECKPOINT_STATE), state, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_checkpoint(folder: Union[str, os.PathLike]) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, Any]]:
    """Reads a folder written by `save_checkpoint`: `({name: tensors}, state)`."""
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    with open(os.path.join(folder, CHECKPOINT_STATE), encoding="utf-8") as handle:
        state = json.load(handle)
    tensors = {name[: -len(".safetensors")]: load_file(os.path.join(folder, name))
               for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")}
    return tensors, state


def is_checkpoint(folder: Union[str, os.PathLike]) -> bool:
    """Whether `folder` holds a complete checkpoint."""
    return os.path.isfile(os.path.join(os.fspath(folder), CHECKPOINT_STATE))

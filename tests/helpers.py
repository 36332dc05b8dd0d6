"""Helpers shared by the tests (importable because pytest puts this folder on sys.path)."""

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


def sample_loop(scheduler, model, num_samples, seed=0, shape=(1, 8, 8), **step_kwargs):
    """Runs `scheduler` over its timesteps from seeded noise with `model(x, t).sample`; returns the samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num_samples, *shape), generator=g)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=g, **step_kwargs).prev_sample
    return x


def run_two_processes(source, tmp_path, timeout=300):
    """
    Runs the script `source` as two CPU processes under `accelerate launch`, with `tmp_path` as its one argument; each
    process writes `rank<r>.json` there, which come back as a list.

    accelerate 1.x runs `--cpu --num_processes 2` as ONE process (its multi-CPU path needs mpirun); the torchrun
    launcher (`--multi_gpu`) with `Accelerator(cpu=True)` in the script gives two real CPU processes (gloo).
    """
    script = tmp_path / "two_processes.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml"),
           "HF_HUB_OFFLINE": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(script), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


# ------------------------------------------------------------------------------------------------ read-backs

# ops that read a tensor's value on the host (`.item()`, `int(t)`, `float(t)`, `if tensor:`, `torch.equal`) or whose
# output shape depends on the values (`nonzero`); on an accelerator each one waits for the device
READ_BACK_OPS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero, torch.ops.aten.item,
                 torch.ops.aten.nonzero, torch.ops.aten.equal}
# methods that copy a tensor to the host; on the CPU they dispatch nothing, so they are counted where they are called
READ_BACK_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


class ReadBackCounter:
    """
    Counts the host reads of tensor values in a block: `with ReadBackCounter() as counter: ...; counter.count`.

    On an accelerator each such read waits for the device. The ops are dispatched on the CPU too, so the count is the
    same without a GPU. Not counted: `.to(device)` copies (on a CPU-only machine a copy to the host cannot be told
    from one that stays there). Counted apart, as `host_data_copies`: tensors made from Python data on a named device
    (`torch.tensor(0.5, device=d)`), which on an accelerator are copies from the host that wait for the device.

    Args:
        host_side: functions and module-name prefixes whose reads are of host tensors by construction (e.g.
            `"torch.optim"`: Adam keeps its step count on the host unless `capturable`); reads made inside them are
            not counted. `where` lists the places of the counted reads (for messages).
    """

    def __init__(self, host_side=()):
        self.count = 0
        self.host_data_copies = 0
        self.where = []
        self._codes = {f.__code__ for f in host_side if callable(f)}
        self._prefixes = tuple(p for p in host_side if isinstance(p, str))

    def __enter__(self):
        self._modes = [_CountingDispatchMode(self), _CountingFunctionMode(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc_info):
        for mode in reversed(self._modes):
            mode.__exit__(*exc_info)

    def _record(self, name):
        frame, caller = sys._getframe(2), None
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if frame.f_code in self._codes or (self._prefixes and module.startswith(self._prefixes)):
                return
            if caller is None and not module.startswith("torch") and module != __name__:
                caller = f"{module}.{frame.f_code.co_name}:{frame.f_lineno}"
            frame = frame.f_back
        self.count += 1
        self.where.append(f"{name} in {caller}")


class _CountingDispatchMode(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in READ_BACK_OPS:
            self.counter._record(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class _CountingFunctionMode(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READ_BACK_METHODS:
            self.counter._record(func.__name__)
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None and args \
                and not isinstance(args[0], torch.Tensor):
            self.counter.host_data_copies += 1
        return func(*args, **kwargs)


class DiffusersLog:
    """Captures what diffusers logs (its loggers do not propagate to the root logger)."""

    def __enter__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        logging.getLogger("diffusers").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("diffusers").removeHandler(self.handler)

    @property
    def text(self):
        return self.stream.getvalue()

"""The GPU report: images/s of the samplers (eager and `torch.compile`d), whether the steps and the task loops
synchronise, `estimate_gamma` against bare forward passes, and one head-training step; one prepared run.

On a machine with a CUDA device (about 6 minutes on an H200; `--budget-seconds` skips what does not fit, and the JSON
records it as skipped):

    python benchmarks/gpu_report.py --output benchmarks/results/gpu_report.json

It needs torch with CUDA, diffusers and accelerate, and this package importable (`pip install -e .`, or
`PYTHONPATH=.` from the repository's root). `--budget-seconds` (default 300) bounds the measuring; model set-up and
imports come on top.

On a CPU, as CI runs it (a narrow UNet, batch 2, K = 2, fp32, no compile, no sync check; the JSON has the same keys,
with `null` and a `"skipped"` reason for what is not measured):

    python benchmarks/gpu_report.py --quick --output /tmp/gpu_report.json

What is measured (random weights: the cost does not depend on them):

- `sampling`: images/s of the package's sampling loop (`sampling.sample_images`: noise, K model calls, K steps, a
  generator on the device) with the UNet of google/ddpm-cifar10-32 (35.7M parameters) at batch 64 and 256, K = 10 and
  50, fp32/fp16/bf16 models (the scheduler math in float32), for diffusers' DDPM, DDIM and DPM-Solver++ and this
  package's Analytic-DDPM, Analytic-DDIM and SN-DDPM (a noise-square head on the UNet); `eager` and `compiled`
  (`torch.compile(model)`). In each cell every sampler runs in turn, once to warm up and then `--repeats` times, so
  that machine noise hits all alike; CUDA events time each run; the median gives images/s, and `ratio_to_ddpm` divides
  by DDPM's at the same batch, K, dtype and mode.
- `sync_debug`: for each sampler, the synchronising CUDA calls (`torch.cuda.set_sync_debug_mode("warn")`) in its K
  steps (with the default `check_finite=True` ours read one flag, at the last step; with `check_finite=False`, none)
  and in the whole loop, and for ours whether the steps pass under `set_sync_debug_mode("error")`.
- `loop_syncs`: the synchronising calls of `estimate_gamma`, `dataset_nll_bits_per_dim` and `train_noise_square_head`
  for N and 2N batches (steps): equal counts mean nothing synchronises per batch.
- `estimate_gamma`: its time against the same model calls made bare, per dtype.
- `head_training`: seconds per optimizer step of `train_noise_square_head` (SN head on the UNet, fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging

from analytic_schedulers import estimate_gamma
from analytic_schedulers.likelihood import dataset_nll_bits_per_dim
from analytic_schedulers.noise_square_head import NoiseSquareHeadModel
from analytic_schedulers.runtime import write_json_atomically
from analytic_schedulers.sampling import Sampler, build_sampler, sample_images
from analytic_schedulers.training import train_noise_square_head

from overhead import CIFAR10_UNET, SMALL_UNET  # the UNet configs, kept in one place (benchmarks/ is on the path)

SAMPLERS = ["ddpm", "ddim", "dpmsolver++", "analytic-ddpm", "analytic-ddim", "sn-ddpm"]
OURS = ["analytic-ddpm", "analytic-ddim", "sn-ddpm"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_ORDER = ("bf16", "fp16", "fp32")  # compiled cells that may not all fit: the most used dtype first
GAMMA_TABLE = [0.9] * 1000  # any valid table: the cost does not depend on it
COMPILE_GUESS_S = 60.0  # seconds of one compile (UNet, or UNet with head) until one is measured


@dataclasses.dataclass(frozen=True)
class Config:
    """What a run measures. `FULL` names the JSON keys; the quick run measures the first cell of each section."""

    unet: Dict[str, Any]
    batch_sizes: Tuple[int, ...] = (64, 256)
    num_inference_steps: Tuple[int, ...] = (10, 50)
    dtypes: Tuple[str, ...] = ("fp32", "fp16", "bf16")
    modes: Tuple[str, ...] = ("eager", "compiled")
    repeats: int = 3
    sync_batch_size: int = 16
    sync_steps: int = 10
    gamma_images: int = 512
    gamma_timesteps: int = 8
    gamma_batch_size: int = 256
    head_batch_size: int = 128
    head_steps: Tuple[int, int] = (2, 12)
    loop_images: int = 64  # N of the task-loop sync counts: images for estimate_gamma and the NLL
    loop_steps: int = 4  # N for head training: optimizer steps


FULL = Config(unet=CIFAR10_UNET)
QUICK = Config(unet=SMALL_UNET, batch_sizes=(2,), num_inference_steps=(2,), dtypes=("fp32",), modes=("eager",),
               repeats=1, gamma_images=4, gamma_timesteps=2, gamma_batch_size=2, head_batch_size=2, head_steps=(1, 3))


# ---------------------------------------------------------------------------------------------------------------------
# The layout: every key of the report, whatever was measured
# ---------------------------------------------------------------------------------------------------------------------


def entry(kind: str, skipped: Optional[str]) -> Dict[str, Any]:
    """One result with all its fields `None` and the reason it was not measured (`None` once it is)."""
    fields = {
        "sampling": ["images_per_s", "seconds_median", "ratio_to_ddpm", "batch_size", "num_inference_steps"],
        "sync": ["syncs_in_steps", "syncs_in_steps_check_finite_off", "syncs_in_loop", "steps_error_mode", "error",
                 "batch_size", "num_inference_steps", "dtype"],
        "loop": ["syncs_n", "syncs_2n", "n", "unit"],
        "gamma": ["estimator_seconds", "bare_forward_seconds", "ratio", "model_calls", "num_images",
                  "num_timesteps", "batch_size"],
        "head": ["seconds_per_step", "batch_size", "steps_timed"],
    }[kind]
    return {**{name: None for name in fields}, "skipped": skipped}


def empty_report(config: Config = FULL, skipped: str = "not run") -> Dict[str, Any]:
    """The report of `config` before anything is measured: the JSON's keys, every entry skipped."""
    sampling = {mode: {dtype: {f"batch_{b}": {f"K_{k}": {name: entry("sampling", skipped) for name in SAMPLERS}
                                              for k in config.num_inference_steps}
                               for b in config.batch_sizes}
                       for dtype in config.dtypes}
                for mode in config.modes}
    return {
        "schema": "analytic-schedulers gpu_report 1",
        "quick": False,
        "command": None,
        "machine": dict.fromkeys(["device", "gpu_name", "gpu_count", "cuda", "cudnn", "torch", "diffusers",
                                  "accelerate", "python", "platform", "cpu_count", "tf32_matmul", "tf32_cudnn"]),
        "config": dict.fromkeys(["unet", "unet_parameters_millions", "batch_sizes", "num_inference_steps", "dtypes",
                                 "samplers", "repeats", "budget_seconds", "note"]),
        "sampling": sampling,
        "sync_debug": {name: entry("sync", skipped) for name in SAMPLERS},
        "loop_syncs": {task: entry("loop", skipped) for task in ("estimate_gamma", "dataset_nll", "head_training")},
        "estimate_gamma": {dtype: entry("gamma", skipped) for dtype in config.dtypes},
        "head_training": {"fp32": entry("head", skipped)},
        "elapsed_seconds": None,
    }


def key_paths(tree: Any, prefix: Tuple[str, ...] = ()) -> set:
    """Every path of keys in a JSON-like tree (the layout test compares these)."""
    if not isinstance(tree, dict):
        return {prefix}
    return {prefix} | set().union(*(key_paths(value, prefix + (key,)) for key, value in tree.items()))


# ---------------------------------------------------------------------------------------------------------------------
# Timing, budget and sync counting
# ---------------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn` takes, with CUDA events on a GPU (the stream drained before and after)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


class Budget:
    """Wall-clock seconds for the whole run; a cell that would not fit is skipped, not started."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def refuses(self, estimate_s: float) -> Optional[str]:
        """The skip reason when `estimate_s` more seconds would overrun the budget, else `None`."""
        if self.elapsed() + estimate_s <= self.seconds:
            return None
        return f"time budget: {self.elapsed():.0f} s of {self.seconds:.0f} s spent, this needs about {estimate_s:.0f} s"


class SyncWatch:
    """Counts the synchronising CUDA calls in the blocks it wraps (`with watch(): ...`), with
    `torch.cuda.set_sync_debug_mode("warn")`; `mode="error"` makes each one raise instead."""

    def __init__(self, mode: str = "warn"):
        self.mode, self.count = mode, 0

    @contextlib.contextmanager
    def __call__(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(self.mode)
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.count += sum("synchroniz" in str(w.message) for w in caught)


def can_debug_syncs(device: torch.device) -> bool:
    """`torch.cuda.set_sync_debug_mode` sees the synchronisations of CUDA devices only."""
    return device.type == "cuda"


def syncs_of(fn: Callable[[], Any]) -> int:
    """The synchronising CUDA calls `fn` makes."""
    torch.cuda.synchronize()
    watch = SyncWatch()
    with watch():
        fn()
    return watch.count


# ---------------------------------------------------------------------------------------------------------------------
# Models and samplers
# ---------------------------------------------------------------------------------------------------------------------


def build_models(config: Config, device: torch.device) -> Dict[str, Dict[str, torch.nn.Module]]:
    """Per dtype: the UNet and the UNet with a noise-square head (sharing the UNet), on the device, in eval mode."""
    torch.manual_seed(0)
    base = UNet2DModel(**config.unet).eval().to(device)
    models = {}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers suggests `torch_dtype` in from_pretrained for a cast model
    try:
        for name in config.dtypes:
            unet = copy.deepcopy(base).to(DTYPES[name])
            models[name] = {"unet": unet, "head": NoiseSquareHeadModel.from_unet(unet, covariance_type="sn").eval()}
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return models


def build_samplers(check_finite: bool = True) -> Dict[str, Sampler]:
    base = DDPMScheduler().config
    samplers = {name: build_sampler(name, base, gamma=GAMMA_TABLE) for name in SAMPLERS}
    if not check_finite:
        for name in OURS:
            scheduler = samplers[name].scheduler
            samplers[name] = dataclasses.replace(
                samplers[name], scheduler=type(scheduler).from_config(scheduler.config, check_finite=False))
    return samplers


def sample_shape(config: Config) -> Tuple[int, int, int]:
    return config.unet["in_channels"], config.unet["sample_size"], config.unet["sample_size"]


def compiled(models: Dict[str, torch.nn.Module]) -> Dict[str, torch.nn.Module]:
    """`torch.compile` of each model, one graph per input shape and dtype."""
    return {name: torch.compile(model, dynamic=False) for name, model in models.items()}


@contextlib.contextmanager
def watching_steps(scheduler, watch: SyncWatch):
    """Runs every `scheduler.step` of the block inside `watch()`."""
    step = scheduler.step

    def watched(*args, **kwargs):
        with watch():
            return step(*args, **kwargs)

    scheduler.step = watched
    try:
        yield
    finally:
        del scheduler.step


def images(num_images: int, config: Config) -> torch.Tensor:
    """Random 8-bit images in [-1, 1] on the host, `[N, C, H, W]`."""
    levels = torch.randint(0, 256, (num_images, *sample_shape(config)), generator=torch.Generator().manual_seed(0))
    return levels.float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------------------------------
# The sections; each fills its entries of the report
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What every section needs."""

    report: Dict[str, Any]
    config: Config
    models: Dict[str, Dict[str, torch.nn.Module]]
    device: torch.device
    budget: Budget
    strict: bool  # re-raise errors (quick mode, CI) instead of recording them as skipped

    def attempt(self, entries: List[Dict[str, Any]], estimate_s: float, measure: Callable[[], None]) -> None:
        """Runs `measure` unless the budget refuses; an error is recorded in `entries` (raised when strict)."""
        reason = self.budget.refuses(estimate_s)
        if reason is None:
            try:
                measure()
                return
            except Exception as error:  # noqa: BLE001  (one failed cell must not lose the rest of the report)
                if self.strict:
                    raise
                reason = f"error: {type(error).__name__}: {error}"[:500]
        _skip(entries, reason)


def run_sync_debug(run: Run) -> None:
    """Synchronising calls of each sampler's steps and loop; ours also under `set_sync_debug_mode("error")`."""
    if not can_debug_syncs(run.device):
        return _skip(run.report["sync_debug"].values(), "needs a CUDA device (torch.cuda.set_sync_debug_mode)")
    config = run.config
    dtype = "bf16" if "bf16" in config.dtypes else config.dtypes[0]
    models = run.models[dtype]
    samplers, unchecked = build_samplers(), build_samplers(check_finite=False)

    def loop(sampler: Sampler) -> None:
        model = models["head" if sampler.spec.needs_head else "unet"]
        sample_images(model, sampler, config.sync_steps, torch.Generator(run.device).manual_seed(0),
                      batch_size=config.sync_batch_size, sample_shape=sample_shape(config), device=run.device)

    def steps_syncs(sampler: Sampler, mode: str = "warn") -> int:
        watch = SyncWatch(mode)
        with watching_steps(sampler.scheduler, watch):
            loop(sampler)
        return watch.count

    for name in SAMPLERS:
        item = run.report["sync_debug"][name]

        def measure(name=name, item=item) -> None:
            loop(samplers[name])  # warm-up
            item.update(syncs_in_steps=steps_syncs(samplers[name]),
                        syncs_in_loop=syncs_of(lambda: loop(samplers[name])), batch_size=config.sync_batch_size,
                        num_inference_steps=config.sync_steps, dtype=dtype, skipped=None)
            if name in OURS:
                item["syncs_in_steps_check_finite_off"] = steps_syncs(unchecked[name])
                try:
                    steps_syncs(unchecked[name], mode="error")
                    item["steps_error_mode"] = "pass"
                except RuntimeError as error:
                    item.update(steps_error_mode="fail", error=str(error)[:300])

        run.attempt([item], 20.0, measure)


def _skip(entries, reason: str) -> None:
    """Marks entries as not measured: every field `None`, and the reason."""
    for item in entries:
        item.update(dict.fromkeys(item), skipped=reason)


def run_loop_syncs(run: Run) -> None:
    """Synchronising calls of the task loops for N and 2N batches (steps), after one warm-up run."""
    if not can_debug_syncs(run.device):
        return _skip(run.report["loop_syncs"].values(), "needs a CUDA device (torch.cuda.set_sync_debug_mode)")
    config, unet = run.config, run.models["fp32"]["unet"]
    analytic = build_sampler("analytic-ddpm", DDPMScheduler().config, gamma=GAMMA_TABLE).scheduler
    analytic.set_timesteps(3, device=run.device)
    head_unet = copy.deepcopy(unet)
    tasks = {
        "estimate_gamma": ("images, 32 a call, 2 timesteps", lambda n: estimate_gamma(
            unet, images(n, config), DDPMScheduler(), batch_size=32, timesteps=[10, 500], progress=False)),
        "dataset_nll": ("images, 32 a batch, K = 3", lambda n: dataset_nll_bits_per_dim(
            unet, analytic, images(n, config), batch_size=32)),
        "head_training": ("optimizer steps of 16 images", lambda n: train_noise_square_head(
            NoiseSquareHeadModel.from_unet(head_unet), images(64, config), DDPMScheduler(), num_steps=n,
            batch_size=16, progress=False, log_every=0)),
    }
    for task, (unit, call) in tasks.items():
        item = run.report["loop_syncs"][task]
        n = config.loop_steps if task == "head_training" else config.loop_images

        def measure(item=item, call=call, n=n, unit=unit) -> None:
            call(n)  # warm-up
            item.update(syncs_n=syncs_of(lambda: call(n)), syncs_2n=syncs_of(lambda: call(2 * n)), n=n, unit=unit,
                        skipped=None)

        run.attempt([item], 15.0, measure)


def run_gamma(run: Run) -> None:
    """`estimate_gamma` against the same model calls made bare (inputs recorded beforehand), per dtype."""
    config = run.config
    for dtype in config.dtypes:
        item = run.report["estimate_gamma"][dtype]
        run.attempt([item], 30.0, lambda item=item, dtype=dtype: measure_gamma(run, item, dtype))


def measure_gamma(run: Run, item: Dict[str, Any], dtype: str) -> None:
    config, device = run.config, run.device
    model = run.models[dtype]["unet"]
    data = images(config.gamma_images, config)
    timesteps = torch.linspace(0, 999, config.gamma_timesteps).round().long().tolist()
    kwargs = dict(timesteps=timesteps, batch_size=config.gamma_batch_size, generator=0, device=device,
                  progress=False)
    calls = []

    def recording(x, t):
        calls.append((x.clone(), t.clone()))
        return model(x, t)

    estimate_gamma(recording, data, DDPMScheduler(), dtype=DTYPES[dtype], **kwargs)

    @torch.inference_mode()
    def bare() -> None:
        for x, t in calls:
            model(x, t)

    def estimator() -> None:
        estimate_gamma(model, data, DDPMScheduler(), **kwargs)

    times = {bare: [], estimator: []}
    for repeat in range(1 + config.repeats):
        for fn, values in times.items():
            seconds = timed(fn, device)
            if repeat:
                values.append(seconds)
    bare_s, estimator_s = statistics.median(times[bare]), statistics.median(times[estimator])
    item.update(estimator_seconds=estimator_s, bare_forward_seconds=bare_s, ratio=estimator_s / bare_s,
                model_calls=len(calls), num_images=config.gamma_images, num_timesteps=len(timesteps),
                batch_size=config.gamma_batch_size, skipped=None)


def run_head(run: Run) -> None:
    """Seconds per optimizer step: runs of two lengths, the difference of their medians over the extra steps."""
    config, device = run.config, run.device
    item = run.report["head_training"]["fp32"]
    unet = copy.deepcopy(run.models["fp32"]["unet"])
    data = images(max(256, config.head_batch_size), config)
    short, long = config.head_steps

    def train(num_steps: int) -> float:
        model = NoiseSquareHeadModel.from_unet(unet, covariance_type="sn")
        return timed(lambda: train_noise_square_head(model, data, DDPMScheduler(), num_steps=num_steps,
                                                     batch_size=config.head_batch_size, progress=False,
                                                     log_every=0), device)

    def measure() -> None:
        train(short)  # warm-up
        times = {short: [], long: []}
        for _ in range(max(2, config.repeats)):
            for num_steps, values in times.items():
                values.append(train(num_steps))
        per_step = (statistics.median(times[long]) - statistics.median(times[short])) / (long - short)
        item.update(seconds_per_step=per_step, batch_size=config.head_batch_size, steps_timed=long - short,
                    skipped=None)

    run.attempt([item], 30.0, measure)



def run_sampling(run: Run) -> None:
    """Every cell of the sampling table, eager first; the keys are the full run's (a quick run fills the first)."""
    config, costs = run.config, CellCosts(run)
    for mode in config.modes:
        failed: Dict[str, str] = {}  # samplers that failed in this mode (a model that does not compile)
        dtypes = config.dtypes if mode == "eager" else [d for d in COMPILE_ORDER if d in config.dtypes]
        for dtype in dtypes:
            models = run.models[dtype] if mode == "eager" else compiled(run.models[dtype])
            for batch_key, batch in zip(FULL.batch_sizes, config.batch_sizes):
                graphs = 0 if mode == "eager" else 1 + ("sn-ddpm" not in failed)  # to compile: UNet, UNet + head
                for k_key, steps in zip(FULL.num_inference_steps, config.num_inference_steps):
                    cells = run.report["sampling"][mode][dtype][f"batch_{batch_key}"][f"K_{k_key}"]
                    warm_up: List[float] = []
                    estimate = costs.estimate(dtype, batch, steps, graphs)
                    run.attempt(list(cells.values()), estimate, lambda: warm_up.append(
                        measure_cell(run, cells, models, DTYPES[dtype], batch, steps, failed)))
                    if graphs and warm_up:  # compiled now: measure what a compile costs, for the next estimates
                        costs.compile_s, graphs = warm_up[0] / graphs, 0


class CellCosts:
    """The budget's estimate of a sampling cell: repeated runs of K eager forward passes, plus compiles."""

    def __init__(self, run: Run):
        self.run, self.compile_s, self.forward_s = run, COMPILE_GUESS_S, {}

    def estimate(self, dtype: str, batch: int, steps: int, graphs: int) -> float:
        if (dtype, batch) not in self.forward_s:
            self.forward_s[(dtype, batch)] = forward_seconds(self.run, dtype, batch)
        runs = (1 + self.run.config.repeats) * len(SAMPLERS)
        return 1.3 * runs * steps * self.forward_s[(dtype, batch)] + graphs * self.compile_s


def forward_seconds(run: Run, dtype: str, batch: int) -> float:
    """One eager forward pass of the UNet (after one to warm up), for the budget's estimates."""
    unet = run.models[dtype]["unet"]
    x = torch.zeros((batch, *sample_shape(run.config)), device=run.device, dtype=DTYPES[dtype])
    t = torch.full((batch,), 500, device=run.device)
    with torch.inference_mode():
        unet(x, t)
        return timed(lambda: unet(x, t), run.device)


def measure_cell(run: Run, cells: Dict[str, Dict[str, Any]], models: Dict[str, torch.nn.Module], dtype: torch.dtype,
                 batch: int, steps: int, failed: Dict[str, str]) -> float:
    """Every sampler in turn, once to warm up and `repeats` times timed; fills `cells`, returns the warm-up's
    seconds (compiles, in compiled mode). A sampler whose warm-up fails is recorded as skipped, added to `failed`
    and not tried again in later cells of the mode."""
    samplers = build_samplers()

    def sample(name: str, seed: int) -> float:
        sampler = samplers[name]
        model = models["head" if sampler.spec.needs_head else "unet"]
        generator = torch.Generator(run.device).manual_seed(seed)
        return timed(lambda: sample_images(model, sampler, steps, generator, batch_size=batch,
                                           sample_shape=sample_shape(run.config), device=run.device, dtype=dtype),
                     run.device)

    warm_up: Dict[str, float] = {}
    for name in SAMPLERS:
        if name in failed:
            _skip([cells[name]], failed[name])
            continue
        run.attempt([cells[name]], 0.0, lambda name=name: warm_up.update({name: sample(name, 0)}))
        if (cells[name]["skipped"] or "").startswith("error"):
            failed[name] = f"{cells[name]['skipped']} (in the first cell of this mode that tried it)"
    times = {name: [] for name in warm_up}
    for repeat in range(1, 1 + run.config.repeats):
        for name, values in times.items():
            values.append(sample(name, repeat))
    ddpm = statistics.median(times["ddpm"]) if "ddpm" in times else None
    for name, values in times.items():
        median = statistics.median(values)
        cells[name].update(images_per_s=batch / median, seconds_median=median,
                           ratio_to_ddpm=None if ddpm is None else ddpm / median, batch_size=batch,
                           num_inference_steps=steps, skipped=None)
    return sum(warm_up.values())


# ---------------------------------------------------------------------------------------------------------------------
# The machine, the table, the command
# ---------------------------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> Dict[str, Any]:
    import accelerate
    import diffusers

    cuda = device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TF32 flags are deprecated in favour of `fp32_precision`
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    return {
        "device": str(device), "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "tf32_matmul": tf32[0], "tf32_cudnn": tf32[1],
    }


def describe(report: Dict[str, Any], config: Config, unet: torch.nn.Module, quick: bool, budget_s: float,
             argv: List[str]) -> None:
    """The report's `command` and `config`."""
    report["quick"] = quick
    report["command"] = " ".join(["python", "benchmarks/gpu_report.py", *argv])
    report["config"].update(
        unet="narrow quick-mode UNet (benchmarks/overhead.py SMALL_UNET)" if quick else
        "the UNet2DModel architecture of google/ddpm-cifar10-32, random weights",
        unet_parameters_millions=round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        batch_sizes=list(config.batch_sizes), num_inference_steps=list(config.num_inference_steps),
        dtypes=list(config.dtypes), samplers=SAMPLERS, repeats=config.repeats,
        budget_seconds=None if budget_s == float("inf") else budget_s,
        note=("quick mode: the keys are the full run's; the measured entries (the first cell of each section) record "
              "their own batch_size and num_inference_steps") if quick else None,
    )


def print_tables(report: Dict[str, Any]) -> None:
    m, c = report["machine"], report["config"]
    print(f"{m['gpu_name'] or 'CPU'} ({m['device']}); torch {m['torch']}, CUDA {m['cuda']}, diffusers "
          f"{m['diffusers']}; UNet: {c['unet']}, {c['unet_parameters_millions']}M parameters; medians of "
          f"{c['repeats']} timed run(s) after one warm-up")
    print("\nsampling: images/s (ratio to ddpm in the same run)")
    print(f"{'mode':<9}{'dtype':<6}{'batch':>6}{'K':>4}" + "".join(f"{name:>16}" for name in SAMPLERS))
    for mode, by_dtype in report["sampling"].items():
        for dtype, by_batch in by_dtype.items():
            for batch, by_k in by_batch.items():
                for k, cells in by_k.items():
                    if all(cell["skipped"] for cell in cells.values()):
                        continue
                    row = "".join(_cell_text(cell) for cell in cells.values())
                    first = next(cell for cell in cells.values() if not cell["skipped"])
                    print(f"{mode:<9}{dtype:<6}{first['batch_size']:>6}{first['num_inference_steps']:>4}{row}")
    print("\nsynchronising CUDA calls: in the K steps / with check_finite=False / in the whole loop; steps under "
          "set_sync_debug_mode('error')")
    for name, item in report["sync_debug"].items():
        print(f"  {name:<14}" + (item["skipped"] if item["skipped"] else
              f"{item['syncs_in_steps']} / {_or_dash(item['syncs_in_steps_check_finite_off'])} / "
              f"{item['syncs_in_loop']}   {_or_dash(item['steps_error_mode'])}"))
    print("\ntask loops, synchronising calls for N and 2N:")
    for task, item in report["loop_syncs"].items():
        print(f"  {task:<15}" + (item["skipped"] or f"{item['syncs_n']} and {item['syncs_2n']} (N = {item['n']} "
                                  f"{item['unit']})"))
    print("\nestimate_gamma / bare forward passes:")
    for dtype, item in report["estimate_gamma"].items():
        print(f"  {dtype:<6}" + (item["skipped"] or f"{item['estimator_seconds']:.3f} s / "
                                 f"{item['bare_forward_seconds']:.3f} s = {item['ratio']:.3f} "
                                 f"({item['model_calls']} calls of {item['batch_size']})"))
    head = report["head_training"]["fp32"]
    print("\nhead training, fp32: " + (head["skipped"] or f"{head['seconds_per_step'] * 1e3:.2f} ms per step of "
                                       f"{head['batch_size']} images"))
    print(f"\n{report['elapsed_seconds']:.0f} s")


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _cell_text(cell: Dict[str, Any]) -> str:
    if cell["skipped"]:
        return f"{'skipped':>16}"
    ratio = "" if cell["ratio_to_ddpm"] is None else f"x{cell['ratio_to_ddpm']:.2f}"
    return f"{cell['images_per_s']:>10.1f} {ratio:<5}"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: narrow UNet, batch 2, K = 2, fp32.")
    parser.add_argument("--output", default=None, help="The JSON file (default: benchmarks/results/gpu_report.json, "
                                                       "gpu_report_quick.json with --quick).")
    parser.add_argument("--budget-seconds", type=float, default=300.0,
                        help="Skip the cells that would end after this many seconds (not with --quick).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed runs per cell (default 3, 1 with --quick).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: the full report is for a GPU machine. On a CPU, run it with --quick.")
    config = QUICK if args.quick else FULL
    if args.repeats:
        config = dataclasses.replace(config, repeats=args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    for limit in ("recompile_limit", "cache_size_limit"):  # one graph per dtype, batch and model
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    output = args.output or os.path.join(results, "gpu_report_quick.json" if args.quick else "gpu_report.json")
    budget = Budget(float("inf") if args.quick else args.budget_seconds)
    device = torch.device("cpu" if args.quick else "cuda")
    report = empty_report(FULL, "quick mode: only the first cell of each section runs, on the CPU" if args.quick
                          else "not run")
    models = build_models(config, device)
    describe(report, config, models["fp32"]["unet"], args.quick, budget.seconds, argv)
    report["machine"] = machine(device)
    run = Run(report, config, models, device, budget, strict=args.quick)
    for section in (run_sync_debug, run_loop_syncs, run_gamma, run_head, run_sampling):
        section(run)
        report["elapsed_seconds"] = budget.elapsed()
        write_json_atomically(output, report, indent=1)  # after every section: a crash keeps what was measured
    print_tables(report)
    print(f"written to {output}")
    return report


if __name__ == "__main__":
    main()

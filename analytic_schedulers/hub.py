"""Publishing Gamma tables and heads on the Hugging Face Hub, in a layout diffusers' own loaders accept.

A published table is a scheduler folder, `analytic_scheduler/` by default, in a model repository: the repository
keeps its native `scheduler/` in `model_index.json` (so `DiffusionPipeline.from_pretrained` downloads it with no
custom code), and the table loads with

    AnalyticDPMScheduler.from_pretrained(repo_id, subfolder="analytic_scheduler")

A trained head is a `NoiseSquareHead` folder, `sn_head/` or `npr_head/`, composed with the pipeline's UNet at load time
(`load_head_model(repo_id, unet=pipe.unet, subfolder="sn_head")`). Each folder carries a `README.md` that says what it
was made from, so that a stranger can judge the table or head before using it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from huggingface_hub import HfApi

from .loading import GAMMA_SUBFOLDER as GAMMA_PATH_IN_REPO
from .loading import MODEL_CONFIG, SCHEDULER_CONFIG
from .training import LOSS_HISTORY

GAMMA_ESTIMATE = "gamma_estimate.json"
TRAINING_ARGS = "training_args.json"
CARD = "README.md"
HEAD_IGNORE = ["checkpoints/*", "*.tmp", ".*"]

__all__ = ["GAMMA_PATH_IN_REPO", "gamma_card", "head_card", "push_gamma_to_hub", "push_head_to_hub",
           "write_gamma_folder"]


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------------------------
# Folders and their cards
# ---------------------------------------------------------------------------------------------------------------------


def write_gamma_folder(folder: Union[str, os.PathLike], estimate, scheduler_config, settings: Optional[dict] = None,
                       fill=None):
    """
    Writes a ready scheduler folder: `gamma_estimate.json` (table, standard errors, sums and `settings`), then
    `scheduler_config.json` (an `AnalyticDPMScheduler` on the model's schedule with the table: the file loaders look
    for, written last), then its `README.md` card. Every file is replaced atomically.

    Args:
        folder: where to write (created if needed).
        estimate (`GammaEstimate` or `PipelineGammaEstimate`): the estimate; a `PipelineGammaEstimate` also records
            what it was estimated for in the config (`gamma_sample_shape`, `gamma_guidance_scale`, ...).
        scheduler_config: the model's own scheduler config (betas, spacing, prediction type).
        settings (`dict`, *optional*): how the estimate was made (`model`, `data`, `num_samples`, `seed`,
            `timesteps`, ...), kept in `gamma_estimate.json` and shown on the card.
        fill: how a partial table was completed (`"interpolate"` or a number); required for a partial estimate.

    Returns:
        The `AnalyticDPMScheduler` that was written.
    """
    from .runtime import write_text_atomically

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table_fill = None if estimate.is_complete else fill
    scheduler = estimate.to_scheduler(scheduler_config, fill=table_fill)
    sums = getattr(estimate, "estimate", estimate)  # the `GammaEstimate` of a `PipelineGammaEstimate`
    sums.save(folder / GAMMA_ESTIMATE, extra={"settings": settings or {}, "fill": table_fill})
    write_text_atomically(folder / SCHEDULER_CONFIG, scheduler.to_json_string())
    write_text_atomically(folder / CARD, gamma_card(folder))
    return scheduler


def gamma_card(folder: Union[str, os.PathLike]) -> str:
    """The model card of a scheduler folder: what the table was estimated from, read from its files."""
    folder = Path(folder)
    config = json.loads((folder / SCHEDULER_CONFIG).read_text(encoding="utf-8"))
    state = json.loads((folder / GAMMA_ESTIMATE).read_text(encoding="utf-8")) if (folder / GAMMA_ESTIMATE).is_file() \
        else {}
    settings = state.get("settings", {})
    stderr = [v for v in state.get("gamma_stderr", []) if v is not None]
    estimated = state.get("timesteps_estimated")
    T = config.get("num_train_timesteps")
    rows = {
        "model": settings.get("model", "unknown"),
        "data": settings.get("data", "unknown"),
        "images M": state.get("num_samples", "unknown"),
        "timesteps estimated": "unknown" if estimated is None else (
            f"all {T}" if len(estimated) == T else f"{len(estimated)} of {T}: {_short_list(estimated)}"),
        "filled": state.get("fill") or "nothing (every timestep estimated)",
        "seed": settings.get("seed", "unknown"),
        "largest standard error of Gamma_t": f"{max(stderr):.3g}" if stderr else "unknown",
        "schedule": f"{config.get('beta_schedule')}, beta {config.get('beta_start')}..{config.get('beta_end')}, "
                    f"T = {T}, {config.get('prediction_type')}",
        **_record_rows(config, settings),
        "package": f"analytic-schedulers {_version()}",
    }
    return _card(
        base_model=settings.get("model"),
        title=f"Analytic-DPM Gamma table for {rows['model']}",
        intro="The table `Gamma_t = E||eps_theta(x_t, t)||^2 / d` of Analytic-DPM (Bao et al., ICLR 2022), "
              "estimated by Monte Carlo: the optimal reverse variance of every step follows from it.",
        rows=rows,
        usage=("import analytic_schedulers  # before diffusers loads anything of this package\n"
               "from analytic_schedulers import AnalyticDPMScheduler, use_analytic_dpm\n\n"
               f"table = AnalyticDPMScheduler.from_pretrained(REPO_ID, subfolder={GAMMA_PATH_IN_REPO!r})\n"
               "use_analytic_dpm(pipe, table)  # checks it fits the pipeline; or: pipe.scheduler = table"),
    )


def _record_rows(config: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, str]:
    """The card's rows on what the table was estimated for, when its config records it: the denoiser's inputs,
    their encoding, the conditioning and the guidance scale."""
    shape = config.get("gamma_sample_shape")
    if shape is None:
        return {}
    latent = config.get("gamma_latent")
    encodings = {"sample": "a draw from the VAE posterior", "mean": "the VAE posterior mean",
                 "deterministic": "the deterministic encoder"}
    rows = {"inputs": f"pixels {shape}" if latent is None else
            f"latents {shape} ({encodings[latent]}), bound max_x0_variance = {config.get('max_x0_variance'):.4g}"}
    conditioning = config.get("gamma_conditioning")
    if conditioning is not None:
        described = {"captions": f"one caption per image ({settings.get('captions', 'a captions file')})",
                     "prompt": f"the prompt {settings.get('prompt')!r}", "empty": "the empty prompt"}
        rows["conditioning"] = described[conditioning]
        scale = config.get("gamma_guidance_scale")
        rows["guidance scale"] = "none (the empty prompt's prediction)" if scale is None else (
            f"{scale:g}: sample at this scale (another scale warns)")
    return rows


def head_card(folder: Union[str, os.PathLike], base_model: Optional[str] = None) -> str:
    """The model card of a head folder (config, and `loss_history.json` / `training_args.json` when present)."""
    folder = Path(folder)
    config = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
    history_path = folder / LOSS_HISTORY
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else {}
    losses = history.get("losses", [])
    training = folder / TRAINING_ARGS
    args: Dict[str, Any] = json.loads(training.read_text(encoding="utf-8")) if training.is_file() else {}
    base_model = base_model or args.get("model")
    kind = config.get("covariance_type", "sn")
    recipe = args.get("recipe", history.get("recipe", "plain" if "steps" in args else None))
    rows = {
        "backbone": base_model or "unknown",
        "covariance type": f"{kind} (h ~ " + ("E[eps^2 | x_t])" if kind == "sn" else "E[(eps - eps_hat)^2 | x_t])"),
        "data": args.get("data", "unknown"),
        "recipe": HEAD_RECIPES.get(recipe, "unknown"),
        "training": ", ".join(f"{k} {_card_value(args[k])}" for k in HEAD_TRAINING_KEYS.get(recipe, ()) if k in args)
                    or "unknown",
        "CPU seconds": f"{args['cpu_seconds']:.0f} (main process, {args.get('num_processes', 1)} in all)"
                       if "cpu_seconds" in args else "unknown",
        "final loss": _final_loss(losses, recipe),
        "package": f"analytic-schedulers {_version()}",
    }
    return _card(
        base_model=base_model,
        title=f"{kind.upper()}-DPM noise-square head for {rows['backbone']}",
        intro=f"A small head on the frozen backbone's last feature map that predicts `h`, the per-pixel variance "
              f"input of {kind.upper()}-DPM (Bao et al., ICML 2022). Sample with `SNDPMScheduler` "
              f"(`covariance_type={kind!r}`).",
        rows=rows,
        usage=("import analytic_schedulers\n"
               "from analytic_schedulers import SNDPMScheduler\n"
               "from analytic_schedulers.noise_square_head import load_head_model\n\n"
               f"pipe.unet = load_head_model(REPO_ID, unet=pipe.unet, subfolder={kind + '_head'!r})\n"
               f"pipe.scheduler = SNDPMScheduler.from_config(pipe.scheduler.config, covariance_type={kind!r})"),
    )


HEAD_RECIPES = {
    "cached": "cached: one backbone pass per draw, then the output layer fitted by L-BFGS on the ELBO's step KL",
    "plain": "plain: Adam on the squared error of h, EMA of the weights (Bao et al.)",
}
HEAD_TRAINING_KEYS = {"cached": ("draws", "fit_steps", "loss", "seed"), "plain": ("steps", "batch_size", "lr", "seed")}


def _card_value(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _final_loss(losses, recipe: Optional[str]) -> str:
    if not losses:
        return "unknown"
    if recipe == "cached":
        return f"{losses[-1]:.5f} (the fit's objective at its last evaluation)"
    return f"{sum(losses[-100:]) / len(losses[-100:]):.5f} (mean of the last steps)"


def _short_list(values, most: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:most])
    return shown + (", ..." if len(values) > most else "")


def _card(base_model: Optional[str], title: str, intro: str, rows: Dict[str, Any], usage: str) -> str:
    front = ["---", "library_name: diffusers", "tags:", "- analytic-dpm", "- analytic-schedulers"]
    if base_model and not os.path.isabs(str(base_model)) and str(base_model).count("/") == 1:
        front.append(f"base_model: {base_model}")
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items())
    return "\n".join(front + ["---", "", f"# {title}", "", intro, "", "| | |", "|---|---|", table, "",
                              "## Use", "", "```python", usage, "```", ""])


# ---------------------------------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------------------------------


def push_gamma_to_hub(folder: Union[str, os.PathLike], repo_id: str, path_in_repo: str = GAMMA_PATH_IN_REPO,
                      token: Optional[str] = None, private: Optional[bool] = None, revision: Optional[str] = None,
                      commit_message: Optional[str] = None, create_pr: bool = False):
    """
    Uploads a scheduler folder (from `write_gamma_folder` or `analytic-schedulers estimate-gamma`) to
    `repo_id/path_in_repo`, with its card. Load it back with
    `AnalyticDPMScheduler.from_pretrained(repo_id, subfolder=path_in_repo)`.

    Args:
        folder: the scheduler folder (`scheduler_config.json` with a `gamma` table).
        repo_id: the model repository (created if missing).
        path_in_repo: the folder in the repository (default `analytic_scheduler`, beside the pipeline's own).
        token, private, revision, commit_message, create_pr: as in `huggingface_hub.HfApi.upload_folder`
            (`revision` is a branch, created if missing).

    Returns:
        The `CommitInfo` of the upload.
    """
    folder = Path(folder)
    config_path = folder / SCHEDULER_CONFIG
    if not config_path.is_file() or json.loads(config_path.read_text(encoding="utf-8")).get("gamma") is None:
        raise ValueError(f"{str(folder)!r} holds no scheduler_config.json with a Gamma table: write it with "
                         "`analytic-schedulers estimate-gamma --output` (or `write_gamma_folder`) first.")
    if not (folder / CARD).is_file():
        from .runtime import write_text_atomically

        write_text_atomically(folder / CARD, gamma_card(folder))
    message = commit_message or f"Analytic-DPM Gamma table in {path_in_repo}/"
    return _upload(folder, repo_id, path_in_repo, token, private, revision, message, create_pr, ignore=[".*"])


def push_head_to_hub(folder: Union[str, os.PathLike], repo_id: str, path_in_repo: Optional[str] = None,
                     token: Optional[str] = None, private: Optional[bool] = None, revision: Optional[str] = None,
                     commit_message: Optional[str] = None, create_pr: bool = False, base_model: Optional[str] = None):
    """
    Uploads a trained head folder (a `NoiseSquareHead`: `config.json` and its weights, as `train-head --output`
    leaves it; checkpoints stay behind) to `repo_id/path_in_repo`, default `sn_head` or `npr_head`, with its card.

    Arguments as in `push_gamma_to_hub`; `base_model` names the backbone on the card.
    """
    from .runtime import write_text_atomically

    folder = Path(folder)
    if not (folder / MODEL_CONFIG).is_file():
        raise ValueError(f"{str(folder)!r} holds no head (config.json): train one with `analytic-schedulers "
                         "train-head --output` first.")
    kind = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8")).get("covariance_type", "sn")
    path_in_repo = path_in_repo or f"{kind}_head"
    write_text_atomically(folder / CARD, head_card(folder, base_model))
    message = commit_message or f"{kind.upper()}-DPM noise-square head in {path_in_repo}/"
    return _upload(folder, repo_id, path_in_repo, token, private, revision, message, create_pr, ignore=HEAD_IGNORE)


def _upload(folder: Path, repo_id: str, path_in_repo: str, token, private, revision, message, create_pr, ignore):
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                             commit_message=message, token=token, revision=revision, create_pr=create_pr,
                             ignore_patterns=ignore)

"""The commands share one loader and one image reader: the same bad input gives the same message everywhere."""

import pytest

from analytic_schedulers.cli import main
from analytic_schedulers.loading import BUNDLED_MODEL

COMMANDS = {  # command: what it needs besides --model and --data
    "sample": ["--steps", "2", "--num-images", "1", "--no-progress"],
    "nll": ["--steps", "2", "--num-images", "1", "--no-progress"],
    "estimate-gamma": ["--steps", "2", "--no-progress"],
    "train-head": ["--steps", "1", "--no-progress"],
}


def error_of(capsys, command, *args, tmp_path):
    output = ["--output", str(tmp_path / f"{command}.out")] if command != "nll" else []
    assert main([command, *args, *COMMANDS[command], *output]) == 2
    err = capsys.readouterr().err.strip()
    prefix = f"analytic-schedulers {command}: error: "
    assert err.startswith(prefix) and "\n" not in err, err  # one line, no traceback
    return err[len(prefix):]


def test_a_missing_model_folder_gives_the_same_message_in_every_command(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    messages = {command: error_of(capsys, command, "--model", missing,
                                  *(["--data", "sklearn-digits"] if command != "sample" else []), tmp_path=tmp_path)
                for command in COMMANDS}
    assert len(set(messages.values())) == 1, messages
    message = messages["sample"]
    assert missing in message and "does not exist" in message and "Hub id" in message  # what is wrong, how to fix


def test_an_empty_folder_is_not_a_model_in_any_command(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    messages = {command: error_of(capsys, command, "--model", str(empty),
                                  *(["--data", "sklearn-digits"] if command != "sample" else []), tmp_path=tmp_path)
                for command in COMMANDS}
    assert len(set(messages.values())) == 1, messages
    assert "holds no diffusers model" in messages["nll"]


@pytest.mark.parametrize("bad", ["missing", "empty"])
def test_a_bad_data_folder_gives_the_same_message_in_every_command_that_reads_data(tmp_path, capsys, bad):
    folder = tmp_path / "images"
    if bad == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image")
    messages = {command: error_of(capsys, command, "--model", str(BUNDLED_MODEL), "--data", str(folder),
                                  tmp_path=tmp_path)
                for command in COMMANDS if command != "sample"}
    assert len(set(messages.values())) == 1, messages
    assert str(folder) in messages["nll"]
    assert ("does not exist" if bad == "missing" else "No images") in messages["nll"]


@pytest.mark.parametrize("command", ["train-head", "nll"])
def test_pixel_only_commands_refuse_a_latent_pipeline(tmp_path, capsys, command):
    from tiny_pipelines import saved_tiny_stable_diffusion

    model = saved_tiny_stable_diffusion(tmp_path / "sd")
    capsys.readouterr()  # what saving printed
    assert "not supported" in error_of(capsys, command, "--model", str(model), "--data", "sklearn-digits",
                                       tmp_path=tmp_path)

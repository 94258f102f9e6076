"""`--recipe paper` is the paper's setting, exactly as gsae trained it before its defaults
changed; the defaults are not it; recipes are run settings like any other, and a resumed run
refuses another one (or any setting it cannot change) by its flag's name."""

import math

import pytest
import torch

from gsae.cli.train import main, parser, resumed_settings, setting_flags, settings_from_args
from gsae.run import RunFolder
from gsae.sae import WEIGHT_NAMES, Sae, SaeConfig
from gsae.synthetic import SparseFeatures
from gsae.train.step import SaeTrainer

# Produced by the code of commit 5cb6572, whose defaults were then the paper's
# optimiser: SaeConfig(d=32, num_latents=256, k=8, dead_threshold=512, init_encoder="paper",
# init_b_dec="zeros"), 12 steps of 128 tokens of SparseFeatures(d=32, seed=1000) on one thread
# (AuxK on from step 5), then the FVU on 1,024 more tokens and the sums of the weights.
PAPER_LOSSES = [
    2.0211784839630127,
    1.9720913171768188,
    1.8410489559173584,
    1.8585947751998901,
    1.7339695692062378,
    1.6064543724060059,
    1.6083680391311646,
    1.5273765325546265,
    1.4181787967681885,
    1.3982023000717163,
    1.3428771495819092,
    1.3163877725601196,
]
PAPER_FVU = 1.1357029676437378
PAPER_SUMS = [-92.10012352146441, -3.218376803211868, -1.731028778511245, 0.5798063157126307]
FLAGS = [
    "--model",
    "demo",
    "--dataset",
    "demo",
    "--expansion-factor",
    "8",
    "--k",
    "8",
    "--dead-threshold",
    "512",
]


def train_synthetic(cfg: SaeConfig):
    data = SparseFeatures(d=32, seed=1000)
    trainer = SaeTrainer(Sae(cfg))
    losses = [float(trainer.step(data.batch(128)).loss) for _ in range(12)]
    held = data.batch(1024)
    with torch.no_grad(), trainer.averaged():
        fvu = float(trainer.sae(held).loss.fvu)
        sums = [float(getattr(trainer.sae, n).double().sum()) for n in WEIGHT_NAMES]
    return losses, fvu, sums


def test_paper_recipe_reproduces_the_numbers_of_the_code_before_the_new_defaults(one_thread):
    s = settings_from_args(parser().parse_args([*FLAGS, "--recipe", "paper"]))
    cfg = s.sae_config(32)
    assert cfg.m == 256 and cfg.optimizer == "adam" and s.model_dtype == "fp32"
    assert s.sae_precision == "fp32"  # IEEE fp32 matmuls on a GPU too, as the paper trained
    assert cfg.lr_value == pytest.approx(2e-4 / math.sqrt(256 / 2**14))
    losses, fvu, sums = train_synthetic(cfg)
    assert losses == PAPER_LOSSES  # bit for bit
    assert fvu == PAPER_FVU and sums == PAPER_SUMS


def test_the_defaults_are_not_the_paper_recipe(one_thread):
    """The same run with the defaults: another optimiser, init and trajectory (this fails if the
    defaults regress to the paper's setting)."""
    cfg = settings_from_args(parser().parse_args(FLAGS)).sae_config(32)
    assert cfg.optimizer == "signum" and cfg.average_power == 2.0 and cfg.init_encoder == "fit"
    assert cfg.lr_value == pytest.approx(2.5e-3 / math.sqrt(256 / 2**14))
    losses, fvu, _ = train_synthetic(cfg)
    assert losses[0] != PAPER_LOSSES[0]  # the fitted init already changes the first step
    assert fvu < 0.5 * PAPER_FVU, fvu


def test_flags_override_the_recipe():
    s = settings_from_args(
        parser().parse_args([*FLAGS, "--recipe", "paper", "--init", "fit", "--model-dtype", "bf16"])
    )
    cfg = s.sae_config(32)
    assert (cfg.init_encoder, cfg.init_b_dec, cfg.optimizer) == ("fit", "zeros", "adam")
    assert s.model_dtype == "bf16" and s.recipe == "paper"


def test_resume_refuses_another_recipe_by_name(tmp_path):
    RunFolder(tmp_path).write_settings(settings_from_args(parser().parse_args(FLAGS)).to_json())
    with pytest.raises(ValueError, match="--recipe"):
        resumed_settings(parser().parse_args(["--resume", str(tmp_path), "--recipe", "paper"]))
    with pytest.raises(ValueError, match="--average-power"):
        resumed_settings(parser().parse_args(["--resume", str(tmp_path), "--average-power", "0"]))
    same = resumed_settings(parser().parse_args(["--resume", str(tmp_path), "--recipe", "default"]))
    assert same.recipe == "default"


def test_resume_refusal_names_the_flag_as_typed(tmp_path, capsys):
    """--init is stored as init_encoder: the refusal names --init, the flag that exists."""
    RunFolder(tmp_path).write_settings(settings_from_args(parser().parse_args(FLAGS)).to_json())
    assert main(["--resume", str(tmp_path), "--init", "paper"]) == 2
    err = capsys.readouterr().err
    assert "these cannot change: --init (the run has 'fit')" in err and "--init-" not in err


def test_every_stored_setting_maps_to_a_flag_of_the_parser():
    stored = settings_from_args(parser().parse_args(FLAGS)).flags()
    flags = setting_flags(parser())
    options = {o for a in parser()._actions for o in a.option_strings}
    assert set(stored) <= set(flags), set(stored) - set(flags)
    assert all(flags[k] in options for k in stored)
    assert flags["init_encoder"] == "--init" and flags["ctx_len"] == "--ctx-len"


def test_a_signum_config_saved_before_average_power_loads_as_it_was():
    """cfg.json of a signum SAE written before the defaults changed (no average_power, lr unset):
    sparsify's plain mean at its learning rate, not the new defaults; one without an optimizer:
    Adam."""
    old = {
        k: v
        for k, v in SaeConfig(d=64, optimizer="signum").to_dict().items()
        if k != "average_power"
    }
    cfg = SaeConfig.from_dict(old)
    assert cfg.average_power == 0.0
    assert cfg.lr_value == pytest.approx(5e-3 / math.sqrt(1024 / 2**14))
    older = {k: v for k, v in old.items() if k != "optimizer"}
    assert SaeConfig.from_dict(older).optimizer == "adam"


def test_each_layer_set_gets_its_own_init_seed():
    """A group SAE and a per-layer SAE of the same run seed must not share a random decoder
    (MMCS between the runs would then measure the init), while a rerun reproduces it."""
    from gsae.train.settings import sae_seed

    seeds = {tuple(layers): sae_seed(0, layers) for layers in ([0], [0, 1, 2], [1], [5])}
    assert len(set(seeds.values())) == len(seeds)
    assert sae_seed(0, [2, 1, 0]) == seeds[(0, 1, 2)] and sae_seed(1, [0]) != seeds[(0,)]

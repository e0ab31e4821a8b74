"""The config itself: choices as enums (plain strings in and out), moved keys, old saved configs, the
validation layers (static checks in config.py, registry checks in metalearn/validation.py) and the
derived evaluation defaults."""
import dataclasses
import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from metalearn import config as C
from metalearn import validation
from metalearn.algorithms import registry
from metalearn.config import Config, from_dict, load_config, to_dict
from metalearn.errors import MetalearnError


def _choice_types():
    return [t for t in vars(C).values() if isinstance(t, type) and issubclass(t, C.Choice) and t is not C.Choice]


def test_choice_members_are_named_as_their_values_and_behave_as_strings():
    assert {t.__name__ for t in _choice_types()} >= {"Rotation", "Split", "BatchNorm", "Execution", "Dtype",
                                                     "Precision", "WandbMode", "Head", "HeadInit", "Optimizer",
                                                     "Augment"}
    for t in _choice_types():
        for m in t:
            assert m.name == m.value  # OmegaConf parses a string by member name
            assert m == m.value and hash(m) == hash(m.value)
            assert str(m) == f"{m}" == m.value and repr(m) == repr(m.value)
    assert getattr(torch, C.Dtype.float64) is torch.float64
    assert {"loop": 1}[C.Execution.loop] == 1 and C.EXECUTIONS == ("auto", "loop", "batched", "hybrid")


def test_strings_in_plain_strings_out_and_the_round_trips():
    cfg = load_config(None, ["outer.execution=hybrid", "precision=bf16", "eval.split=val", "data.rotation=per_task",
                             "transfer.pretrain.augment=[crop,flip]", "tracking.wandb.mode=offline"])
    assert cfg.outer.execution is C.Execution.hybrid and cfg.outer.execution == "hybrid"
    assert cfg.transfer.pretrain.augment == ["crop", "flip"] and cfg.eval.split == "val"
    d = to_dict(cfg)
    assert d["outer"]["execution"] == "hybrid" and type(d["outer"]["execution"]) is str
    assert all(type(v) is str for v in d["transfer"]["pretrain"]["augment"])
    yaml.safe_dump(d)  # plain types only
    json.dumps(d)
    # a checkpoint stores to_dict(cfg) and is read with weights_only=True
    assert from_dict(d) == cfg and from_dict(json.loads(json.dumps(d))) == cfg
    # config.yaml as train.py writes it
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert "execution: hybrid" in text and from_dict(OmegaConf.to_container(OmegaConf.create(text))) == cfg


def test_a_bad_choice_is_refused_by_its_type_with_the_choices():
    with pytest.raises(MetalearnError, match=r"outer.execution: Invalid value 'fast', expected one of "
                                             r"\[auto, loop, batched, hybrid\]"):
        load_config(None, ["outer.execution=fast"])
    cfg = Config()
    cfg.model.batchnorm = "instance"  # set by assignment: OmegaConf never saw it
    with pytest.raises(MetalearnError, match=r"model.batchnorm: Invalid value 'instance', expected one of "
                                             r"\[transductive, none\]"):
        C.validate(cfg)
    cfg.model.batchnorm = "none"  # a plain string that is a choice is fine
    C.validate(cfg)


@pytest.mark.parametrize("old, new", [("outer.final_lr=0.1", "reptile.final_lr"),
                                      ("outer.msl_iterations=10", "mamlpp.msl_iterations"),
                                      ("outer.first_order_until=3", "mamlpp.first_order_until")])
def test_moved_keys_are_one_line_errors_naming_the_new_key(tmp_path, old, new):
    with pytest.raises(MetalearnError, match=rf"^config: {old.split('=')[0]} has moved: use .*{new}"):
        load_config(None, [old])
    with pytest.raises(MetalearnError, match=new):
        C.apply_overrides(Config(), [old])
    key, value = old.split("=")
    f = tmp_path / "old.yaml"
    f.write_text(f"outer:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(MetalearnError, match=rf"config file .*old.yaml: {key} has moved: use .*{new}"):
        load_config(f)


def test_the_new_sections_reach_the_algorithms():
    from metalearn.models import Conv4
    from metalearn.train import build_algorithm

    rep = build_algorithm(load_config(None, ["outer.algorithm=reptile", "reptile.final_lr=0.25"]), Conv4(hidden=8))
    assert rep.final_lr == 0.25
    pp = build_algorithm(load_config(None, ["outer.algorithm=mamlpp", "mamlpp.final_lr=1e-5", "mamlpp.msl_iterations=7",
                                            "mamlpp.first_order_until=2"]), Conv4(hidden=8))
    assert (pp.final_lr, pp.msl_iterations, pp.first_order_until) == (1e-5, 7, 2)
    preset = load_config("mamlpp_omniglot_20w1s")
    assert (preset.mamlpp.final_lr, preset.mamlpp.msl_iterations) == (1e-5, 5000)


def _old_dict(algorithm, **outer):
    """A config dict as versions before the reptile/mamlpp sections saved it."""
    d = to_dict(Config())
    del d["reptile"], d["mamlpp"]
    d["inner"]["adapt"] = ["*"]
    d["outer"].update({"algorithm": algorithm, "final_lr": None, "msl_iterations": 0, "first_order_until": 0, **outer})
    return d


def test_configs_saved_by_earlier_versions_still_load():
    pp = from_dict(_old_dict("mamlpp", final_lr=1e-5, msl_iterations=10, first_order_until=5))
    assert (pp.mamlpp.final_lr, pp.mamlpp.msl_iterations, pp.mamlpp.first_order_until) == (1e-5, 10, 5)
    assert pp.inner.adapt is None  # the old default ['*'] meant "the algorithm's default"
    rep = from_dict(_old_dict("reptile", final_lr=0.1))
    assert rep.reptile.final_lr == 0.1 and rep.mamlpp == C.MAMLPPConfig()
    assert from_dict(_old_dict("reptile")).reptile.final_lr == 0.0  # null meant 0
    # keys an algorithm ignored are dropped, so the loaded config equals today's config of that run
    assert from_dict(_old_dict("maml", final_lr=0.3, msl_iterations=4)) == load_config(None, [])
    anil = from_dict(_old_dict("anil"))
    assert anil.inner.adapt is None and registry.get("anil").configured_adapt(anil) == ["head.*"]
    # today's saved configs keep an explicit ['*'] (all parameters, also for anil)
    now = load_config(None, ["outer.algorithm=boil", "inner.adapt=['*']"])
    assert from_dict(to_dict(now)).inner.adapt == ["*"]


def test_a_run_config_yaml_of_an_earlier_version_still_loads(tmp_path):
    """`metalearn train RUN --resume` loads the run's config.yaml: a whole config with the old keys."""
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(_old_dict("mamlpp", final_lr=1e-5, msl_iterations=10)))
    cfg = load_config(f, ["outer.iterations=5"])
    assert (cfg.mamlpp.final_lr, cfg.mamlpp.msl_iterations, cfg.inner.adapt) == (1e-5, 10, None)
    assert cfg == from_dict(_old_dict("mamlpp", final_lr=1e-5, msl_iterations=10, iterations=5))
    f.write_text(yaml.safe_dump({"outer": {"algorithm": "mamlpp", "final_lr": 0.1, "msl_iterations": 1,
                                           "first_order_until": 0}}))  # a preset, not a saved config
    with pytest.raises(MetalearnError, match="outer.final_lr has moved"):
        load_config(f)


def test_inner_adapt_defaults_to_the_algorithms_default():
    assert Config().inner.adapt is None and load_config(None, ["inner.adapt=null"]).inner.adapt is None
    with pytest.raises(MetalearnError, match=r"^override 'inner.adapt=\[\*\]': the value is not valid YAML"):
        load_config(None, ["inner.adapt=[*]"])  # a YAML alias: one line, no traceback
    with pytest.raises(MetalearnError, match="inner.adapt is empty"):
        load_config(None, ["inner.adapt=[]"])


def test_validation_layers():
    assert validation.check_registries in C._VALIDATORS  # installed by importing metalearn
    cfg = Config()
    cfg.outer.algorithm = "nope"
    C.check_static(cfg)  # the static checks know no registry
    for check in (C.validate, validation.validate):
        with pytest.raises(MetalearnError, match="outer.algorithm: unknown algorithm 'nope'; known: anil"):
            check(cfg)
    with pytest.raises(MetalearnError, match="model.name: unknown model"):
        load_config(None, ["model.name=resnet"])


def test_capability_checks_name_what_supports_it():
    lora = ", ".join(registry.supporting("lora"))
    with pytest.raises(MetalearnError, match=f"LoRA adaptation is available for {lora}, not 'protonet'"):
        load_config(None, ["inner.lora_rank=2", "outer.algorithm=protonet"])
    for name in registry.supporting("own_lr_schedule"):
        with pytest.raises(MetalearnError, match=f"outer.lr_halve_every: {name} has its own lr schedule"):
            load_config(None, [f"outer.algorithm={name}", "outer.lr_halve_every=10"])
    load_config(None, ["outer.algorithm=protonet", "outer.lr_halve_every=2000"])
    with pytest.raises(MetalearnError, match="inner.checkpoint: not available for anil"):
        load_config(None, ["outer.algorithm=anil", "inner.checkpoint=true"])


def test_config_py_imports_no_upper_layer():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(C))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert imported <= {"errors", "presets"}, imported


def test_eval_settings_fill_in_from_training():
    cfg = load_config(None, ["data.ways=20", "data.shots=5", "inner.steps=3", "inner.lr=0.1", "eval.inner_steps=10"])
    assert C.eval_settings(cfg) == dict(ways=20, shots=5, query_shots=15, inner_steps=10, inner_lr=0.1)
    cfg.eval.ways, cfg.eval.shots, cfg.eval.inner_lr, cfg.eval.inner_steps = 5, 1, 0.4, 0
    assert C.eval_settings(cfg) == dict(ways=5, shots=1, query_shots=15, inner_steps=0, inner_lr=0.4)


def test_every_field_is_documented():
    """`metalearn config` prints the string under each field."""
    from metalearn.cli import config_reference

    text = config_reference()
    for key in ("reptile.final_lr", "mamlpp.final_lr", "mamlpp.msl_iterations", "mamlpp.first_order_until"):
        assert f"  {key}: " in text
    assert "inner.adapt: Optional[List[str]] = None\n      Name patterns" in text
    assert "outer.execution: Execution = 'auto'" in text
    assert not any(f.name in ("final_lr", "msl_iterations", "first_order_until")
                   for f in dataclasses.fields(C.OuterConfig))

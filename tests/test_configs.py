"""Config groups compose in every combination, instantiate, and bad configs fail early and clearly."""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

import attention_backends
from transformer import ToyTask, Transformer
from transformer.training import validate_config

pytestmark = pytest.mark.usefixtures("restore_default_backend")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("attention", "model", "task", "trainer")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group
    assert {"naive", "sdpa"} <= set(options("attention"))
    assert {"tiny", "small"} <= set(options("model"))
    assert {"copy", "reverse", "sort"} <= set(options("task"))


def test_defaults():
    cfg = compose_config()
    assert cfg.attention.name == "sdpa" and cfg.attention.strict is False
    assert cfg.task._target_.endswith("CopyTask")
    assert cfg.device == "auto" and cfg.precision == "fp32"
    assert cfg.trainer.resume is None


@pytest.mark.parametrize("attention", options("attention"))
def test_attention_configs_follow_the_schema(attention):
    cfg = compose_config([f"attention={attention}"])
    assert set(cfg.attention) <= {"name", "strict", "plugins"}
    assert cfg.attention.name in attention_backends.registered_backends()
    assert isinstance(cfg.attention.strict, bool)
    assert list(cfg.attention.get("plugins") or []) == []


@pytest.mark.parametrize(
    "choice", list(itertools.product(*(options(g) for g in GROUPS))), ids=lambda c: "-".join(c)
)
def test_every_combination_composes_and_instantiates(choice):
    cfg = compose_config([f"{group}={option}" for group, option in zip(GROUPS, choice, strict=True)])
    task = instantiate(cfg.task)
    model = instantiate(cfg.model)
    assert isinstance(task, ToyTask) and isinstance(model, Transformer)
    assert model.output.out_features >= task.vocab_size
    assert cfg.model.max_len >= task.max_target_len
    batch = task.sample(2, torch.Generator().manual_seed(0))
    if choice[1] == "tiny":
        logits = model(batch.src, batch.tgt_in, batch.src_key_padding_mask, batch.tgt_key_padding_mask)
        assert logits.shape == (*batch.tgt_out.shape, task.vocab_size)


def test_valid_default_config_passes_validation():
    device = validate_config(compose_config(["device=cpu", "attention=naive"]))
    assert device == torch.device("cpu")
    assert attention_backends.get_default_backend() == "naive"


# ------------------------------------------------------------------------------------------ bad configs


def test_heads_must_divide_d_model():
    cfg = compose_config(["model.d_model=66", "model.num_heads=4"])
    with pytest.raises(ValueError, match=r"model\.d_model \(66\).*model\.num_heads \(4\)"):
        validate_config(cfg)


def test_unknown_backend_name_lists_registered_backends():
    cfg = compose_config(["attention.name=no_such_backend"])
    with pytest.raises(ValueError, match="no_such_backend") as err:
        validate_config(cfg)
    for name in attention_backends.registered_backends():
        assert name in str(err.value)


def test_unknown_attention_option_is_rejected_by_hydra():
    with pytest.raises((ConfigCompositionException, MissingConfigException), match="sdpa"):
        compose_config(["attention=no_such_backend"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("precision=fp8", "precision"),
        ("device=tpu", "device"),
        ("trainer.schedule=step", "schedule"),
        ("trainer.steps=0", "trainer.steps"),
        ("model.max_len=8", "max_len"),
        ("model.num_kv_heads=3", "num_kv_heads"),
        ("trainer.eval_seed=0", "eval_seed"),
    ],
)
def test_other_bad_values(override, match):
    with pytest.raises(ValueError, match=match):
        validate_config(compose_config([override]))


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch):
    """A module that registers a CUDA-only backend and a CPU backend of its own when imported."""
    name = "attention_plugin_for_tests"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import attention_backends as ab

            @ab.register_backend("plugin_cuda_only", support=ab.BackendSupport(devices=frozenset({"cuda"})))
            def cuda_only(q, k, v, **kwargs):
                return ab.naive_attention(q, k, v, **kwargs)

            @ab.register_backend("plugin_cpu", support=ab.BackendSupport(devices=frozenset({"cpu"})))
            def on_cpu(q, k, v, **kwargs):
                return ab.naive_attention(q, k, v, **kwargs)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    for backend in ("plugin_cuda_only", "plugin_cpu"):
        if backend in attention_backends.registered_backends():
            attention_backends.unregister_backend(backend)


def test_strict_backend_that_cannot_run_on_the_device(plugin_module):
    cfg = compose_config(
        [
            f"attention.plugins=[{plugin_module}]",
            "attention.name=plugin_cuda_only",
            "attention.strict=true",
            "device=cpu",
        ]
    )
    with pytest.raises(ValueError, match=r"plugin_cuda_only.*cpu"):
        validate_config(cfg)


def test_non_strict_backend_that_cannot_run_on_the_device_is_accepted(plugin_module):
    cfg = compose_config(
        [f"attention.plugins=[{plugin_module}]", "attention.name=plugin_cuda_only", "device=cpu"]
    )
    validate_config(cfg)
    assert attention_backends.get_default_backend() == "plugin_cuda_only"


def test_plugin_backend_selected_from_config(plugin_module):
    cfg = compose_config([f"attention.plugins=[{plugin_module}]", "attention.name=plugin_cpu", "device=cpu"])
    validate_config(cfg)
    model = instantiate(cfg.model)
    batch = instantiate(cfg.task).sample(2, torch.Generator().manual_seed(0))
    with attention_backends.track_backends() as used:
        model(batch.src, batch.tgt_in, batch.src_key_padding_mask, batch.tgt_key_padding_mask)
    assert set(used) == {"plugin_cpu"}


def test_missing_plugin_module():
    cfg = compose_config(["attention.plugins=[no_such_module_anywhere]"])
    with pytest.raises(ValueError, match="no_such_module_anywhere"):
        validate_config(cfg)


def test_strict_flash_without_dropout_support_is_rejected_when_dropout_is_set():
    flash = attention_backends.get_backend("flash")
    if flash.support.dropout:
        pytest.skip("flash supports dropout")
    cfg = compose_config(["attention.name=flash", "attention.strict=true", "model.dropout=0.1", "device=cpu"])
    with pytest.raises(ValueError, match="flash"):
        validate_config(cfg)

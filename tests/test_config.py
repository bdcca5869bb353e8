"""Config loading, overrides, validation, the checker CLI and the presets (no torch, no process groups).

Malformed configs are data: tests/bad_configs/*.yaml, each starting with `# expect: FIELD | PHRASE` (both
must appear in the one error line), optionally `# args: ...` (extra checker arguments) and
`# requires: no transformer_engine` (a check of this machine that only fails where TE is absent).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from mtpd_megatron.config import ConfigError, config_from_dict, config_to_dict, load_config
from mtpd_megatron.config.__main__ import smallest_world_size
from mtpd_megatron.config.params import count_parameters
from mtpd_megatron.config.validate import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_configs"
CONFIGS = ROOT / "configs"


def run_checker(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "mtpd_megatron.config", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def bad_cases() -> list:
    cases = []
    for path in sorted(BAD.glob("*.yaml")):
        header = [line for line in path.read_text().splitlines()[:3] if line.startswith("# ")]
        meta = dict(line[2:].split(": ", 1) for line in header)
        field, phrase = (s.strip() for s in meta["expect"].split("|"))
        marks = []
        if meta.get("requires") == "no transformer_engine" and importlib.util.find_spec("transformer_engine"):
            marks = [pytest.mark.skip(reason="Transformer Engine is installed here")]
        cases.append(
            pytest.param(str(path), shlex.split(meta.get("args", "")), field, phrase, id=path.stem, marks=marks)
        )
    cases.append(
        pytest.param(
            str(BAD / "does_not_exist.yaml"), [], "does_not_exist.yaml: no such file", "no such file", id="missing_file"
        )
    )
    return cases


def test_there_are_enough_bad_configs():
    assert len(bad_cases()) >= 16


@pytest.fixture(scope="module")
def bad_results():
    """Run every malformed config through the checker at once, each in its own empty directory.

    Concurrent because each start pays for `import mtpd_megatron` (which imports torch).
    """

    def one(case):
        path, args = case.values[0], case.values[1]
        with tempfile.TemporaryDirectory() as cwd:
            result = run_checker([path, *args], cwd=pathlib.Path(cwd))
            return result, sorted(os.listdir(cwd))

    cases = bad_cases()
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip((c.id for c in cases), pool.map(one, cases)))


@pytest.mark.parametrize("path, args, field, phrase", bad_cases())
def test_bad_config_is_one_line_exit_2_and_writes_nothing(request, bad_results, path, args, field, phrase):
    result, written = bad_results[request.node.callspec.id]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m mtpd_megatron.config: error: ")
    assert field in lines[0] and phrase in lines[0], lines[0]
    assert result.stdout == ""
    assert written == []


def test_unreadable_config_files_are_one_line(tmp_path):
    """A binary file, a file with NUL bytes and a directory given as --config: one line, exit 2."""
    (tmp_path / "run").mkdir()
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"model: {num_layers: 2}\n\x00\x00\n")
    for path, phrase in (
        (binary, "not a text file (byte 128 is not UTF-8)"),
        (nul, "contains NUL bytes"),
        (tmp_path / "run", "is a directory"),
    ):
        result = run_checker([str(path)], tmp_path / "run")
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [result.stderr.strip()] and phrase in result.stderr, result.stderr
    assert list((tmp_path / "run").iterdir()) == []


def test_machine_checks_can_be_skipped_for_other_nodes(tmp_path):
    """--no-env: a config for GPU nodes (TE, paths there) is still checked for everything else."""
    preset = str(CONFIGS / "tiny_dense.yaml")
    result = run_checker([preset, "checkpoint.save=/etc/passwd", "--vocab-size", "1000", "--no-env"], tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_checker(
        [preset, "checkpoint.save=/etc/passwd", "model.hidden_size=60", "--vocab-size", "1000", "--no-env"], tmp_path
    )
    assert result.returncode == 2 and "model.hidden_size=60" in result.stderr


def test_bad_override_from_the_command_line(tmp_path):
    result = run_checker([str(CONFIGS / "tiny_dense.yaml"), "model.num_layer=4", "--vocab-size", "1000"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "python -m mtpd_megatron.config: error: model.num_layer: unknown key (did you mean 'num_layers'?)"
    ]
    result = run_checker([str(CONFIGS / "tiny_dense.yaml"), "--world-size", "two"], tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "--world-size" in result.stderr


def test_checker_prints_resolved_config_and_counts(tmp_path):
    args = [
        str(CONFIGS / "tiny_dense.yaml"),
        "model.num_layers=4",
        "--world-size",
        "2",
        "mtp.mtpd.beta=[1, 0.5, 0.5, 0]",
        "--vocab-size",
        "1000",
    ]
    result = run_checker(args, tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)  # the summary lines are YAML comments
    expected = load_config(str(CONFIGS / "tiny_dense.yaml"), ["model.num_layers=4", "mtp.mtpd.beta=[1, 0.5, 0.5, 0]"])
    assert printed == config_to_dict(expected)
    counts = count_parameters(expected, 1000)
    assert "# layout: world 2 = TP 1 x PP 1 x CP 1 x DP 2" in result.stdout
    assert "vocabulary: 1000 padded to 1024" in result.stdout
    assert f"total {counts['total'] / 1e3:.2f}K" in result.stdout
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Dotted overrides.
# ---------------------------------------------------------------------------------------------------------


def test_overrides_are_typed():
    cfg = config_from_dict(
        {},
        [
            "training.lr=1e-3",
            "model.num_layers=6",
            "parallel.sequence_parallel=true",
            "model.vocab_size=null",
            "model.moe.layer_freq=[0,1,1]",
            "data.paths=[0.3, a, 0.7, b]",
            "name=run 1",
            "model.rotary_base=500000",
            "mtp.mtpd.beta=[1.0, 0.5]",
        ],
    )
    assert cfg.training.lr == 1e-3 and isinstance(cfg.training.lr, float)
    assert cfg.model.num_layers == 6
    assert cfg.parallel.sequence_parallel is True
    assert cfg.model.vocab_size is None
    assert cfg.model.moe.layer_freq == [0, 1, 1]
    assert cfg.data.paths == [0.3, "a", 0.7, "b"]
    assert cfg.name == "run 1"
    assert cfg.model.rotary_base == 500000.0 and isinstance(cfg.model.rotary_base, float)
    assert cfg.mtp.mtpd.beta == [1.0, 0.5]


def test_override_replaces_a_preset_value():
    cfg = load_config(str(CONFIGS / "tiny_moe.yaml"), ["model.moe.num_experts=8", "data.paths=[x]"])
    assert cfg.model.moe.num_experts == 8 and cfg.data.paths == ["x"]
    assert cfg.model.moe.router_topk == 2  # untouched siblings stay


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_layer=4", "model.num_layer: unknown key (did you mean 'num_layers'?)"),
        ("modle.num_layers=4", "modle: unknown key (did you mean 'model'?)"),
        ("model.num_layers=four", "model.num_layers: expected an integer, got 'four'"),
        ("model.num_layers=2.5", "model.num_layers: expected an integer, got 2.5"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel: expected true or false, got 'maybe'"),
        ("data.paths=prefix", "data.paths: expected a list, got 'prefix'"),
        ("model.num_layers.deep=1", "model.num_layers.deep: 'num_layers' is a value, not a section"),
        ("num_layers", "num_layers: overrides look like section.key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"num_layers": 2}}, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# validate() directly.
# ---------------------------------------------------------------------------------------------------------


def small(**sections) -> dict:
    base = {"model": {"vocab_size": 32000}, "data": {"paths": ["runs/data/tokens/corpus"]}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return base


def test_validate_accepts_a_small_valid_layout():
    validate(config_from_dict(small()), world_size=1)
    cfg = config_from_dict(
        small(
            model={"num_attention_heads": 8, "num_query_groups": 4, "moe": {"num_experts": 8, "router_topk": 2}},
            parallel={
                "tensor_model_parallel_size": 2,
                "sequence_parallel": True,
                "expert_model_parallel_size": 4,
                "expert_tensor_parallel_size": 1,
            },
            training={"micro_batch_size": 1, "global_batch_size": 4},
        )
    )
    validate(cfg, world_size=4)


def test_validate_accepts_context_parallel_layouts():
    """CP = 2 with MTP-D (also with TP x SP and a world holding DP): the old refusal is gone."""
    for parallel, world in [
        ({"context_parallel_size": 2}, 2),
        ({"context_parallel_size": 2}, 4),
        ({"context_parallel_size": 2, "tensor_model_parallel_size": 2, "sequence_parallel": True}, 4),
    ]:
        cfg = config_from_dict(small(parallel=parallel, data={"seq_length": 128}))
        validate(cfg, world_size=world)


@pytest.mark.parametrize("topn, ok", [(0, True), (1024, True), (1025, False)])
def test_topn_against_padded_vocab(topn, ok):
    cfg = config_from_dict(
        small(model={"vocab_size": None}, mtp={"mtpd": {"topn": topn}}, data={"tokenizer": "tok.json"})
    )
    if ok:
        validate(cfg, 1, vocab_size=1000)
    else:
        with pytest.raises(ConfigError, match="use 0 for the full vocabulary"):
            validate(cfg, 1, vocab_size=1000)
    validate(cfg, 1)  # vocabulary unknown: TopN cannot be checked yet


def test_mtpd_disabled_allows_zero_heads():
    validate(config_from_dict(small(mtp={"num_heads": 0, "mtpd": {"enabled": False}})), 1)


def test_expert_tp_bounds_world_size():
    cfg = config_from_dict(
        small(
            model={"moe": {"num_experts": 4}},
            parallel={"expert_model_parallel_size": 2, "expert_tensor_parallel_size": 2},
            training={"micro_batch_size": 1, "global_batch_size": 6},
        )
    )
    with pytest.raises(ConfigError, match=r"EP\*ETP\*PP=4 does not divide the world size 6"):
        validate(cfg, 6)


# ---------------------------------------------------------------------------------------------------------
# Presets.
# ---------------------------------------------------------------------------------------------------------

PRESET_WORLDS = {
    "dense_2b": [1, 8, 64, 256],
    "moe_a1b": [8, 64, 256],
    "tiny_dense": [1, 2, 4],
    "tiny_moe": [2, 4, 8],
    "gpu_small": [1, 2],
}


def test_every_preset_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(PRESET_WORLDS)


@pytest.mark.parametrize("name", sorted(PRESET_WORLDS))
def test_presets_validate(name):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"))
    assert smallest_world_size(cfg) == PRESET_WORLDS[name][0]
    for world in PRESET_WORLDS[name]:
        validate(cfg, world, vocab_size=None if cfg.model.vocab_size else 1000)
    # gpu_small: the full corpus; the tiny presets: the demo's data (so they train right after the demo)
    data_root = {"gpu_small": "runs/gpu_data/", "tiny_dense": "runs/demo/data/", "tiny_moe": "runs/demo/data/"}.get(
        name, "runs/data/"
    )
    assert cfg.data.paths and all(p.startswith(data_root) for p in cfg.data.paths)
    assert cfg.data.tokenizer.startswith(data_root)
    assert [st["heads"] for st in cfg.looped.stages][-1] >= 4, "every preset ships its looped extension"


def test_presets_pass_the_checker(tmp_path):
    for name, worlds in PRESET_WORLDS.items():
        result = run_checker(
            [str(CONFIGS / f"{name}.yaml"), "--world-size", str(worlds[-1]), "--vocab-size", "1000"], tmp_path
        )
        assert result.returncode == 0, result.stderr
        assert "# parameters: main model" in result.stdout


def test_preset_sizes():
    dense = count_parameters(load_config(str(CONFIGS / "dense_2b.yaml")), 122_880)
    assert 1.7e9 <= dense["main_model"] <= 2.4e9
    assert dense["active"] == dense["total"] and dense["mtp_heads"] == 4 * dense["mtp_head"]
    moe = count_parameters(load_config(str(CONFIGS / "moe_a1b.yaml")), 122_880)
    assert 8e9 <= moe["main_model"] <= 12e9 and 8e9 <= moe["total"] <= 12e9
    assert 0.8e9 <= moe["main_model_active"] <= 1.4e9
    assert dense["padded_vocab_size"] == moe["padded_vocab_size"] == 122_880


def test_count_by_hand():
    """The formula on a case small enough to count on paper (dense, GQA, QK-norm, untied, 1 MTP head)."""
    cfg = config_from_dict(
        small(
            model={
                "num_layers": 1,
                "hidden_size": 8,
                "ffn_hidden_size": 12,
                "num_attention_heads": 2,
                "num_query_groups": 1,
                "qk_layernorm": True,
                "make_vocab_size_divisible_by": 16,
                "vocab_size": 30,
            },
            mtp={"num_heads": 1},
        )
    )
    layer = 8 + 8 * (2 + 2) * 4 + 8 * 8 + 2 * 4 + 8 + 3 * 8 * 12  # norms, qkv, proj, qk-norm, norm, mlp
    c = count_parameters(cfg, 30)
    assert c["padded_vocab_size"] == 32
    assert c["decoder"] == layer + 8
    assert c["mtp_head"] == 2 * 8 * 8 + 3 * 8 + layer
    assert c["main_model"] == 2 * 32 * 8 + layer + 8


def test_checker_reads_the_vocabulary_from_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]),
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "run").mkdir()
    preset = str(CONFIGS / "tiny_dense.yaml")

    result = run_checker([preset, f"data.tokenizer={tmp_path / 'tokenizer.json'}"], tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert f"# vocabulary: {size} padded to 128" in result.stdout
    result = run_checker([preset, f"data.tokenizer={tmp_path / 'broken.json'}"], tmp_path / "run")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "data.tokenizer=" in result.stderr and "not a Hugging Face tokenizer.json" in result.stderr
    assert list((tmp_path / "run").iterdir()) == []


def test_help_config_prints_the_schema_docs():
    """`--help-config [section]` lists every field with type, default and the doc schema.py keeps for it."""
    import dataclasses

    from mtpd_megatron.config.schema import MTPDConfig

    result = run_checker(["--help-config", "mtp.mtpd"], ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(dataclasses.fields(MTPDConfig))
    assert any(line.startswith("  mtp.mtpd.topn (int, default 10000): Teacher TopN") for line in lines)
    everything = run_checker(["--help-config"], ROOT)
    assert everything.returncode == 0 and "training.lr (float" in everything.stdout
    bad = run_checker(["--help-config", "mtp.nope"], ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith(
        "python -m mtpd_megatron.config: error: --help-config mtp.nope: no section 'nope'"
    )

"""Compression recipes: parsing from text and TOML, validation, and how a build runs them
(the artifact is verified against the compressed model; the report says what it cost)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import GraphBuilder, listing, save
from typer.testing import CliRunner

from edgec.build import BuildOptions, build
from edgec.cli import app
from edgec.errors import RecipeError
from edgec.recipe import Step, load_build_settings, load_recipe, make_passes, options_from, parse_step, recipe_toml, with_build_settings


def test_parse_step_keeps_commas_inside_tables_and_strings():
    step = parse_step("prune", "rates={'conv1' = 0.2, 'block.*' = 0.5},note='a,b',round_to=4")
    assert step.options == {"rates": {"conv1": 0.2, "block.*": 0.5}, "note": "a,b", "round_to": 4}


def test_parse_step_reads_toml_literals_and_bare_words():
    step = parse_step("prune", "rate=0.3, round_to=8,exclude=['fc', 'head'],method=l1,global=true")
    assert step == Step("prune", {"rate": 0.3, "round_to": 8, "exclude": ["fc", "head"], "method": "l1", "global": True})


@pytest.mark.parametrize("text", ["rate", "=3", "rate=0.3,oops"])
def test_parse_step_rejects_pairs_without_a_key_and_value(text):
    with pytest.raises(RecipeError, match="key=value"):
        parse_step("prune", text)


def test_load_recipe_keeps_file_order(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[step]]\npass = "factorize"\nenergy = 0.9\n\n[[step]]\npass = "prune"\nrate = 0.2\n')
    assert load_recipe(path) == [Step("factorize", {"energy": 0.9}), Step("prune", {"rate": 0.2})]


@pytest.mark.parametrize("load, text, message", [
    (load_recipe, "step = 3", "no [[step]] tables"),
    (load_recipe, "[[step]]\nrate = 1", 'missing pass = "<name>"'),
    (load_recipe, "[[step]\n", "not valid TOML"),
    (load_build_settings, "[build]\nprecison = 'int8'", "no setting 'precison'"),
    (load_build_settings, "[build]\nspeed_check = 1", "speed_check = 1 should be of type bool"),
    (load_build_settings, "build = 3", "must be a table"),
])
def test_malformed_recipes_are_explained(tmp_path, load, text, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        load(path)


def test_recipe_toml_round_trips_steps_and_build_settings(tmp_path):
    steps = [Step("prune", {"rates": {"/stage1/conv [a]": 0.5}}), Step("factorize", {"layer_reduction": 0.3, "include": ["fc"]})]
    settings = {"precision": "int8", "calib": "c.npz", "speed_check": False, "keep_float": ["fc"], "max_drop": 0.01}
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(steps, settings))
    assert load_recipe(path) == steps
    assert load_build_settings(path) == {**settings, "keep_float": ("fc",)}


def test_a_build_table_needs_no_steps_and_flags_win_over_it(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[build]\nprecision = "int8"\nseed = 3\n')
    assert load_recipe(path) == []
    given = with_build_settings(BuildOptions(seed=1), load_build_settings(path))
    assert (given.precision, given.seed) == ("int8", 1)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="Cannot read recipe"):
        load_recipe(tmp_path / "nope.toml")


def test_unknown_step_and_unknown_option_name_the_known_ones():
    with pytest.raises(RecipeError, match="Known steps: .*equalize"):
        make_passes([Step("distill")], lambda: None)
    with pytest.raises(RecipeError, match="no option.*iterations.*max_iterations"):
        make_passes([Step("equalize", {"iterations": 3})], lambda: None)


def test_options_from_reports_bad_values():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Rate:
        rate: float = 0.5

        def __post_init__(self):
            if not 0 <= self.rate < 1:
                raise ValueError(f"rate must be in [0, 1), not {self.rate}")

    assert options_from(Rate, {"rate": 0.2}, "prune") == Rate(0.2)
    with pytest.raises(RecipeError, match=r"Step 'prune': rate must be in \[0, 1\), not 1.5"):
        options_from(Rate, {"rate": 1.5}, "prune")


def _relu_chain(tmp_path):
    """Two convs with a Relu between, the first layer's channels badly scaled (CLE changes
    weights, keeps outputs)."""
    g = GraphBuilder(seed=3)
    w1 = g.const((g.rng.standard_normal((4, 2, 3, 3)) * np.array([8, 0.1, 1, 3]).reshape(4, 1, 1, 1)).astype(np.float32))
    h = g.op("Relu", [g.op("Conv", ["x", w1, g.weight(4)], pads=[1, 1, 1, 1])])
    y = g.op("Conv", [h, g.weight(3, 4, 1, 1)])
    return save(g.model({"x": [1, 2, 6, 6]}, {y: [1, 3, 6, 6]}), tmp_path)


def test_build_runs_the_recipe_and_verifies_against_the_compressed_model(tmp_path):
    result = build(_relu_chain(tmp_path), "ort-x86", tmp_path / "out", BuildOptions(recipe=[Step("equalize")]))
    compression = result.report["compression"]
    assert compression["steps"] == [{"pass": "equalize"}]
    assert compression["macs"]["before"] == compression["macs"]["after"] > 0
    assert compression["vs_source"]["outputs"][0]["cosine"] > 0.99999
    assert result.report["passes"][-1]["name"] == "cross-layer-equalization"
    assert "model.compressed.onnx" in listing(tmp_path / "out")


def test_cli_recipe_errors_leave_nothing_behind(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\npass = "distill"\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", str(_relu_chain(tmp_path)), "-t", "ort-x86", "-o", str(out), "--recipe", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Unknown compression step 'distill'" in " ".join(result.output.split())
    assert listing(out) == []


def test_cli_recipe_build_reports_compression(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\npass = "equalize"\nmax_iterations = 3\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", str(_relu_chain(tmp_path)), "-t", "ort-x86", "-o", str(out), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "Compressed: MACs" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["compression"]["steps"] == [{"pass": "equalize", "max_iterations": 3}]

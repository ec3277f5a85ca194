"""edgec optimize: a few-trial search on the zoo's MLP (ORT x86, cost measured here), its
outputs, the recipe that rebuilds the chosen artifact, determinism, resume, and errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.errors import BudgetError, DeviceError, EdgecError, InputDataError, OptionError
from edgec.search import Budgets, OptimizeOptions, optimize

REPO = Path(__file__).resolve().parents[1]
MLP = REPO / "models" / "mlp.onnx"
EVAL, CALIB = (str(REPO / "models" / "data" / f"digits_{split}_flat.npz") for split in ("eval", "calib"))
MLP_MACS = 17024


def _options(**overrides) -> OptimizeOptions:
    # A MACs budget: what is feasible does not hang on this machine's timing noise.
    settings = {"eval": EVAL, "calib": CALIB, "budgets": Budgets(macs=int(MLP_MACS * 0.9)), "strategy": "random", "trials": 5}
    return OptimizeOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("optimized")
    return out, optimize(MLP, "ort-x86", out, _options())


def test_search_writes_artifact_recipe_search_and_report(searched):
    out, result = searched
    search = json.loads((out / "search.json").read_text())
    assert {"mlp.onnx", "mlp.ort", "report.json", "recipe.toml", "search.json", "report.html", "study.db"} <= {p.name for p in out.iterdir()}
    assert len(search["candidates"]) == 5 and search["trials"] == 5
    chosen = search["candidates"][search["chosen"]]
    assert chosen["feasible"] and chosen["macs"] <= MLP_MACS * 0.9 and chosen["loss"] <= 0.01
    assert set(chosen) >= {"settings", "cost", "accuracy", "size_bytes", "macs", "seconds"}
    assert chosen["sha256"] == json.loads((out / "report.json").read_text())["artifacts"][0]["sha256"]
    assert search["baselines"]["fp32"]["relative_cost"] == 1.0 and search["baselines"]["int8"]["settings"]["precision"] == "int8"
    uniform = search["baselines"]["uniform_same_macs"]  # the chosen point prunes, so uniform pruning at its MACs is there
    assert uniform["settings"]["uniform_prune"] > 0 and "uniform" in search["baselines"]
    assert "<svg" in (out / "report.html").read_text() and result.chosen["trial"] == chosen["trial"]


def test_recipe_rebuilds_the_artifact_byte_for_byte(searched, tmp_path):
    out, _ = searched
    run = CliRunner().invoke(app, ["build", str(MLP), "-t", "ort-x86", "--recipe", str(out / "recipe.toml"), "-o", str(tmp_path)])
    assert run.exit_code == 0, run.output
    assert (tmp_path / "mlp.onnx").read_bytes() == (out / "mlp.onnx").read_bytes()


def test_same_seed_same_candidates_and_choice(searched, tmp_path):
    out, _ = searched
    again = json.loads((out / "search.json").read_text())
    other = optimize(MLP, "ort-x86", tmp_path, _options()).search
    assert [c["settings"] for c in other["candidates"]] == [c["settings"] for c in again["candidates"]]
    assert other["candidates"][other["chosen"]]["settings"] == again["candidates"][again["chosen"]]["settings"]


def test_interrupted_search_resumes_from_its_study(tmp_path):
    first = optimize(MLP, "ort-x86", tmp_path, _options(trials=3)).search
    resumed = optimize(MLP, "ort-x86", tmp_path, _options(trials=5)).search
    assert len(resumed["candidates"]) == 5
    def built(candidates):  # what the study keeps (costs of the front are measured again before each choice)
        return [{k: c[k] for k in ("trial", "settings", "accuracy", "sha256", "seconds")} for c in candidates]
    assert built(resumed["candidates"][:3]) == built(first["candidates"])  # reused from the study, not rebuilt (same seconds)
    studies = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'study.db'}")
    assert [s.n_trials for s in studies] == [5]
    looser = optimize(MLP, "ort-x86", tmp_path, _options(trials=5, budgets=Budgets(macs=MLP_MACS))).search
    assert looser["candidates"][0]["feasible"]  # the stored fp32 reference, judged again against the new budget


def test_infeasible_budget_names_the_closest_point_and_writes_it(tmp_path):
    run = CliRunner().invoke(app, ["optimize", str(MLP), "-t", "ort-x86", "--eval", EVAL, "--calib", CALIB, "--macs-budget", "100",
                                   "--strategy", "random", "--trials", "3", "-o", str(tmp_path)])
    assert run.exit_code == BudgetError.exit_code
    assert "closest" in run.output and "--macs-budget by" in run.output
    assert {"mlp.onnx", "recipe.toml", "report.json"} <= {p.name for p in (tmp_path / "closest").iterdir()}
    search = json.loads((tmp_path / "search.json").read_text())
    assert search["chosen"] is None and search["candidates"][search["closest"]]["feasible"] is False
    assert json.loads((tmp_path / "closest" / "report.json").read_text())["optimize"]["feasible"] is False
    assert "misses" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("change, error, message", [
    ({"budgets": None}, OptionError, "Give a budget"),
    ({"strategy": "annealing"}, OptionError, "strategy"),
    ({"max_drop": 0.01, "min_cosine": 0.9}, OptionError, "exclude each other"),
    ({"device": "pixel-9000"}, DeviceError, "Unknown device"),
    ({"device": "emulated-a76"}, DeviceError, "aarch64|arm"),  # an ARM core cannot price an x86 artifact
    ({"eval": str(REPO / "models" / "data" / "digits_eval_nchw.npz")}, InputDataError, "has no array for input"),
    ({"min_cosine": 0.9}, OptionError, "--max-drop"),  # labeled --eval: the top-1 drop is the bound
    ({"eval": CALIB}, OptionError, "--eval is the --calib data"),
    ({"finetune": {"data": CALIB, "budget_s": 60}}, OptionError, "same choice"),  # seconds trained vary with load
    ({"study": "/nonexistent/folder/study.db"}, OptionError, "cannot be opened"),
    ({"study": "nosuchdb://x"}, OptionError, "cannot be opened"),
])
def test_bad_options_are_user_errors(tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        if change.get("budgets", 1) is None:
            Budgets()
        optimize(MLP, "ort-x86", tmp_path, _options(**change))


def test_latency_budget_needs_a_timed_device(tmp_path):
    with pytest.raises(OptionError, match="timed device"):
        optimize(MLP, "tflite-arm", tmp_path, _options(device="emulated-a76", budgets=Budgets(latency_ms=1.0)))


def test_settings_keep_no_factorized_layer_float():
    from edgec.search.space import Space

    space = Space({"precision": ("fp32", "int8"), "factorize:fc": (0.0, 0.3), "float:fc": (False, True), "float:head": (False, True)})
    settings = space.settings({"precision": "int8", "factorize:fc": 0.3, "float:fc": True, "float:head": True})
    assert settings["keep_float"] == ["head"] and settings["factorize"] == {"fc": 0.3}
    assert space.settings({"precision": "fp32", "factorize:fc": 0.0, "float:fc": True, "float:head": True})["keep_float"] == []


def test_fine_tuning_data_offers_the_rates_one_shot_damage_cuts():
    from edgec.build import canonicalize, input_specs
    from edgec.model import load
    from edgec.search.space import build_space, pruning_sensitivity
    from edgec.verify import load_inputs

    model, _ = canonicalize(load(MLP), {})
    report = pruning_sensitivity(model, load_inputs(CALIB, input_specs(model), limit=16))
    for group in report["groups"]:  # every rate ruinous one-shot
        group["curve"] = [{**point, "top1_drop": 0.5} for point in group["curve"]]

    def pruning(finetune: bool) -> dict:
        levels = build_space(model, report, 0.01, int8=True, keep_float=True, finetune=finetune).levels
        return {name: values for name, values in levels.items() if name.startswith("prune:")}

    assert pruning(finetune=False) == {}
    offered = pruning(finetune=True)
    assert offered and all(len(values) > 1 for values in offered.values())


def test_a_size_budget_factorizes_the_layers_holding_the_weights():
    from edgec.build import canonicalize
    from edgec.model import load
    from edgec.search.space import build_space

    model, _ = canonicalize(load(REPO / "models" / "mobilenetv3.onnx"), {})
    no_groups = {"samples": {"labeled": True}, "groups": []}

    def factorized(budgets: Budgets) -> set[str]:
        space = build_space(model, no_groups, 0.01, int8=True, keep_float=False, finetune=False, buys=budgets.buys())
        return {name for name in space.levels if name.startswith("factorize:")}

    head = "factorize:/head/head.0/Gemm"  # a fifth of the weights, under 1% of the MACs
    assert head in factorized(Budgets(size_kb=50)) and head not in factorized(Budgets(speedup=2))
    assert Budgets(speedup=2, size_kb=50).buys() == ("macs", "params")


class _Toy:
    """Greedy's trials on a model of pruning knobs, without builds: ``q`` quarters pruned (over
    all groups) cost ``lost(q)`` of top-1 one-shot (``tuned(q)`` once fine-tuned) and save ``saves·q`` of the cost."""

    def __init__(self, tuned=lambda q: 0.005 * q, saves=0.3, lost=lambda q: 0.02 * q, trials=20):
        self.runs: list[dict] = []
        self.tuned, self.saves, self.lost, self.trials = tuned, saves, lost, trials

    def run(self, params):
        self.runs.append(dict(params))
        quarters = sum(rate for name, rate in params.items() if name.startswith("prune:")) * 4
        return {"params": dict(params), "trial": len(self.runs), "loss": (self.tuned if params.get("finetune") else self.lost)(quarters),
                "relative_cost": 1.0 - self.saves * quarters}

    def run_batch(self, proposals):
        return [self.run(params) for params in proposals]

    def left(self):
        return len(self.runs) < self.trials

    def room(self, wanted):
        return min(wanted, self.trials - len(self.runs))


ONE_SHOT, FINE_TUNED = ({"prune:a": rate, "finetune": tuned} for rate, tuned in ((0.25, False), (0.25, True)))


@pytest.mark.parametrize("finetune, allowed, budget, runs", [
    # the first step loses 2 points: a dead end without data to train on ...
    (False, 0.01, 0.5, [{"prune:a": 0.0}, {"prune:a": 0.25}]),
    # ... with it, the step is built again fine-tuned, and the walk goes on fine-tuned
    (True, 0.01, 0.5, [{"prune:a": 0.0, "finetune": False}, ONE_SHOT, FINE_TUNED, {"prune:a": 0.5, "finetune": True}]),
    # a budget met one-shot, at a loss: the point once more, fine-tuned
    (True, 0.03, 0.75, [{"prune:a": 0.0, "finetune": False}, ONE_SHOT, FINE_TUNED]),
])
def test_greedy_fine_tunes_only_where_one_shot_moves_lose_accuracy(finetune, allowed, budget, runs):
    from edgec.search.space import Space
    from edgec.search.strategies import run_greedy

    levels = {"prune:a": (0.0, 0.25, 0.5), **({"finetune": (False, True)} if finetune else {})}
    space, toy = Space(levels, {"prune:a": {0.0: (0, 0), 0.25: (0.25, 0.005), 0.5: (0.5, 0.01)}}), _Toy()
    run_greedy(toy, space, allowed, lambda r: max(r["relative_cost"] - budget, 0.0))
    assert toy.runs == runs


def test_a_fine_tuned_walk_jumps_every_least_pruned_group_at_once():
    from edgec.search.space import Space
    from edgec.search.strategies import run_greedy

    knobs = ("prune:a", "prune:b", "prune:c")
    levels = {**{name: (0.0, 0.25, 0.5) for name in knobs}, "finetune": (False, True)}
    space = Space(levels, {name: {0.0: (0, 0), 0.25: (0.25, 0.02), 0.5: (0.5, 0.04)} for name in knobs})
    assert space.jump({**space.start(), "prune:a": 0.25}) == {**dict.fromkeys(knobs, 0.25), "finetune": True}
    assert space.jump({**space.start(), "prune:a": 0.25, "prune:b": 0.25}) is None  # one knob behind: a single move
    assert Space({name: levels[name] for name in knobs}).jump(space.start()) is None  # no data to train on

    toy = _Toy(tuned=lambda q: 0.00075 * q, saves=0.1)
    run_greedy(toy, space, 0.01, lambda r: max(r["relative_cost"] - 0.45, 0.0))
    one_shot = [{**space.start(), name: 0.25} for name in knobs]  # each loses 2 points
    assert toy.runs[:5] == [space.start(), *one_shot, {**space.start(), **dict.fromkeys(knobs, 0.25), "finetune": True}]
    assert toy.runs[8] == {**dict.fromkeys(knobs, 0.5), "finetune": True}  # the fine-tuned walk's first jump, and the last point
    assert len(toy.runs) == 12 and toy.run(toy.runs[8])["relative_cost"] <= 0.45


def test_a_one_shot_walk_too_slow_for_the_trials_left_goes_fine_tuned_at_once():
    from edgec.search.space import Space
    from edgec.search.strategies import run_greedy

    knobs = ("prune:a", "prune:b", "prune:c", "prune:d")
    levels = {**{name: (0.0, 0.25, 0.5) for name in knobs}, "finetune": (False, True)}
    space = Space(levels, {name: {0.0: (0, 0), 0.25: (0.25, 0.002), 0.5: (0.5, 0.008)} for name in knobs})
    # one-shot, every quarter holds alone and two together barely do: a step buys 0.05, and 0.25 is left
    toy = _Toy(lost=lambda q: 0.002 * q * q, tuned=lambda q: 0.0002 * q * q, saves=0.05)
    run_greedy(toy, space, 0.01, lambda r: max(r["relative_cost"] - 0.7, 0.0))
    first = {**space.start(), "prune:a": 0.25}
    assert toy.runs[1] == first and not any(run["finetune"] for run in toy.runs[:6])
    assert toy.runs[6] == {**dict.fromkeys(knobs, 0.25), "finetune": True}  # 5 steps would not fit in 14 trials: the jump
    assert all(run["finetune"] for run in toy.runs[6:]) and min(toy.run(run)["relative_cost"] for run in list(toy.runs)) <= 0.7


def test_time_budget_stops_after_the_reference(tmp_path):
    with pytest.raises(BudgetError, match="No candidate of 1"):  # the uncompressed reference misses the MACs budget
        optimize(MLP, "ort-x86", tmp_path, _options(time_budget_s=1e-6))
    search = json.loads((tmp_path / "search.json").read_text())
    assert [c["settings"]["precision"] for c in search["candidates"]] == ["fp32"]  # the reference every cost needs, then nothing
    assert search["baselines"]["int8"] is None


def test_a_search_on_ray_makes_the_choice_the_local_executor_makes(searched, ray_cluster, tmp_path):
    """Two Ray worker processes build the batch's candidates at once; the study is told in the same
    order, so the same seed gives the same candidates and choice as the local search above."""
    _, local = searched
    on_ray = optimize(MLP, "ort-x86", tmp_path, _options(executor="ray", ray_address=ray_cluster)).search
    assert [c["settings"] for c in on_ray["candidates"]] == [c["settings"] for c in local.search["candidates"]]
    assert on_ray["candidates"][on_ray["chosen"]]["settings"] == local.search["candidates"][local.search["chosen"]]["settings"]
    assert [c["sha256"] for c in on_ray["candidates"]] == [c["sha256"] for c in local.search["candidates"]]


def _emulator_problem() -> str | None:
    from edgec.profile import get_device
    from edgec.profile.emulator import setup_problem

    return setup_problem(get_device("emulated-a76").emulation)


@pytest.mark.skipif(_emulator_problem() is not None, reason="needs the emulated arm64 device (make arm-emulator)")
def test_counted_costs_run_in_one_window_with_the_same_study_on_ray(ray_cluster, tmp_path):
    """On an emulated core a candidate is one task and up to --batch of them are in flight,
    the next asked as the oldest is told: Ray and the local executor tell the same trials in
    the same order, so both see the same candidates, counts and choice."""
    options = _options(device="emulated-a76", budgets=Budgets(speedup=1.25), trials=6, batch=3)
    local = optimize(MLP, "tflite-arm", tmp_path / "local", options).search
    on_ray = optimize(MLP, "tflite-arm", tmp_path / "ray", dataclasses.replace(options, executor="ray", ray_address=ray_cluster)).search
    assert [(c["settings"], c["sha256"], c["cost"]) for c in on_ray["candidates"]] == \
        [(c["settings"], c["sha256"], c["cost"]) for c in local["candidates"]]
    assert on_ray["chosen"] == local["chosen"] and on_ray["closest"] == local["closest"]
    reference = local["baselines"]["fp32"]
    assert reference["relative_cost"] == 1.0 and local["candidates"][0]["settings"] == reference["settings"]
    for candidate in local["candidates"]:  # costs counted apart in each task, made relative by the driver
        assert candidate["relative_cost"] == round(candidate["cost"] / reference["cost"], 6)


def test_predicted_cost_searches_by_the_predictor_and_measures_the_front_before_choosing(tmp_path, monkeypatch):
    from edgec.predict import PredictorStore
    from edgec.predict.calibrate import calibrate
    from edgec.profile import get_device

    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(EdgecError, match="edgec device calibrate local"):
        optimize(MLP, "tflite-x86", tmp_path / "none", _options(cost="predicted", trials=2))
    calibrate(get_device("local"), PredictorStore(tmp_path / "cache", "local"), 0.001, 1, ops=("Gemm",), precisions=("fp32", "int8"),
              batch_size=6)
    search = optimize(MLP, "tflite-x86", tmp_path / "out", _options(cost="predicted", trials=4)).search
    front = [c for c in search["candidates"] if "predicted_cost" in c]
    assert front and all(c["metric"] == "ms" and c["cost"] > 0 for c in front)
    assert search["candidates"][search["chosen"]] in front  # chosen on measured cost


def test_local_cost_opens_new_sessions_every_round(searched, monkeypatch):
    """One session pair can stay lucky or unlucky for all its rounds (ORT with 2 threads on a
    2-core host), and a search picking the cheapest candidate would pick the lucky ones: each
    round times new sessions of both the candidate and the fp32 reference."""
    from edgec.search import cost

    out, _ = searched
    opened = []
    real = cost.open_runner
    monkeypatch.setattr(cost, "open_runner", lambda path, **kw: opened.append(Path(path).name) or real(path, **kw))
    artifact = next(out.glob("*.onnx"))
    result = cost.local_latency(artifact, artifact, {}, 1, rounds=3)
    assert len(opened) == 6 and result["metric"] == "ms" and 0.5 < result["relative"] < 2

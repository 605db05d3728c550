"""Recipes: schema validation with key paths, overrides, the runner, and every bundled example."""

import re
from pathlib import Path

import pytest
import torch

import sparsenn as sn
from sparsenn.cli.recipes import (
    RecipeError,
    apply_overrides,
    describe,
    example_path,
    list_examples,
    load_recipe,
    model_from_checkpoint,
    parse_recipe,
    prepare,
    run_recipe,
    validate,
)
from sparsenn.cli.recipes.runner import _schedule

TINY = ["data.subset=256", "data.test_subset=64", "train.epochs=1", "outputs.report=[text]"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and fair on a shared machine
    yield
    torch.set_num_threads(old)


def _errors(recipe, source="r.yaml"):
    with pytest.raises(RecipeError) as e:
        validate(recipe, source)
    return e.value.errors


def test_every_registered_method_has_a_bundled_example():
    methods = {load_recipe(example_path(name))["sparsify"]["method"] for name in list_examples()}
    assert methods == set(sn.list_methods())


def test_defaults_are_filled_in_and_names_lowercased():
    r = validate({"sparsify": {"method": "RigL", "sparsity": 0.8}})
    assert r["sparsify"]["method"] == "rigl"
    assert r["model"] == {"name": "lenet300100", "args": {}}
    assert r["data"]["name"] == "digits" and r["data"]["batch_size"] == 64
    assert r["train"]["epochs"] == 10 and r["outputs"]["report"] == ["text", "markdown", "html"]


def test_unknown_keys_and_values_name_the_key_path_and_the_choices():
    errors = _errors({"model": {"name": "resnet"}, "data": {"subzet": 3},
                      "sparsify": {"method": "rgl", "sparsity": 1.5, "pattern": "3:2", "distribution": "erx"},
                      "train": {"epochs": "ten", "optimizer": "adamx"}, "extra": 1})
    text = "\n".join(errors)
    assert "extra: unknown key; valid keys: name, description, seed, model, data, sparsify, train, outputs" in text
    assert "model.name: 'resnet' is not one of: lenet300100, lenet5, resnet18, smallvgg" in text
    assert "data.subzet: unknown key; valid keys in data: name, data_dir, subset" in text
    assert f"sparsify.method: 'rgl' is not one of: {', '.join(sn.list_methods())}" in text
    assert "sparsify.sparsity: expected a number in [0, 1), got 1.5" in text
    assert "sparsify.pattern: '3:2' is not one of: N:M, blockHxW, channel, channel_in, unstructured" in text
    assert f"sparsify.distribution: 'erx' is not one of: {', '.join(sn.list_distributions())}" in text
    assert "train.epochs: expected an integer >= 0, got 'ten'" in text
    assert "train.optimizer: 'adamx' is not one of: adam, adamw, sgd" in text
    with pytest.raises(RecipeError, match=r"^r.yaml: "):
        validate({"sparsify": {"method": "rgl"}}, "r.yaml")


def test_required_and_cross_field_checks():
    assert _errors({}) == ["sparsify.method: required (a registered method (sparsenn.list_methods()))"]
    assert "sparsify.sparsity: required for pattern 'unstructured'" in _errors({"sparsify": {"method": "random"}})[0]
    validate({"sparsify": {"method": "magnitude", "pattern": "2:4"}})  # N:M implies the sparsity
    errors = _errors({"model": {"args": {"hidden": 3}},
                      "sparsify": {"method": "rigl", "sparsity": 0.9, "method_args": {"total_steps": 5, "foo": 1}}})
    assert errors == [
        "model.args.hidden: model 'lenet300100' does not take 'hidden'; it takes: in_features, num_classes",
        "sparsify.method_args.foo: method 'rigl' does not take 'foo'; it takes: update_every, drop_fraction, "
        "drop_schedule, end_fraction, init",
        "sparsify.method_args.total_steps: set by the runner (train.epochs x batches per epoch); leave it out",
    ]
    assert _errors({"sparsify": {"method": "l1_filter", "sparsity": 0.5}}) == [
        "sparsify.pattern: method 'l1_filter' cannot produce pattern 'unstructured'; it supports: channel"]
    assert "data.data_dir: required for data.name 'mnist'" in _errors(
        {"data": {"name": "mnist"}, "sparsify": {"method": "random", "sparsity": 0.5}})[0]
    assert _errors({"data": {"name": "mnist", "data_dir": "/no/such/dir"},
                    "sparsify": {"method": "random", "sparsity": 0.5}}) == ["data.data_dir: no folder '/no/such/dir'"]


def test_schedule_mapping_is_checked_key_by_key():
    def errs(schedule):
        return _errors({"sparsify": {"method": "magnitude", "sparsity": 0.9, "schedule": schedule}})

    assert errs("cubic") == [f"sparsify.schedule: 'cubic' is not one of: {', '.join(sn.list_schedules())}"]
    assert errs({"begin": 0.1}) == [f"sparsify.schedule.name: required (one of: {', '.join(sn.list_schedules())})"]
    assert errs({"name": "polynomial", "rounds": 3, "end": 1.5, "begin": 0.2, "frequency": 2, "updates": 3}) == [
        "sparsify.schedule.rounds: unknown key for schedule 'polynomial'; valid keys: name, begin_step, end_step, "
        "frequency, exponent, begin, end, updates",
        "sparsify.schedule.end: expected a number in [0, 1], got 1.5 (a fraction of the training steps)",
        "sparsify.schedule: give either updates or frequency, not both",
    ]
    assert errs({"name": "linear", "begin": 0.6, "end": 0.2}) == [
        "sparsify.schedule: begin (0.6) must be <= end (0.2)"]


def test_schedule_fractions_become_steps():
    assert _schedule({"name": "polynomial", "begin": 0.1, "end": 0.7, "updates": 6, "exponent": 2}, 100) == {
        "name": "polynomial", "exponent": 2, "begin_step": 10, "end_step": 70, "frequency": 10}
    assert _schedule("one_shot", 100) == "one_shot" and _schedule(None, 5) is None


def test_yaml_errors_overrides_and_files():
    with pytest.raises(RecipeError, match=r"bad.yaml: line 2, column 1: not valid YAML"):
        parse_recipe("model: [\n", "bad.yaml")
    r = parse_recipe("sparsify: {method: random, sparsity: 0.5}\n", "mine.yaml",
                     ["train.epochs=3", "data.subset=100", "sparsify.exclude=[fc3.weight]", "outputs.dir=out"])
    assert r["name"] == "mine" and r["train"]["epochs"] == 3 and r["data"]["subset"] == 100
    assert r["sparsify"]["exclude"] == ["fc3.weight"] and r["outputs"]["dir"] == "out"
    with pytest.raises(RecipeError, match=r"--set 'train.epochs': expected KEY.PATH=VALUE"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(RecipeError, match=r"--set 'seed.x=1': seed is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=1"])
    with pytest.raises(FileNotFoundError, match=r"no recipe file 'nope.yaml' \(bundled examples: apoz"):
        load_recipe("nope.yaml")
    with pytest.raises(ValueError, match="no bundled example recipe 'nope'; valid: apoz"):
        example_path("nope")
    assert load_recipe("rigl")["sparsify"]["method"] == "rigl"  # a bundled name works as a path
    assert "sparsify:" in describe() and "method: (required)" in describe()


def test_prepare_rejects_what_cannot_run_before_training():
    def prep(*sets, base="magnitude"):
        with pytest.raises(RecipeError) as e:
            prepare(load_recipe(base, [*TINY, *sets]), "r.yaml")
        return str(e.value)

    assert "model.name: 'lenet5' does not accept digits inputs of shape (1, 8, 8)" in prep("model.name=lenet5")
    assert "sparsify: " in prep("sparsify.pattern=block7x7")  # 7x7 blocks do not tile 300x64
    assert "train.epochs: method 'rigl' trains with the sparsifier; needs epochs >= 1" in prep(
        "train.epochs=0", base="rigl")
    msg = prep("data.subset=128", "sparsify.schedule={name: iterative, rounds: 5, end: 1.0}")
    assert "sparsify.schedule: iterative: rounds=5 need end_step - begin_step >= 4, got 2" in msg
    assert "(with 2 training steps: train.epochs=1 x 2 batches)" in msg


@pytest.mark.parametrize("name", list_examples())
def test_bundled_example_runs_on_tiny_data(name, tmp_path):
    recipe = load_recipe(name, [*TINY, f"train.dense_epochs={min(1, load_recipe(name)['train']['dense_epochs'])}"])
    result = run_recipe(recipe, out_dir=tmp_path, progress=False, print_fn=lambda *a: None)
    target = recipe["sparsify"]["sparsity"]
    if recipe["sparsify"]["pattern"] == "unstructured":
        assert result.sparsity == pytest.approx(target, abs=0.01)
    else:  # channel pruning: every scored layer at the target, the classifier kept dense
        assert 0 < result.sparsity <= target + 0.01
    assert 0 <= result.accuracy <= 1
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "report.txt").is_file()
    assert "total" in (tmp_path / "report.txt").read_text()


def test_checkpoint_rebuilds_the_model_with_its_masks(tmp_path):
    recipe = load_recipe("magnitude", [*TINY, "train.dense_epochs=1"])
    result = run_recipe(recipe, out_dir=tmp_path, progress=False, print_fn=lambda *a: None)
    model, meta = model_from_checkpoint(tmp_path / "model.safetensors")
    assert meta["model"] == {"name": "lenet300100", "args": {}} and meta["input_shape"] == [1, 8, 8]
    assert meta["metrics"]["accuracy"] == pytest.approx(result.accuracy)
    for (name, p, mask), (_, q, mask2) in zip(sn.iter_masks(result.model), sn.iter_masks(model)):
        assert torch.equal(p, q) and torch.equal(mask, mask2), name
    sn.save(tmp_path / "plain.safetensors", model)
    with pytest.raises(ValueError, match="does not say which model it holds.*--model NAME"):
        model_from_checkpoint(tmp_path / "plain.safetensors")
    other, _ = model_from_checkpoint(tmp_path / "plain.safetensors", "lenet300100", {"in_features": 64})
    assert sn.sparsity(other) == pytest.approx(0.9, abs=1e-3)


def test_html_and_markdown_outputs(tmp_path):
    recipe = load_recipe("rigl", ["data.subset=256", "data.test_subset=64", "train.epochs=1",
                                  "sparsify.method_args.update_every=1", "outputs.report=[markdown, html]"])
    result = run_recipe(recipe, out_dir=tmp_path, progress=False, print_fn=lambda *a: None)
    assert set(result.files) == {"checkpoint", "markdown report", "html report"}
    html = (tmp_path / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') >= 4 and "Mask updates (rigl)" in html
    assert "rigl" in (tmp_path / "report.md").read_text() and (tmp_path / "plots" / "mask_heatmaps.png").is_file()


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not README.is_file(), reason="no README.md next to the tests (not a source checkout)")
def test_the_readme_recipe_is_valid_and_runs(tmp_path):
    section = README.read_text(encoding="utf-8").split("## The sparsenn command", 1)[1].split("\n## ", 1)[0]
    text = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    recipe = parse_recipe(text, "gmp90.yaml")
    assert recipe["sparsify"]["method"] == "magnitude" and recipe["outputs"]["convert"] is True
    tiny = parse_recipe(text, "gmp90.yaml", [*TINY, "train.dense_epochs=1", "outputs.convert=false"])
    result = run_recipe(tiny, out_dir=tmp_path, progress=False, print_fn=lambda *a: None)
    assert result.sparsity == pytest.approx(0.9, abs=0.01) and (tmp_path / "model.safetensors").is_file()


def test_an_output_folder_that_cannot_be_created_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    printed = []
    recipe = load_recipe("random", [*TINY, f"outputs.dir={tmp_path / 'file' / 'run'}"])
    with pytest.raises(RecipeError, match=r"random.yaml: outputs.dir: cannot create '.*run': '.*file' is a file"):
        run_recipe(recipe, source="random.yaml", progress=False, print_fn=printed.append)
    assert printed == []  # nothing trained

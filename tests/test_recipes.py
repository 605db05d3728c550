"""Recipes: schema validation with key paths, overrides, the runner, and every bundled example."""

import os
import re
import shutil
import subprocess
import time
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
from sparsenn.cli.main import main as main_exit
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
    assert "sparsify.pattern: '3:2' is not one of: N:M, blockHxW, channel, channel_in, per_row, unstructured" in text
    assert f"sparsify.distribution: 'erx' is not one of: {', '.join(sn.list_distributions())}" in text
    assert "train.epochs: expected an integer in [0, 10000], got 'ten'" in text
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


# ----------------------------------------------------------------------------- hostile recipe files


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: 9 aliases of 9 aliases of ... of 9 strings expand to 9**(levels+1) nodes."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"sparsify: *a{levels}", ""])


def test_an_alias_bomb_fails_fast_with_a_recipe_error(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    for attempt in (lambda: parse_recipe(billion_laughs(), "bomb.yaml"), lambda: load_recipe(path)):
        start = time.perf_counter()
        with pytest.raises(RecipeError, match=r"^bomb.yaml: .*aliases expand to more than 100000 nodes") as e:
            attempt()
        assert time.perf_counter() - start < 5, "the bomb was expanded (27 s before the cap)"
        assert len(str(e.value)) < 500
    flow = "[&a0 [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)) + "]"  # 10**7 nodes in one value
    with pytest.raises(RecipeError, match=r"--set 'sparsify.exclude=.*\.\.\.': .*aliases expand"):
        apply_overrides({}, ["sparsify.exclude=" + flow])
    with pytest.raises(RecipeError, match=r"r.yaml: line 1, column \d+: an alias refers to its own anchor"):
        parse_recipe("model: &m {args: *m}\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"r.yaml: line 1, column \d+: nested deeper than 64 levels"):
        parse_recipe("model: " + "[" * 5000 + "]" * 5000 + "\n", "r.yaml")


def test_a_huge_recipe_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB that read_text would allocate
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"huge.yaml: the file has 67108864 bytes; a recipe may have at most "
                                          r"1048576"):
        load_recipe(path)
    assert time.perf_counter() - start < 5  # a bound that a busy machine keeps
    with pytest.raises(RecipeError, match=r"big.yaml: the text has 1048577 bytes; a recipe may have at most"):
        parse_recipe("#" * (1 << 20) + "\n", "big.yaml")


def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\xe9 au lait\nsparsify: {method: random, sparsity: 0.5}\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"^latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 16\)"):
        load_recipe(path)
    assert main_exit(["run", str(path), "--check"]) == 2


def test_yaml_numbers_are_read_as_in_yaml_1_2():
    """YAML 1.1 reads 2:4 as the base-60 number 124 and 1e-3 as a string; recipes use YAML 1.2's numbers."""
    r = parse_recipe("sparsify: {method: magnitude, pattern: 2:4}\ntrain: {lr: 1e-3, sparse_lr: 5E-4}\n", "r.yaml")
    assert r["sparsify"]["pattern"] == "2:4" and r["train"]["lr"] == 1e-3 and r["train"]["sparse_lr"] == 5e-4
    r = parse_recipe("sparsify: {method: random, sparsity: .5}\ntrain: {epochs: 3, lr: 0.01}\n", "r.yaml",
                     ["sparsify.pattern=1:4", "train.weight_decay=1e-4"])
    assert r["sparsify"]["pattern"] == "1:4" and r["train"]["weight_decay"] == 1e-4
    assert r["train"]["epochs"] == 3 and r["sparsify"]["sparsity"] == 0.5


# ----------------------------------------------------------------------------- absurd sizes


@pytest.mark.parametrize("sets,message", [
    (["seed=100000000000000000000000"],
     "seed: expected an integer in [0, 4294967295], got 100000000000000000000000"),
    (["model.args.num_classes=1000000000000"],
     "model.args.num_classes: expected an integer in [1, 100000], got 1000000000000"),
    (["model.name=smallvgg", "model.args.widths=[32, 100000000]"],
     "model.args.widths[1]: expected an integer in [-1048576, 1048576], got 100000000"),
    (["data.batch_size=10000000000"], "data.batch_size: expected an integer in [1, 65536], got 10000000000"),
    (["data.subset=100000000000000"], "data.subset: expected an integer in [1, 2147483648], got 100000000000000"),
    (["train.epochs=1000000000"], "train.epochs: expected an integer in [0, 10000], got 1000000000"),
    (["train.dense_epochs=1000000000"], "train.dense_epochs: expected an integer in [0, 10000], got 1000000000"),
    (["sparsify.score_batches=1000000000"],
     "sparsify.score_batches: expected an integer in [1, 10000], got 1000000000"),
])
def test_absurd_sizes_are_refused_naming_the_key_and_the_range(sets, message):
    start = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        load_recipe("magnitude", sets)
    assert f"magnitude.yaml: {message}" in str(e.value)
    assert time.perf_counter() - start < 5  # a bound that a busy machine keeps


def test_a_model_too_large_to_build_is_refused_before_building():
    recipe = load_recipe("magnitude", [*TINY, "model.name=smallvgg", "model.args.widths=[1000000]",
                                       "data.name=digits"])
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"r.yaml: model.args: model 'smallvgg' with these arguments has "
                                          r"9000023000010 parameters; at most 1000000000"):
        prepare(recipe, "r.yaml")
    assert time.perf_counter() - start < 5  # a bound that a busy machine keeps


def test_a_checkpoint_asking_for_an_absurd_input_shape_is_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    sn.save(path, torch.nn.Linear(2, 2), extra={"sparsenn": {"model": {"name": "lenet300100", "args": {}},
                                                             "input_shape": [100000, 100000, 100]}})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"input_shape: \[100000, 100000, 100\] has 1000000000000 elements per "
                                         r"sample; at most 16777216"):
        model_from_checkpoint(path)
    for shape, problem in (([0, 5], "every dimension must be an integer >= 1"), ("x", "expected a list of"),
                           ([1] * 9, "at most 8 dimensions")):
        sn.save(path, torch.nn.Linear(2, 2), extra={"sparsenn": {"model": {"name": "lenet300100", "args": {}},
                                                                 "input_shape": shape}})
        with pytest.raises(ValueError, match=f"input_shape: .*{problem}"):
            model_from_checkpoint(path)
    sn.save(path, torch.nn.Linear(2, 2), extra={"sparsenn": {"model": {"name": "lenet300100",
                                                                       "args": {"num_classes": 10**12}}}})
    with pytest.raises(ValueError, match=r"model.args.num_classes: expected an integer in \[1, 100000\]"):
        model_from_checkpoint(path)
    assert time.perf_counter() - start < 5  # a bound that a busy machine keeps


# ----------------------------------------------------------------------------- what --check must catch


def _prepare_error(*sets, base="magnitude", out_dir=None):
    with pytest.raises(RecipeError) as e:
        prepare(load_recipe(base, [*TINY, *sets]), "r.yaml", out_dir=out_dir)
    return str(e.value)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a folder nobody can write in)")
def test_an_output_folder_nobody_can_write_in_fails_the_check():
    assert _prepare_error("outputs.dir=/proc/sparsenn-run/out") == (
        "r.yaml: outputs.dir: cannot write in '/proc' to create '/proc/sparsenn-run/out' "
        "([Errno 2] No such file or directory)")
    assert "r.yaml: output folder: cannot write in '/proc'" in _prepare_error(out_dir="/proc/sparsenn-run")


def _lock(folder: Path, locked: bool) -> None:
    """Make ``folder`` read-only: chmod, or for root (who writes anyway) the immutable attribute."""
    if os.geteuid() != 0:
        folder.chmod(0o555 if locked else 0o755)
    elif subprocess.run(["chattr", "+i" if locked else "-i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without chattr: no folder is read-only")


@pytest.mark.skipif(os.name != "posix" or shutil.which("chattr") is None and os.geteuid() == 0,
                    reason="needs a folder this user cannot write in")
def test_a_read_only_output_folder_fails_the_check(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    _lock(locked, True)
    try:
        assert f"outputs.dir: cannot write in '{locked}' to create '{locked / 'run'}'" in _prepare_error(
            f"outputs.dir={locked / 'run'}")
        assert f"output folder: cannot write in '{locked}' (" in _prepare_error(out_dir=locked)
    finally:
        _lock(locked, False)


def test_the_check_probe_leaves_nothing_behind(tmp_path):
    prepare(load_recipe("magnitude", [*TINY, f"outputs.dir={tmp_path / 'a' / 'b'}"]), "r.yaml")
    assert list(tmp_path.iterdir()) == []  # nothing created: neither the folders nor the probe


def test_a_gradual_schedule_an_n_m_pattern_cannot_follow_fails_the_check():
    """N:M fixes each layer's density at N/M: a ramp from 0 asks the first mask update for density 1."""
    msg = _prepare_error("sparsify.pattern=2:4", "sparsify.sparsity=null",
                         "sparsify.schedule={name: polynomial, begin: 0.25, end: 0.75, updates: 2}")
    assert msg == ("r.yaml: sparsify.schedule: the mask update at step 1 (sparsity 0) is out of reach: pattern 2:4 "
                   "keeps at most 0.5 of the weights; density 1 (sparsity 0) is out of reach; N:M patterns fix the "
                   "sparsity: use schedule one_shot (or constant), or pattern unstructured for a gradual ramp")
    prepare(load_recipe("magnitude", [*TINY, "sparsify.pattern=2:4", "sparsify.sparsity=null",
                                      "sparsify.schedule={name: one_shot, begin_step: 1}"]), "r.yaml")


def test_a_schedule_that_ends_after_the_run_fails_the_check():
    msg = _prepare_error("sparsify.schedule={name: polynomial, end_step: 100000, frequency: 10}")
    assert msg == ("r.yaml: sparsify.schedule: the run has 4 steps with the sparsifier (train.epochs=1 x 4 "
                   "batches) but the schedule reaches its target 0.9 at step 100000; at step 4 it is at sparsity "
                   "0.000108 (give end as a fraction of the run, e.g. end: 0.75, or fewer steps)")
    assert "reaches its target 0.9 at step 9" in _prepare_error("sparsify.schedule={name: one_shot, begin_step: 9}")


def test_a_run_that_misses_its_target_fails_after_writing_its_outputs(tmp_path, monkeypatch):
    """The check after the run: a training loop that never stepped the sparsifier ends dense."""
    from sparsenn.cli.recipes.runner import TargetMissed
    from sparsenn.train.sparsifier import Sparsifier

    monkeypatch.setattr(Sparsifier, "step", lambda self: False)
    recipe = load_recipe("magnitude", [*TINY, "train.dense_epochs=0",
                                       "sparsify.schedule={name: polynomial, begin: 0.0, end: 1.0}"])
    with pytest.raises(TargetMissed, match=r"the run ended at sparsity 0.0% \(the schedule's last mask update set "
                                           r"0, at step 0\) but the target is 90.0%; the outputs are in "):
        run_recipe(recipe, out_dir=tmp_path, progress=False, print_fn=lambda *a: None)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "report.txt").is_file()

"""The `sparsenn` command: help, exit codes, run/prune/report/convert/bench, quiet mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsenn as sn
from sparsenn.cli.main import main
from sparsenn.models.zoo import LeNet300100
from sparsenn.cli.recipes import model_from_checkpoint
from sparsenn.backend.runtime import load as load_converted

TINY = ["--set", "data.subset=256", "--set", "data.test_subset=64", "--set", "train.epochs=1",
        "--set", "train.dense_epochs=1"]
COMMANDS = ["demo", "run", "prune", "report", "bench", "convert", "compress", "export", "list"]

try:
    from sparsenn.backend.inference import runtime_convert

    runtime_convert()
    HAVE_RUNTIME = True
except Exception:  # noqa: BLE001
    HAVE_RUNTIME = False
needs_runtime = pytest.mark.skipif(not HAVE_RUNTIME, reason="sparsenn.backend.runtime is not available")


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint written by `sparsenn run` (magnitude, 90%) on tiny digits."""
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "magnitude", "--quiet", "--out", str(out), *TINY, "--set", "outputs.report=[text]"]) == 0
    return out / "model.safetensors"


def test_list_and_every_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "erk" in out and "N:M" in out and "polynomial" in out
    assert "lenet300100" in out and "rigl" in out.split("recipes")[1]
    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        examples = text.split("examples:\n")[1]
        assert f"  sparsenn {command}" in examples, command
        assert "%%" not in text, command  # descriptions and epilogs are not %-formatted: one % shows as is
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0 and all(c in help_text for c in COMMANDS)
    assert "%%" not in help_text and "GMP 90%, RigL 90%" in help_text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo_help = " ".join(capsys.readouterr().out.split())  # the description is wrapped to the terminal
    assert "prune a copy to 90% by gradual magnitude pruning" in demo_help and "RigL at 90%," in demo_help
    assert main([]) == 2


def test_help_wraps_prose_and_keeps_examples_as_written():
    from sparsenn.cli.parser import _HelpFormatter

    text = "A long sentence " * 10 + "\nexamples:\n  sparsenn demo     short   spacing kept\n\nLast 100% line."
    out = _HelpFormatter("sparsenn", width=40)._fill_text(text, 40, "")
    lines = out.splitlines()
    assert all(len(line) <= 40 for line in lines[:lines.index("examples:")])
    assert "  sparsenn demo     short   spacing kept" in lines and lines[-1] == "Last 100% line."


def test_the_process_exit_codes(tmp_path):
    """Through `python -m sparsenn.cli` (what the console script does): codes and messages, no traceback."""
    root = str(Path(sn.__file__).resolve().parents[1])  # importable from tmp_path, installed or not
    env = {**os.environ, "SPARSENN_QUIET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}

    def sparsenn(*argv):
        done = subprocess.run([sys.executable, "-m", "sparsenn.cli", *argv], capture_output=True, text=True,
                              cwd=tmp_path, env=env, check=False)
        assert "Traceback" not in done.stderr, done.stderr
        return done.returncode, done.stderr

    code, err = sparsenn("run", "rigl", "--frobnicate")
    assert code == 2 and "sparsenn: error: unrecognized arguments: --frobnicate" in err
    code, err = sparsenn("run", "missing.yaml")
    assert code == 2 and "sparsenn: error: no recipe file 'missing.yaml' (bundled examples: apoz" in err
    (tmp_path / "bad.yaml").write_text("sparsify: {method: magnitude, sparsity: 0.9, distribution: erx}\n"
                                       "train: {epochs: 1, lr_decay: 0.1}\n")
    code, err = sparsenn("run", "bad.yaml")
    assert code == 2
    assert (f"sparsenn: error: bad.yaml: sparsify.distribution: 'erx' is not one of: "
            f"{', '.join(sn.list_distributions())}") in err
    assert ("sparsenn: error: bad.yaml: train.lr_decay: unknown key; valid keys in train: dense_epochs, epochs, "
            "optimizer, lr, sparse_lr") in err
    (tmp_path / "taken").write_text("a file where the output folder should go")
    code, err = sparsenn("run", "random", "--out", "taken/run", "--set", "data.subset=64")
    assert code == 2 and "output folder: cannot create 'taken/run': 'taken' is a file" in err
    code, err = sparsenn("convert", "nope.safetensors", "-o", "x.sparse")
    assert code == 2 and err == "sparsenn: error: no checkpoint at 'nope.safetensors'\n"


def test_demo_with_unusable_data_files_exits_2(tmp_path, capsys):
    assert main(["demo", "--data", "mnist", "--data-dir", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsenn: error: --data-dir: missing mnist file 'train-images-idx3-ubyte.gz' in ")


def test_bad_usage_exits_2_with_a_message(capsys):
    for argv, message in [(["demo", "--sparsity", "1.5"], "--sparsity: must be in [0, 1), got 1.5"),
                          (["frobnicate"], "invalid choice: 'frobnicate'"),
                          (["bench", "--batch-sizes", "1,x"], "expected comma-separated ints, got '1,x'"),
                          (["list", "--threads", "0"], "--threads: must be an integer in [1, 1024], got 0"),
                          (["demo", "--seed", str(10**23)],
                           "--seed: must be an integer in [0, 4294967295], got 100000000000000000000000"),
                          (["demo", "--dense-epochs", "1000000000"],
                           "--dense-epochs: must be an integer in [1, 10000], got 1000000000"),
                          (["demo", "--subset", "0"], "--subset: must be an integer in [1, 2147483648], got 0"),
                          (["prune", "c.safetensors", "--sparsity", "0.9", "-o", "p.safetensors",
                            "--finetune-epochs", "1000000"],
                           "--finetune-epochs: must be an integer in [0, 10000], got 1000000"),
                          (["bench", "--batch-sizes", "1,100000000"],
                           "--batch-sizes: every value must be an integer in [1, 65536], got 100000000"),
                          (["convert", "c.safetensors", "-o", "c.sparse", "--batch-sizes", "0"],
                           "--batch-sizes: every value must be an integer in [1, 65536], got 0")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert main(["demo", "--data", "mnist"]) == 2
    assert capsys.readouterr().err == ("sparsenn: error: --data mnist needs --data-dir DIR (the folder holding "
                                       "the IDX gzip files)\n")


def test_invalid_recipe_exits_2_naming_the_key_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsify:\n  method: rgl\n  sparsity: 0.9\ntrain: {epoch: 3}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"sparsenn: error: bad.yaml: sparsify.method: 'rgl' is not one of: {', '.join(sn.list_methods())}" in err
    assert "sparsenn: error: bad.yaml: train.epoch: unknown key; valid keys in train: dense_epochs, epochs" in err
    assert "Traceback" not in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "no recipe file" in capsys.readouterr().err
    assert main(["run"]) == 2
    assert main(["run", "rigl", "--set", "model.name=lenet5"]) == 2
    assert "model.name: 'lenet5' does not accept digits inputs" in capsys.readouterr().err
    assert main(["run", "rigl", "--check"]) == 0
    assert "rigl.yaml: valid" in capsys.readouterr().out
    assert main(["run", "--schema"]) == 0
    assert "sparsify:" in capsys.readouterr().out


def test_check_catches_what_would_fail_after_training(tmp_path, capsys):
    """--check runs prepare: the output folder, a schedule past the run, an N:M pattern on a ramp."""
    base = ["run", "magnitude", "--check", "-q", "--set", "data.subset=256"]
    if Path("/proc/self").is_dir():
        assert main([*base, "--out", "/proc/sparsenn-run"]) == 2
        assert "magnitude.yaml: output folder: cannot write in '/proc'" in capsys.readouterr().err
    assert main([*base, "--set", "sparsify.schedule={name: polynomial, end_step: 100000}"]) == 2
    assert "the schedule reaches its target 0.9 at step 100000" in capsys.readouterr().err
    assert main([*base, "--set", "sparsify.pattern=2:4", "--set", "sparsify.sparsity=null"]) == 2
    assert "N:M patterns fix the sparsity: use schedule one_shot" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "new")]) == 0 and not (tmp_path / "new").exists()


def test_a_run_that_misses_its_target_exits_1(tmp_path, monkeypatch, capsys):
    from sparsenn.train.sparsifier import Sparsifier

    monkeypatch.setattr(Sparsifier, "step", lambda self: False)  # a loop that never steps the sparsifier
    assert main(["run", "magnitude", "-q", "--out", str(tmp_path), *TINY, "--set", "outputs.report=[text]"]) == 1
    err = capsys.readouterr().err
    assert "sparsenn: error: run failed: TargetMissed: the run ended at sparsity 0.0%" in err
    assert (tmp_path / "model.safetensors").is_file()


def test_failure_while_running_exits_1_without_traceback(monkeypatch, tmp_path, capsys):
    import sparsenn.cli.recipes.runner as runner

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(runner, "write_outputs", boom)
    assert main(["run", "random", "-q", "--out", str(tmp_path), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("sparsenn: error: run failed: RuntimeError: disk full")
    assert "Traceback" not in err


def test_run_shows_progress_unless_quiet(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPARSENN_QUIET", raising=False)
    args = ["run", "random", "--out", str(tmp_path), *TINY, "--set", "outputs.report=[text]"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "random:" in captured.err and "step" in captured.err  # the bar, on stderr
    assert "checkpoint: " in captured.out and "text report: " in captured.out
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SPARSENN_QUIET", "1")
    assert main(args) == 0
    assert capsys.readouterr().err == ""


def test_prune_a_checkpoint_and_a_recipe(trained, tmp_path, capsys):
    out = tmp_path / "p95.safetensors"
    assert main(["prune", str(trained), "--sparsity", "0.95", "-o", str(out), "-q"]) == 0
    assert "pruned to 95.00% with magnitude, test accuracy" in capsys.readouterr().out
    model, meta = model_from_checkpoint(out)
    assert sn.sparsity(model) == pytest.approx(0.95, abs=1e-3) and meta["pruned"]["method"] == "magnitude"
    before, _ = model_from_checkpoint(trained)  # 90% pruned weights stay pruned at 95%
    for (_, p, _), (_, q, _) in zip(sn.iter_masks(before), sn.iter_masks(model)):
        assert bool(((p == 0) <= (q == 0)).all())
    out2 = tmp_path / "snip.safetensors"
    assert main(["prune", str(trained), "--sparsity", "0.95", "--method", "snip", "--finetune-epochs", "1", "-q",
                 "-o", str(out2)]) == 0
    assert sn.sparsity(model_from_checkpoint(out2)[0]) == pytest.approx(0.95, abs=1e-3)
    capsys.readouterr()
    assert main(["prune", str(trained), "--sparsity", "0.5", "-o", str(out2)]) == 2
    assert "--sparsity 0.5 is below the checkpoint's sparsity 0.9; prune only removes weights" in \
        capsys.readouterr().err
    out3 = tmp_path / "r.safetensors"
    assert main(["prune", "--recipe", "taylor", "--sparsity", "0.8", "-q", "-o", str(out3), *TINY]) == 0
    assert sn.sparsity(model_from_checkpoint(out3)[0]) == pytest.approx(0.8, abs=1e-3)
    capsys.readouterr()
    assert main(["prune", str(trained), "--sparsity", "0.9", "--method", "rigl", "-o", str(out)]) == 2
    assert "prune needs a pruning criterion" in capsys.readouterr().err
    assert main(["prune", "--sparsity", "0.9", "-o", str(out)]) == 2
    assert "either a CHECKPOINT or --recipe" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "nope.safetensors"), "--sparsity", "0.9", "-o", str(out)]) == 2
    assert f"no checkpoint at '{tmp_path / 'nope.safetensors'}'\n" in capsys.readouterr().err
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trained.read_bytes()[:4000])
    assert main(["report", str(truncated)]) == 2
    assert f"sparsenn: error: '{truncated}' is not a readable checkpoint (" in capsys.readouterr().err


def test_report_text_markdown_html(trained, tmp_path, capsys):
    assert main(["report", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "fc1.weight" in out and "total" in out and "MACs" in out
    assert main(["report", str(trained), "--format", "markdown"]) == 0
    assert "| layer | shape |" in capsys.readouterr().out
    assert main(["report", str(trained), "--format", "html", "--out", str(tmp_path / "rep"), "-q"]) == 0
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') >= 4 and "Recipe" in html
    plain = tmp_path / "plain.safetensors"
    sn.save(plain, model_from_checkpoint(trained)[0])
    assert main(["report", str(plain)]) == 2
    assert "pass --model NAME" in capsys.readouterr().err
    assert main(["report", str(plain), "--model", "lenet300100", "--model-arg", "in_features=64"]) == 0
    assert main(["report", str(plain), "--model", "lenet5"]) == 2
    assert "checkpoint does not fit the model" in capsys.readouterr().err


@needs_runtime
def test_convert_a_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "model.sparse"
    assert main(["convert", str(trained), "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "sparsenn conversion:" in text and "KiB stored" in text and out.is_file()
    model, _ = model_from_checkpoint(trained)
    sn.remove_masks(model)
    loaded = load_converted(out, LeNet300100(in_features=64))
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_convert_without_the_runtime_fails_with_a_message(trained, tmp_path, capsys, monkeypatch):
    import sparsenn.backend.inference as inference

    def missing():
        raise inference.RuntimeUnavailable("the sparse runtime is not available (sparsenn.backend.runtime: gone)")

    monkeypatch.setattr(inference, "runtime_convert", missing)
    assert main(["convert", str(trained), "-o", str(tmp_path / "m.sparse")]) == 1
    err = capsys.readouterr().err
    assert "sparsenn: error: convert failed: RuntimeUnavailable: the sparse runtime is not available" in err


@needs_runtime
def test_builtin_bench(capsys):
    assert main(["bench", "-q", "--sparsities", "0.9", "--batch-sizes", "1"]) == 0
    out = capsys.readouterr().out
    assert "lenet300100: magnitude-pruned" in out and "90%" in out and "b=1 speedup" in out


def test_bench_script_errors(capsys):
    assert main(["bench", "--script", "nope"]) == 2
    assert "no bench script 'nope'; valid: " in capsys.readouterr().err
    assert main(["bench", "--sparsities", "1.5"]) == 2


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "sparsenn.cli", "list"], capture_output=True, text=True, check=True)
    assert "methods" in out.stdout


# ----------------------------------------------------------------------------- user models: package.module:factory

USER_MODELS = '''
from torch import nn


def make_net(in_features, width=32, num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes))


def not_a_module(**kwargs):
    return [1, 2]


CONSTANT = 3
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A package ``usermodels_cli`` with a model factory, importable from tmp_path."""
    pkg = tmp_path / "src" / "usermodels_cli"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield "usermodels_cli.models"
    for name in [n for n in sys.modules if n.split(".")[0] == "usermodels_cli"]:
        del sys.modules[name]


def test_a_recipe_runs_a_users_model_factory(user_models, tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f'model: {{name: "{user_models}:make_net", args: {{width: 16}}}}\n'
                      "sparsify: {method: magnitude, sparsity: 0.8, schedule: one_shot}\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-q", "--out", str(out), *TINY, "--set", "outputs.report=[text]"]) == 0
    model, meta = model_from_checkpoint(out / "model.safetensors", f"{user_models}:make_net",
                                        {"in_features": 64, "width": 16})
    assert meta["model"]["name"] == f"{user_models}:make_net" and model[1].weight.shape == (16, 64)
    assert sn.sparsity(model) == pytest.approx(0.8, abs=1e-3)
    capsys.readouterr()
    # the checkpoint names the factory, but a file never makes sparsenn import code by itself
    assert main(["report", str(out / "model.safetensors")]) == 2
    assert (f"names the model factory '{user_models}:make_net'; sparsenn imports code only when you name it: pass "
            f"--model {user_models}:make_net") in capsys.readouterr().err
    assert main(["report", str(out / "model.safetensors"), "--model", f"{user_models}:make_net",
                 "--model-arg", "width=16"]) == 0  # in_features from the checkpoint's input shape
    assert "1.weight" in capsys.readouterr().out
    recipe.write_text(f'model: {{name: "{user_models}:make_net", args: {{depth: 3}}}}\n'
                      "sparsify: {method: magnitude, sparsity: 0.8}\n")
    assert main(["run", str(recipe), "--check"]) == 2
    assert (f"mine.yaml: model.args.depth: model '{user_models}:make_net' does not take 'depth'; it takes: "
            f"in_features, width, num_classes") in capsys.readouterr().err


def test_prune_a_checkpoint_of_a_users_model(user_models, tmp_path, capsys):
    import importlib

    net = importlib.import_module(user_models).make_net(in_features=64, width=24)
    plain = tmp_path / "plain.safetensors"
    sn.save(plain, net)
    out = tmp_path / "p.safetensors"
    assert main(["prune", str(plain), "--sparsity", "0.7", "-q", "-o", str(out), "--model",
                 f"{user_models}:make_net", "--model-arg", "in_features=64", "--model-arg", "width=24"]) == 0
    assert "pruned to 69.99% with magnitude" in capsys.readouterr().out  # rounding per layer, biases dense
    model, meta = model_from_checkpoint(out, f"{user_models}:make_net", {"in_features": 64, "width": 24})
    assert sn.sparsity(model) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("model,message", [
    ("nosuchpkg_cli.models:make_net", "'nosuchpkg_cli.models:make_net': no module 'nosuchpkg_cli' (is its folder on "
                                      "sys.path"),
    ("{pkg}:make_nett", "'{pkg}:make_nett': '{pkg}' has no attribute 'make_nett'; its callables: make_net, "
                        "not_a_module"),
    ("{pkg}:CONSTANT", "'{pkg}:CONSTANT' is not callable (it is int)"),
    ("{pkg}:not_a_module", "{pkg}:not_a_module(in_features=64) returned list, not a torch.nn.Module"),
    ("{pkg}:", "'{pkg}:' is not a factory reference; expected package.module:function"),
    ("os:system", "'os:system': 'os' is a module of Python's standard library"),
    ("resnet", "unknown model 'resnet'; valid models: lenet300100, lenet5, resnet18, smallvgg, sparse_autoencoder "
               "(or a factory as package.module:function)"),
])
def test_a_bad_model_factory_exits_2_with_a_message(user_models, tmp_path, capsys, model, message):
    plain = tmp_path / "plain.safetensors"
    sn.save(plain, torch.nn.Linear(64, 10))
    model, message = model.format(pkg=user_models), message.format(pkg=user_models)
    assert main(["report", str(plain), "--model", model, "--model-arg", "in_features=64"]) == 2
    err = capsys.readouterr().err  # may be prefixed by the checkpoint's name ("...: cannot build the model ...")
    assert err.startswith("sparsenn: error: ") and message in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'model: {{name: "{model}", args: {{in_features: 64}}}}\nsparsify: {{method: random, '
                      f'sparsity: 0.5}}\n')
    assert main(["run", str(recipe), "--check"]) == 2
    err = capsys.readouterr().err
    assert "sparsenn: error: r.yaml: model." in err and (message.split(";")[0] in err or "is not one of" in err)

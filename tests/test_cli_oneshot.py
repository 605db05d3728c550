"""``sparsenn oneshot MODEL_DIR``: a folder in, a loadable pruned folder out; bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch

from sparsenn.cli.main import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a of to and in is it that for on with as be this are by an or from at not which".split()


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneshot")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 1, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    _tokenizer().save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    text = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3000,), generator=g))
    (root / "calib.txt").write_text(text)
    (root / "eval.txt").write_text(text[::-1])
    return root


def test_oneshot_writes_a_folder_transformers_and_sparsenn_load(folders, capsys):
    import sparsenn as sn

    out = folders / "out"
    rc = main(["-q", "oneshot", str(folders / "model"), "--method", "sparsegpt", "--pattern", "2:4", "--permute",
               "--calibration", str(folders / "calib.txt"), "--samples", "4", "--length", "32",
               "--eval", str(folders / "calib.txt"), "--eval-tokens", "256", "--window", "64", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "model.layers.1.mlp.down_proj" in text and "dense ->" in text and "pruned model:" in text
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (plain.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    masked = sn.from_pretrained(transformers.LlamaForCausalLM, out)
    assert all(sn.parse_pattern("2:4").obeys(m) for m in sn.get_masks(masked).values())
    report = json.loads((out / "sparsenn_oneshot.json").read_text())
    assert report["method"] == "sparsegpt" and len(report["layers"]) == 14


@pytest.mark.parametrize("args,message", [
    (["MISSING", "--calibration", "calib.txt"], "no such folder"),
    (["calib.txt", "--calibration", "calib.txt"], "calib.txt: not a folder"),
    (["model", "--calibration", "nothing.txt"], "nothing.txt': no such file"),
    (["model", "--calibration", "calib.txt", "--length", "100000"], "fewer than one sample of 100000"),
    (["model", "--calibration", "calib.txt", "--pattern", "3:7"], "pattern 3:7 needs an input dimension divisible "
                                                                  "by 7"),
    (["model", "--calibration", "calib.txt", "--blocks", "model.norm"], "not a non-empty ModuleList"),
])
def test_bad_input_exits_2_with_the_reason(folders, capsys, args, message):
    args = [str(folders / a) if a in ("MISSING", "model", "calib.txt", "nothing.txt") else a for a in args]
    rc = main(["-q", "oneshot", *args, "--samples", "2", "--length", "16", "--out", str(folders / "bad")]
              if "--length" not in args else ["-q", "oneshot", *args, "--out", str(folders / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (folders / "bad").exists()


def test_stream_writes_the_same_weights_one_block_at_a_time(folders, capsys):
    common = ["--method", "sparsegpt", "--calibration", str(folders / "calib.txt"), "--samples", "4", "--length",
              "32"]
    assert main(["-q", "oneshot", str(folders / "model"), *common, "--out", str(folders / "whole")]) == 0
    assert main(["-q", "oneshot", str(folders / "model"), *common, "--stream", "--out", str(folders / "streamed")]) == 0
    assert "written one block at a time" in capsys.readouterr().out
    a = transformers.AutoModelForCausalLM.from_pretrained(folders / "whole").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(folders / "streamed").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert transformers.AutoTokenizer.from_pretrained(folders / "streamed") is not None
    rc = main(["-q", "oneshot", str(folders / "model"), *common, "--stream", "--eval", str(folders / "calib.txt"),
               "--out", str(folders / "bad")])
    assert rc == 2 and "--eval needs the whole model" in capsys.readouterr().err

"""Flan-T5 backbone (full and LoRA) + GLUE text-to-text data and metrics, offline on tiny models."""

from __future__ import annotations

import json

import _hub_fixtures as fx
import pytest
import torch
from _hub_fixtures import fast_method_overrides, run_cli, seq_cfg, supported_protocol, t5_cfg

from otmf_exp.data import build_task_data
from otmf_exp.data.glue import GLUE8, PROMPTS, exact_match, render, score, spearman
from otmf_exp.errors import UserError
from otmf_exp.merging import METHODS
from otmf_exp.models import build_backbone
from otmf_exp.models.functional import swapped_parameters
from otmf_exp.offline import tiny_hub

#: methods whose reference supports CLIP only (they refuse a text backbone with one UserError line)

# shared fixtures (tests/_hub_fixtures.py)
_one_thread = fx._one_thread
_private_cache = fx._private_cache
hub_root = fx.hub_root


@pytest.fixture(scope="module")
def t5(hub_root):
    return build_backbone(t5_cfg(hub_root), torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def cola(t5, hub_root):
    return build_task_data("cola", seq_cfg("glue8", "glue", hub_root), t5)


def _inputs(t5, texts):
    enc = t5.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_glue8_config_and_prompts(make_cfg):
    cfg = make_cfg("task_seq=glue8")
    assert list(cfg.task_seq.tasks) == GLUE8 == sorted(GLUE8)
    assert (
        cfg.backbone.name == "flan_t5_base"
        and cfg.backbone.kind == "hf_t5"
        and cfg.backbone.variant == "full"
    )
    assert cfg.backbone.finetuned_lora == "tanganke/flan-t5-base_glue-{task}_lora-16"
    assert PROMPTS["mnli"].test_split == "validation_matched"
    assert all(PROMPTS[t].test_split == "validation" for t in GLUE8 if t != "mnli")
    text, answer = render("cola", {"sentence": "It runs.", "label": 1})
    assert "grammatically" in text and '"It runs."' in text and answer == "acceptable"
    assert render("cola", {"sentence": "x", "label": 0})[1] == "unacceptable"
    assert render("qnli", {"sentence": "s", "question": "q", "label": 0})[1] == "yes"
    assert render("rte", {"sentence1": "a", "sentence2": "b", "label": 0})[1] == "yes"
    assert render("mrpc", {"sentence1": "a", "sentence2": "b", "label": 0})[1] == "no"
    assert render("mnli", {"premise": "p", "hypothesis": "h", "label": 2})[1] == "contradiction"
    assert render("stsb", {"sentence1": "a", "sentence2": "b", "label": 3.14})[1] == "3.1"


def test_text_metrics():
    assert exact_match(["yes", " no", "maybe"], ["yes", "no", "no"]) == pytest.approx(200 / 3)
    assert spearman(["1.0", "2.0", "3.0"], ["0.5", "1.5", "4.0"]) == pytest.approx(100.0)
    assert spearman(["3.0", "2.0", "1.0"], ["0.5", "1.5", "4.0"]) == pytest.approx(-100.0)
    # unparsable answers read as 0.0; a constant answer has no rank correlation -> 0
    assert spearman(["oops", "2.0", "3.0"], ["0.5", "1.5", "4.0"]) == pytest.approx(100.0)
    assert spearman(["n/a", "n/a", "n/a"], ["0.5", "1.5", "4.0"]) == 0.0
    assert score(["a"], ["a"], "exact_match") == 100.0


def test_mergeable_is_every_float_parameter_ties_counted_once(t5):
    names = t5.mergeable_names()
    assert set(names) == {n for n, p in t5.module.named_parameters()}
    assert "shared.weight" in names and "lm_head.weight" in names  # flan-t5: untied LM head
    assert "encoder.embed_tokens.weight" not in names  # tied to shared.weight


def test_glue_task_data_batches(t5, cola, hub_root):
    assert cola.metric == "exact_match" and cola.classnames is None
    assert cola.size("test") == 10 and cola.size("train") == 18 and cola.size("validation") == 2
    batch = next(iter(cola.loader("test", 4)))
    ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 4 and ids.dtype == torch.long
    assert ((ids == t5.tokenizer.pad_token_id) | (mask == 1)).all()
    assert set(batch["targets"]) <= {"acceptable", "unacceptable"} and batch["labels"].dtype == torch.long
    stsb = build_task_data("stsb", seq_cfg("glue8", "glue", hub_root), t5)
    b = next(iter(stsb.loader("test", 10)))
    assert stsb.metric == "spearman" and all(t == f"{float(t):.1f}" for t in b["targets"])
    mnli = build_task_data("mnli", seq_cfg("glue8", "glue", hub_root), t5)
    assert mnli.size("test") == 10  # read from validation_matched


def test_generate_with_swapped_params_equals_a_loaded_finetuned_model(t5, hub_root):
    from transformers import AutoModelForSeq2SeqLM

    ft = t5.load_finetuned("cola")
    ref = AutoModelForSeq2SeqLM.from_pretrained(hub_root / tiny_hub.T5_FT.format(task="cola")).eval()
    inp = _inputs(t5, ["is it a good movie ?", "the cat runs fast and the dog is slow"])
    expected = ref.generate(**inp, max_new_tokens=t5.max_new_tokens, do_sample=False, num_beams=1)
    assert t5.generate_text(ft, inp) == t5.tokenizer.batch_decode(expected, skip_special_tokens=True)
    # originals restored afterwards: the module still computes with θ0
    for n, p in t5.module.named_parameters():
        assert p is dict(t5.module.named_parameters())[n] and isinstance(p, torch.nn.Parameter)
    pre = t5.pretrained_state()
    assert all(torch.equal(pre[n], p) for n, p in t5.module.named_parameters())


def test_swap_restores_on_error_and_follows_ties(t5):
    before = {n: p for n, p in t5.module.named_parameters()}
    new = torch.zeros_like(before["shared.weight"])
    with pytest.raises(RuntimeError, match="boom"), swapped_parameters(t5.module, {"shared.weight": new}):
        assert t5.module.encoder.embed_tokens.weight is new  # tied location swapped too
        raise RuntimeError("boom")
    assert all(p is before[n] for n, p in t5.module.named_parameters())
    assert t5.module.encoder.embed_tokens.weight is before["shared.weight"]


def test_logits_are_the_first_decoder_step(t5, hub_root):
    from transformers import AutoModelForSeq2SeqLM

    ft = t5.load_finetuned("stsb")
    ref = AutoModelForSeq2SeqLM.from_pretrained(hub_root / tiny_hub.T5_FT.format(task="stsb")).eval()
    inp = _inputs(t5, ["a good film", "the plot was not very good at all"])
    with torch.no_grad():
        dec = torch.full((2, 1), ref.config.decoder_start_token_id)
        expected = ref(**inp, decoder_input_ids=dec).logits[:, 0]
        got = t5.logits(ft, None, inp)
    assert got.shape == (2, t5.module.config.vocab_size) and torch.allclose(got, expected, atol=1e-5)


def test_mean_pool_features_ignore_padding(t5, hub_root):
    params = t5.pretrained_state()
    short = _inputs(t5, ["a good film"])
    both = _inputs(t5, ["a good film", "the plot was not very good at all and it is slow"])
    with torch.no_grad():
        f1, f2 = t5.features(params, short), t5.features(params, both)
    assert f2.shape == (2, t5.module.config.d_model) and torch.allclose(f1[0], f2[0], atol=1e-5)
    first = build_backbone(t5_cfg(hub_root, features="first_token"), torch.device("cpu"), False)
    with torch.no_grad():
        h = t5.module.encoder(**both).last_hidden_state
        assert torch.allclose(first.features(params, both), h[:, 0], atol=1e-5)


def test_lora_variant_merges_the_adapter(hub_root, t5):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    lora = build_backbone(t5_cfg(hub_root, variant="lora"), torch.device("cpu"), False)
    got = lora.load_finetuned("cola")
    base = AutoModelForSeq2SeqLM.from_pretrained(hub_root / tiny_hub.T5_ID)
    ref = PeftModel.from_pretrained(
        base, str(hub_root / tiny_hub.T5_LORA.format(task="cola"))
    ).merge_and_unload()
    ref_sd = ref.state_dict()
    pre = t5.pretrained_state()
    changed = {k for k in got if not torch.equal(got[k], pre[k])}
    assert changed and all(
        k.endswith(
            (
                "SelfAttention.q.weight",
                "SelfAttention.v.weight",
                "EncDecAttention.q.weight",
                "EncDecAttention.v.weight",
            )
        )
        for k in changed
    )
    assert all(torch.allclose(got[k], ref_sd[k]) for k in got)


def test_bad_options_are_user_errors(hub_root):
    with pytest.raises(UserError, match="variant"):
        build_backbone(t5_cfg(hub_root, variant="qlora"), torch.device("cpu"), False)
    with pytest.raises(UserError, match="features"):
        build_backbone(t5_cfg(hub_root, features="cls"), torch.device("cpu"), False)


def test_end_to_end_cli_full(hub_root, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "task_seq=glue8",
        f"backbone.local_dir={hub_root}",
        f"task_seq.local_dir={hub_root}",
        "task_order=[cola,stsb]",
        "method=task_arithmetic",
        f"out_dir={out}",
        "backbone.num_workers=0",
        env={"OTMF_EXP_CACHE": str(tmp_path / "c")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone"] == "flan_t5_base" and len(m["acc_matrix"]) == 2
    assert all(-100.0 <= a <= 100.0 for a in m["acc_matrix"][1])


@pytest.mark.parametrize(
    "method,variant", [("task_arithmetic", "lora")] + [(m, "full") for m in sorted(METHODS)]
)
def test_end_to_end_methods_in_process(hub_root, tmp_path, make_cfg, method, variant):
    """Every registered method (from the registry) on the tiny Flan-T5 fixture, + LoRA task vectors."""
    from otmf_exp.runner import run_experiment

    base = [
        "task_seq=glue8",
        f"backbone.local_dir={hub_root}",
        f"task_seq.local_dir={hub_root}",
        "task_order=[cola,stsb]",
        f"backbone.variant={variant}",
        "backbone.batch_size=8",
        "backbone.num_workers=0",
    ]
    base.append(f"protocol={METHODS[method].protocols[0]}")  # continual, or joint for joint-only methods
    cfg = make_cfg(*base, f"method={method}", *fast_method_overrides(make_cfg, method, *base))
    if "text" not in METHODS[method].modalities:  # vision-only (Fisher, RegMean): one line, before any merge
        with pytest.raises(UserError, match="vision backbones, not 'flan_t5_base'"):
            run_experiment(cfg, tmp_path / "run")
        return
    m = run_experiment(cfg, tmp_path / "run")
    rows = 2 if supported_protocol(method) == "continual" else 1  # joint: one evaluation
    assert len(m["acc_matrix"]) == rows and (tmp_path / "run" / "metrics.json").exists()

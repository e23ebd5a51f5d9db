"""Tiny random stand-ins for the real hub models and datasets, in the very same formats.

Used by the offline tests and ``scripts/eval_throughput.py``: everything is written under one
root in the ``<local_dir>/<hub id>`` layout that ``backbone.local_dir`` / ``task_seq.local_dir``
read, with ``save_pretrained`` (models, tokenizers, processors, peft adapters),
``DatasetDict.save_to_disk`` or parquet (datasets, real column names), and
``open_clip.add_model_config`` (a tiny open_clip architecture). Fine-tuned models are perturbed
copies of the pre-trained one (deterministic, seeded). Nothing here is used by real runs.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from otmf_exp.data import glue, vision_tasks

CLIP_ID = "openai/clip-vit-base-patch32"
CLIP_FT = "tanganke/clip-vit-base-patch32_{task}"
T5_ID = "google/flan-t5-base"
T5_FT = "tanganke/flan-t5-base_glue-{task}"
T5_LORA = "tanganke/flan-t5-base_glue-{task}_lora-16"
OPENCLIP_ARCH = "otmf-tiny-ViT"
OPENCLIP_ID = "test-org/otmf-tiny-openclip"
IMAGE_SIZE = 32
FILLER = "good bad movie film plot story cat dog runs fast slow is was not very the a it".split()


# ---- tokenizers ------------------------------------------------------------------------------------
def _words(texts: list[str]) -> list[str]:
    out: dict[str, None] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", t.lower()):
            out[w] = None
    return list(out)


def word_tokenizer(texts: list[str], special: list[str], template: str, **names: str) -> Any:
    """A WordLevel ``PreTrainedTokenizerFast`` over the words of ``texts`` (loads via ``AutoTokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(special + [w for w in _words(texts) if w not in special])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=names["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in special if s in template]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **names)


def _perturb_(module: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(
                    scale
                    * (p.detach().float().pow(2).mean().sqrt() + 1e-3)
                    * torch.randn(p.shape, generator=g)
                )


# ---- CLIP (transformers) -------------------------------------------------------------------------
def build_hf_clip(
    root: Path,
    tasks: list[str],
    *,
    model_id: str = CLIP_ID,
    finetuned: str = CLIP_FT,
    seed: int = 0,
    scale: float = 0.05,
) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    texts = [
        t.format(c=c)
        for task in vision_tasks.TASKS20
        for c in vision_tasks.classnames(task)
        for t in vision_tasks.VISION_TASKS[task].templates
    ]
    # eos id != 2: HF CLIP pools at the first eos token (id 2 selects its legacy argmax pooling)
    special = ["<|unk|>", "<|pad|>", "<|startoftext|>", "<|endoftext|>"]
    tok = word_tokenizer(
        texts,
        special,
        "<|startoftext|> $A <|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
    )
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=3,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    clip = CLIPModel(cfg).eval()
    out = root / model_id
    clip.save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(out)
    for i, task in enumerate(tasks):
        ft = CLIPVisionModel(cfg.vision_config)
        getattr(ft, "vision_model", ft).load_state_dict(clip.vision_model.state_dict())
        _perturb_(ft, scale, seed + 1 + i)
        ft.save_pretrained(root / finetuned.format(task=task))


# ---- open_clip -----------------------------------------------------------------------------------------
def openclip_config(root: Path, arch: str = OPENCLIP_ARCH) -> Path:
    """Write (and register) a tiny open_clip model config; returns its path (stem = arch name)."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = root / f"{arch}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return path


def build_open_clip(
    root: Path,
    tasks: list[str],
    *,
    model_id: str = OPENCLIP_ID,
    seed: int = 0,
    scale: float = 0.05,
    layouts: dict[str, str] | None = None,
) -> Path:
    """Tiny open_clip weights at ``root/model_id`` and fine-tuned state dicts under ``root/checkpoints``.

    ``layouts[task]``: ``pt`` (``<task>.pt``, task_vectors ``model.visual.*`` keys, default),
    ``safetensors`` (``<task>.safetensors``, ``visual.*`` keys), ``tv`` (``<Name>/finetuned.pt``) or
    ``pickled`` (a whole pickled module, as the original task_vectors code saved them).
    Returns the config JSON path (pass it as ``backbone.arch``).
    """
    import open_clip
    from safetensors.torch import save_file

    cfg_path = openclip_config(root)
    torch.manual_seed(seed)
    model = open_clip.create_model(cfg_path.stem)
    (root / model_id).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), root / model_id / "open_clip_pytorch_model.bin")
    ck = root / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    for i, task in enumerate(tasks):
        ft = open_clip.create_model(cfg_path.stem)
        ft.load_state_dict(model.state_dict())
        _perturb_(ft.visual, scale, seed + 1 + i)
        kind = (layouts or {}).get(task, "pt")
        if kind == "pickled":  # keys model.visual.* like task_vectors' ImageEncoder
            torch.save(torch.nn.ModuleDict({"model": ft}), ck / f"{task}.pt")
        elif kind == "safetensors":
            save_file(
                {f"visual.{k}": v.contiguous() for k, v in ft.visual.state_dict().items()},
                str(ck / f"{task}.safetensors"),
            )
        elif kind == "tv":
            d = ck / vision_tasks.TASK_VECTORS_NAMES[task]
            d.mkdir(exist_ok=True)
            torch.save({f"model.{k}": v for k, v in ft.state_dict().items()}, d / "finetuned.pt")
        else:
            torch.save({f"model.{k}": v for k, v in ft.state_dict().items()}, ck / f"{task}.pt")
    return cfg_path


# ---- Flan-T5 ---------------------------------------------------------------------------------------------
def build_t5(
    root: Path,
    tasks: list[str],
    *,
    model_id: str = T5_ID,
    finetuned: str = T5_FT,
    lora: str | None = T5_LORA,
    seed: int = 0,
    scale: float = 0.05,
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    texts = [p.template for p in glue.PROMPTS.values()] + [
        a for p in glue.PROMPTS.values() for a in p.answers or ()
    ]
    texts += FILLER + [f"{x / 10:.1f}" for x in range(51)]
    tok = word_tokenizer(
        texts, ["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    base = T5ForConditionalGeneration(cfg).eval()
    # as flan-t5: encoder/decoder embeddings tied to ``shared``, a separate LM head
    if base.lm_head.weight is base.shared.weight:
        base.lm_head.weight = torch.nn.Parameter(
            base.shared.weight.detach() + 0.02 * torch.randn(base.shared.weight.shape)
        )
    base.save_pretrained(root / model_id)
    tok.save_pretrained(root / model_id)
    for i, task in enumerate(tasks):
        ft = copy.deepcopy(base)
        _perturb_(ft, scale, seed + 1 + i)
        ft.save_pretrained(root / finetuned.format(task=task))
        if lora:
            pm = get_peft_model(
                copy.deepcopy(base),
                LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"),
            )
            g = torch.Generator().manual_seed(seed + 100 + i)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n:  # peft initialises B = 0 (a no-op adapter); make it a real update
                        p.copy_(0.1 * torch.randn(p.shape, generator=g))
            pm.save_pretrained(root / lora.format(task=task))


# ---- datasets ------------------------------------------------------------------------------------------
@contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _images(n: int, rng: random.Random, mode: str = "RGB") -> list[Any]:
    from PIL import Image

    out = []
    for _ in range(n):
        w, h = rng.randint(34, 48), rng.randint(34, 48)
        data = bytes(rng.randrange(256) for _ in range(w * h * (3 if mode == "RGB" else 1)))
        out.append(Image.frombytes(mode, (w, h), data))
    return out


def build_vision_datasets(
    root: Path, tasks: list[str], n_train: int = 20, n_test: int = 12, seed: int = 0
) -> None:
    """Datasets with each task's real id, columns and splits (svhn: ``<id>/cropped_digits``; fer2013: parquet)."""
    with _quiet_datasets():
        for ti, task in enumerate(tasks):
            _vision_dataset(root, task, n_train, n_test, random.Random(seed * 1000 + ti))


def _vision_dataset(root: Path, task: str, n_train: int, n_test: int, rng: random.Random) -> None:
    import datasets

    spec = vision_tasks.VISION_TASKS[task]
    n_cls = len(vision_tasks.classnames(task))
    inv = {b: a for a, b in spec.rename.items()}  # fer2013: stored as jpg / cls, renamed on load
    image_col, label_col = inv.get("image", spec.image), inv.get("label", spec.label[0])
    splits = {}
    for split, n in ((spec.train_split, n_train), (spec.test_split, n_test)):
        labels = [rng.randrange(n_cls) for _ in range(n)]
        cols: dict[str, Any] = {image_col: _images(n, rng, "L" if "mnist" in task else "RGB")}
        cols[label_col] = [bool(x) for x in labels] if task == "pcam" else labels
        feats = {
            image_col: datasets.Image(),
            label_col: datasets.Value("bool" if task == "pcam" else "int64"),
        }
        if task == "cifar100":
            cols["coarse_label"] = [x // 5 for x in labels]
            feats["coarse_label"] = datasets.Value("int64")
        if task == "fer2013":
            cols["__key__"] = [f"{split}_{i:05d}" for i in range(n)]
            cols["__url__"] = ["local.tar"] * n
            feats.update({"__key__": datasets.Value("string"), "__url__": datasets.Value("string")})
        splits[split] = datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
    target = root / spec.dataset
    if task == "fer2013":  # a hub-like snapshot of parquet files, read with load_dataset
        (target / "data").mkdir(parents=True, exist_ok=True)
        for split, ds in splits.items():
            ds.to_parquet(str(target / "data" / f"{split}-00000-of-00001.parquet"))
    else:
        datasets.DatasetDict(splits).save_to_disk(str(target / spec.config if spec.config else target))


def build_glue_datasets(
    root: Path, tasks: list[str], n_train: int = 20, n_val: int = 10, seed: int = 0
) -> None:
    """GLUE-like ``DatasetDict``s at ``root/nyu-mll/glue/<task>`` with the real columns and split names."""
    import datasets

    with _quiet_datasets():
        for ti, task in enumerate(tasks):
            _glue_dataset(root, task, n_train, n_val, random.Random(seed * 1000 + ti), datasets)


def _glue_dataset(root: Path, task: str, n_train: int, n_val: int, rng: random.Random, datasets: Any) -> None:
    p = glue.PROMPTS[task]
    splits = {}
    for split, n in (("train", n_train), (p.test_split, n_val)):
        cols: dict[str, list] = {
            f: [" ".join(rng.choices(FILLER, k=rng.randint(3, 8))) for _ in range(n)] for f in p.fields
        }
        if p.answers is None:
            cols["label"] = [round(rng.uniform(0, 5), 2) for _ in range(n)]
        else:
            cols["label"] = [rng.randrange(len(p.answers)) for _ in range(n)]
        cols["idx"] = list(range(n))
        splits[split] = datasets.Dataset.from_dict(cols)
    datasets.DatasetDict(splits).save_to_disk(str(root / glue.GLUE_DATASET / task))

"""scripts/convert_task_vectors_checkpoint.py: says it unpickles, refuses bad input/output and wrong
shapes in one line (exit code 2) before writing anything."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_task_vectors_checkpoint.py"


def _convert(*args: str) -> subprocess.CompletedProcess:
    """The script in a fresh process (what a user runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=240, env=env
    )


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("convert_task_vectors_checkpoint", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def convert(script, capsys):
    """The script's ``main`` in-process: returns (exit code, stdout, stderr)."""

    def _run(*args):
        code = script.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return _run


def _errors(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def arch(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny open_clip architecture (model-config JSON) and its image tower's state dict."""
    import open_clip

    from otmf_exp.offline import tiny_hub

    root = tmp_path_factory.mktemp("arch")
    path = tiny_hub.openclip_config(root)
    model = open_clip.create_model(path.stem, pretrained=None)
    return path, {f"visual.{k}": v.clone() for k, v in model.visual.state_dict().items()}


def test_warns_that_it_unpickles_and_checks_shapes(arch, tmp_path):
    path, sd = arch
    src, out = tmp_path / "ok.pt", tmp_path / "out" / "task.safetensors"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, src)
    p = _convert(src, "--out", out, "--arch", path)
    assert p.returncode == 0, p.stderr
    assert "unpickles" in p.stderr and "only run it on checkpoints you trust" in p.stderr
    assert "UNPICKLES" in _convert("--help").stdout
    from safetensors.torch import load_file

    got = load_file(str(out))
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_wrong_shape_is_named(convert, arch, tmp_path):
    path, sd = arch
    bad = dict(sd)
    key = sorted(k for k in sd if sd[k].dim() == 2)[0]
    bad[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    src, out = tmp_path / "bad.pt", tmp_path / "out.safetensors"
    torch.save(bad, src)
    p = convert(src, "--out", out, "--arch", path)
    (err,) = _errors(p)
    assert p.returncode == 2 and key in err and "expects" in err and "--arch" in err
    assert not out.exists()


def test_missing_key_is_named(convert, arch, tmp_path):
    path, sd = arch
    key = sorted(sd)[0]
    src = tmp_path / "short.pt"
    torch.save({k: v for k, v in sd.items() if k != key}, src)
    p = convert(src, "--out", tmp_path / "o.safetensors", "--arch", path)
    (err,) = _errors(p)
    assert p.returncode == 2 and f"lacks parameter {key!r}" in err


def test_without_an_architecture_it_says_shapes_are_unchecked(convert, arch, tmp_path):
    _, sd = arch
    src = tmp_path / "x.pt"
    torch.save(sd, src)
    p = convert(src, "--out", tmp_path / "x.safetensors")
    assert p.returncode == 0 and "shapes of" in p.stdout and "not checked" in p.stdout


@pytest.mark.parametrize("content", [None, b"", b"\x00garbage not a pickle"])
def test_unreadable_input(convert, tmp_path, content):
    src = tmp_path / "in.pt"
    if content is not None:
        src.write_bytes(content)
    p = convert(src, "--out", tmp_path / "o.safetensors")
    (err,) = _errors(p)
    assert p.returncode == 2 and f"cannot read {src}" in err and "Traceback" not in p.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_unimportable_pickle_points_to_code(tmp_path):
    pkg = tmp_path / "code"
    pkg.mkdir()
    (pkg / "tvmodels.py").write_text(
        "import torch\nclass Enc(torch.nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.proj = torch.nn.Linear(2, 2)\n"
    )
    src = tmp_path / "enc.pt"
    code = f"import sys, torch; sys.path.insert(0, {str(pkg)!r}); import tvmodels; torch.save(tvmodels.Enc(), {str(src)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    p = _convert(src, "--out", tmp_path / "o.safetensors")
    (err,) = _errors(p)
    assert p.returncode == 2 and "cannot unpickle" in err and "tvmodels" in err and "--code" in err
    ok = _convert(src, "--out", tmp_path / "o.safetensors", "--code", pkg)
    assert ok.returncode == 0, ok.stderr


def test_unwritable_output_is_refused_before_unpickling(convert, arch, tmp_path):
    _, sd = arch
    src = tmp_path / "x.pt"
    torch.save(sd, src)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    p = convert(src, "--out", blocker / "sub" / "o.safetensors")
    (err,) = _errors(p)
    assert p.returncode == 2 and f"cannot write {blocker / 'sub' / 'o.safetensors'}" in err
    assert "--out" in err

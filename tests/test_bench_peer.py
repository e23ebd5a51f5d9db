"""bench-peer's logic: interleaving, min of N, ratios, equal-results check, table, the missing-venv line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from otmf_exp.benchmark import peer, peer_cli
from otmf_exp.benchmark.markdown import render, scrub
from otmf_exp.benchmark.peer_methods import PEER

ROOT = Path(__file__).resolve().parents[1]


def test_schedule_interleaves_sides_and_alternates_who_goes_first():
    s = peer.schedule(["ties", "opcm"], [1, "auto"], 3)
    assert len(s) == 2 * 3 * 2 * 2
    r0 = [x for x in s if x[0] == 1 and x[1] == 0]
    assert [(row, side) for _, _, row, side in r0] == [
        ("ties", "ours"),
        ("ties", "fusionbench"),
        ("opcm", "ours"),
        ("opcm", "fusionbench"),
    ]
    r1 = [x for x in s if x[0] == 1 and x[1] == 1]
    assert [side for *_, side in r1][:2] == ["fusionbench", "ours"]
    assert [x[0] for x in s[: len(s) // 2]] == [1] * (len(s) // 2)  # one thread setting at a time


def test_best_is_min_of_each_measure_and_ratios_use_it():
    raw = {
        "1": {
            "ties": {
                "ours": [{"merge_s": 3.0, "peak_mb": 90.0}, {"merge_s": 2.0, "peak_mb": 100.0}],
                "fusionbench": [{"merge_s": 4.0, "peak_mb": 200.0}, {"merge_s": 5.0, "peak_mb": 150.0}],
            },
            "opcm": {"ours": [{"merge_s": 1.0, "peak_mb": 1.0}], "fusionbench": []},
        }
    }
    t = peer.tabulate(raw)
    assert t["1"]["ties"]["ours"] == {"merge_s": 2.0, "peak_mb": 90.0, "n": 2, "threads": None}
    assert t["1"]["ties"]["time_ratio"] == pytest.approx(0.5)
    assert t["1"]["ties"]["peak_ratio"] == pytest.approx(0.6)
    assert "opcm" not in t["1"]  # one side missing: no ratio claimed


def test_max_abs_diff_matches_keys_without_the_vision_model_prefix():
    a = {"vision_model.w": torch.zeros(2, 2), "vision_model.b": torch.ones(3)}
    b = {"w": torch.full((2, 2), 0.25), "b": torch.ones(3), "other": torch.ones(1)}
    assert peer.max_abs_diff(a, b) == pytest.approx(0.25)
    assert peer.max_abs_diff(a, {"x": torch.ones(1)}) is None  # nothing shared: no claim


def test_measure_peer_runs_the_schedule_and_compares_round_zero_models(tmp_path):
    from safetensors.torch import save_file

    calls = []

    def fake(side, row, threads, rnd, merged_to):
        calls.append((side, threads, rnd, merged_to is not None))
        if merged_to:
            save_file({"w": torch.full((2,), 1.0 if side == "ours" else 1.5)}, merged_to)
        return {"merge_s": 1.0 + rnd + (side == "ours"), "peak_mb": 10.0 * (1 + (side == "ours"))}

    got = peer.measure_peer(["ties"], [1, "auto"], 3, fake)
    assert len(calls) == 12
    assert [c for c in calls if c[3]] == [("ours", 1, 0, True), ("fusionbench", 1, 0, True)]
    assert got["max_abs_diff"] == {"ties": pytest.approx(0.5)}
    row = got["table"]["1"]["ties"]
    assert row["ours"]["merge_s"] == 2.0 and row["fusionbench"]["merge_s"] == 1.0
    assert row["time_ratio"] == pytest.approx(2.0) and row["peak_ratio"] == pytest.approx(2.0)


def test_missing_fusionbench_python_is_one_line_and_exit_2(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_cli", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--peer", "--fusionbench-python", str(tmp_path / "nope"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "run make parity-venv first" in err[0]
    assert peer_cli.check_python(None).endswith("run make parity-venv first")


def test_rows_and_threads_reject_bad_input():
    assert peer_cli.rows_and_threads(None, "1,auto") == (list(PEER), [1, "auto"])
    with pytest.raises(ValueError, match="unknown peer method"):
        peer_cli.rows_and_threads("ties,nope", "1")
    with pytest.raises(ValueError, match="positive integers or auto"):
        peer_cli.rows_and_threads("ties", "0")


def test_peer_table_renders_one_row_per_method_and_thread_with_no_machine_path():
    table = peer.tabulate(
        {
            "1": {
                "ties": {
                    "ours": [{"merge_s": 1.0, "peak_mb": 70.0}],
                    "fusionbench": [{"merge_s": 2.0, "peak_mb": 100.0}],
                }
            }
        }
    )
    res = {
        "peer": {
            "table": table,
            "max_abs_diff": {"ties": 1e-7},
            "command": scrub(
                "python scripts/bench.py --peer --fusionbench-python /home/u/.venv-parity/bin/python"
            ),
            "date": "2026-01-01 00:00 UTC",
            "quick": True,
            "repeats": 3,
            "tasks": 8,
            "machine": {"cpu": "x86_64", "cpu_cores": 2, "ram_gb": 23.0, "torch": "2.x"},
        }
    }
    text = render(res, peer_only=True)
    line = next(ln for ln in text.splitlines() if ln.startswith("| ties"))
    assert "0.500" in line and "0.700" in line and "yes" in line
    assert "/home/" not in text and "--fusionbench-python PATH" in text
    assert "TiesMergingAlgorithm" in text


def test_scrub_replaces_absolute_paths_only():
    assert scrub("bench.py --out /x/y --only a,b; then c /z") == "bench.py --out PATH --only a,b; then c PATH"
    assert (
        scrub("--fusionbench-python .venv-parity/bin/python")
        == "--fusionbench-python .venv-parity/bin/python"
    )


@pytest.mark.parametrize("name", ["task_arithmetic", "averaging"])
def test_in_place_step_on_owned_inputs_is_bit_identical(name):
    """The peer table's speed change: an owned τ_t becomes the new τᵐ in place, same bits as before."""
    from types import SimpleNamespace

    from otmf_exp.merging import METHODS
    from otmf_exp.merging.base import TaskInput

    g = torch.Generator().manual_seed(0)
    theta0 = {"a": torch.randn(5, 4, generator=g), "b": torch.randn(7, generator=g)}
    thetas = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in theta0.items()} for _ in range(4)]
    cls = METHODS[name]
    cfg = cls.Config(scaling=0.3) if name == "task_arithmetic" else cls.Config()
    out = {}
    for owned in (False, True):
        m = cls(cfg, SimpleNamespace(record=lambda *a, **k: None))
        s = m.init(theta0)
        for i, th in enumerate(thetas):
            s = m.step(
                s,
                TaskInput(f"t{i}", i, {k: v.clone() for k, v in th.items()}, None, None, owned=owned),
                theta0,
            )
        out[owned] = s.merged
    for k in theta0:
        assert torch.equal(out[True][k], out[False][k])


def test_a_second_thread_setting_joins_the_earlier_table():
    m = {"cpu_cores": 2}
    old = {
        "quick": True,
        "arch": "a",
        "machine": m,
        "table": {"1": {"x": 1}},
        "raw": {"1": {}},
        "threads": ["1"],
        "command": "c1",
        "max_abs_diff": {"x": 0.0},
    }
    new = {
        "quick": True,
        "arch": "a",
        "machine": m,
        "table": {"auto": {"x": 2}},
        "raw": {"auto": {}},
        "threads": ["auto"],
        "command": "c2",
        "max_abs_diff": {},
    }
    got = peer_cli.keep_other_threads(old, new)
    assert got["table"] == {"1": {"x": 1}, "auto": {"x": 2}} and got["command"] == "c1; then c2"
    assert peer_cli.keep_other_threads(old | {"quick": False}, new) is new  # other size: replaced


def test_peer_rows_name_our_method_and_a_fusionbench_class_or_function():
    from otmf_exp.benchmark import peer_fb
    from otmf_exp.benchmark.peer_methods import NOT_YET
    from otmf_exp.merging import METHODS

    assert {"dop", "consensus"} <= set(PEER) and not set(PEER) & set(NOT_YET)
    for name, row in PEER.items():
        assert row.method in METHODS and row.protocol in ("joint", "continual"), name
        assert row.fb_class.startswith("fusion_bench.method."), name
    assert PEER["dop"].overrides["steps"] == PEER["dop"].fb_kwargs["num_steps"]  # equal work
    calls = [r.fb_call for r in PEER.values() if r.fb_call]
    assert len(calls) >= 3 and all(r.fb_call for r in PEER.values() if r.data)  # data rows: FB's loops
    for call in calls:
        module, fn = call.split(":")
        assert module == peer_fb.__name__ and callable(getattr(peer_fb, fn))


def test_parity_bounds_and_the_targets_cell(tmp_path):
    from otmf_exp.benchmark.peer_markdown import target

    (tmp_path / "parity.json").write_text(
        '{"rows": [{"name": "ties", "bound": 1e-6}, {"name": "ties_f64", "bound": 1e-12}]}'
    )
    assert peer_cli.parity_bounds(tmp_path / "parity.json") == {"ties": 1e-6}
    assert peer_cli.parity_bounds(tmp_path / "none.json") == {}
    r = {"time_ratio": 0.5, "peak_ratio": 0.9}
    assert target(r, 1e-7, 1e-6, "1") == "time yes, peak no, Δw ok"
    assert target(r, 1e-5, 1e-6, "1").endswith("Δw > 1e-06")
    assert target(r, None, 1e-6, "1").endswith("Δw not compared")
    assert target(r, 1e-7, 1e-6, "auto") == "— (judged at 1 thread)"


def test_auto_threads_is_the_fresh_default_not_this_process_setting(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho ${OMP_NUM_THREADS:-7}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert peer.auto_threads(str(fake)) == 7


def test_batches_file_round_trip_is_the_stream_the_method_draws(tmp_path):
    """The file FusionBench's side reads holds exactly the examples our Fisher draws, in its order."""
    from otmf_exp.benchmark.peer_data import read_batches, write_batches
    from otmf_exp.data.base import example_batches
    from otmf_exp.merging.base import MethodContext
    from otmf_exp.offline.synthetic import SyntheticTaskData

    sizes = {"train": 12, "validation": 2, "test": 2}
    opts = {"num_examples": 8, "batch_size": 3, "shuffle": True}
    path = tmp_path / "batches.safetensors"
    assert write_batches("vit_b32_l4", 2, "fisher", opts, path, sizes) == 2 * 3  # ceil(8/3) per task
    ctx = MethodContext(None, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False, seed=0)
    data = SyntheticTaskData("task01", 224, sizes=sizes)
    want = [
        (b["inputs"][j], int(b["labels"][j]))
        for b in example_batches(data, "train", 8, 3, shuffle=True, seed=ctx.seed_for("fisher", "task01"))
        for j in range(len(b["labels"]))
    ]
    got = read_batches(path, "task01")
    assert len(got) == len(want) == 9
    assert all(torch.equal(g[0], w[0]) and g[1] == w[1] for g, w in zip(got, want))
    with pytest.raises(ValueError, match="no batches of task 'task07'"):
        read_batches(path, "task07")


@pytest.mark.parametrize(
    "row, short",
    [
        ("adamerging_layer", {"steps": 5}),  # 5 × 16 > 64 test images: a reshuffled second pass
        ("concrete_ta", {"max_steps": 3}),
        ("concrete_adamerging", {"max_steps": 2, "max_adamerging_steps": 1}),
        ("continual_finetune", {"steps": 5}),  # 5 × 16 > 64 training images
    ],
)
def test_adaptation_batches_file_is_what_the_method_draws(tmp_path, row, short):
    """The file FusionBench's side reads holds exactly the batches our joint method draws (recorded
    from a real run on the tiny tower, fewer steps), in the bench run's split sizes; Concrete's spec
    holds our mask generator's seed."""
    import json

    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from otmf_exp.benchmark.peer_data import runner_sizes, write_batches
    from otmf_exp.merging import METHODS
    from otmf_exp.merging.base import MethodContext, TaskInput
    from otmf_exp.offline.synthetic import SyntheticBackbone
    from otmf_exp.parity.adamerging import Recorder

    assert runner_sizes()["test"] == 64 and runner_sizes()["validation"] == 2
    method, opts = PEER[row].method, PEER[row].overrides | short
    path = tmp_path / f"{row}.batches.safetensors"
    n = write_batches("tiny", 2, method, opts, path)
    bb = SyntheticBackbone("tiny", "cpu")
    pre = bb.pretrained_state()
    datas = {t: Recorder(bb.task_data(t, runner_sizes())) for t in ("task00", "task01")}
    cls = METHODS[method]
    cfg = OmegaConf.merge(OmegaConf.structured(cls.Config), opts)
    ctx = MethodContext(bb, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False, seed=0)
    tasks = [
        TaskInput(t, i, bb.load_finetuned(t), bb.zero_shot_head(d.data), d)
        for i, (t, d) in enumerate(datas.items())
    ]
    m = cls(cfg, ctx, protocol=PEER[row].protocol)
    if PEER[row].protocol == "joint":
        m.joint(pre, tasks)
    else:
        state = m.init(pre)
        for task in tasks:
            state = m.step(state, task, pre)
    saved = load_file(str(path))
    assert n == sum(len(d.served) for d in datas.values()) and n > 0
    assert len(saved) == 2 * n  # x and y of every batch, nothing more
    for t, d in datas.items():
        for i, (x, y) in enumerate(d.served):
            assert torch.equal(saved[f"{t}/{i}/x"], x) and torch.equal(saved[f"{t}/{i}/y"], y)
    if method == "concrete":
        spec = json.loads((tmp_path / f"{row}.spec.json").read_text())
        assert spec == {"mask_seed": ctx.seed_for("concrete", "mask")}
    if method == "continual_finetune":
        spec = json.loads((tmp_path / f"{row}.spec.json").read_text())
        assert spec == {"tasks": list(datas), "steps": 5, "batch_size": 16, "lr": cfg.lr, "lora": False}


def test_max_abs_diff_leaves_out_the_skipped_keys():
    a = {"vision_model.l.k_proj.bias": torch.zeros(2), "vision_model.l.k_proj.weight": torch.zeros(2)}
    b = {"l.k_proj.bias": torch.ones(2), "l.k_proj.weight": torch.full((2,), 0.5)}
    assert peer.max_abs_diff(a, b) == 1.0
    assert peer.max_abs_diff(a, b, PEER["continual_finetune"].skip) == 0.5
    assert peer.max_abs_diff(a, {"l.k_proj.bias": torch.ones(2)}, (".k_proj.bias",)) is None


PARITY_PY = ROOT / ".venv-parity" / "bin" / "python"


@pytest.mark.parity
@pytest.mark.parametrize("row", ["adamerging_task", "concrete_ta", "continual_finetune"])
def test_data_peer_row_equal_results_check_runs_and_can_fail(tmp_path, row):
    """Tiny tower, 2 tasks, one round: FusionBench's class on our batches merges what ours does
    (max |Δw| within the parity bound); fed other batches (and Concrete another mask seed: another
    run seed's) it does not."""
    from otmf_exp.benchmark.peer_data import write_batches

    assert PARITY_PY.exists(), "no .venv-parity: run `make parity-venv` (the FusionBench venv)"
    bound = peer_cli.parity_bounds(ROOT / "parity.json")[row]
    models = tmp_path / "models"
    peer.export_models(str(PARITY_PY), "tiny", 2, models, lambda m: None, [row])
    base = {"arch": "tiny", "tasks": 2, "device": "cpu", "eval_batch_size": 16, "autocast": "float32"}
    run_side = peer.side_runner(str(PARITY_PY), models, base)
    got = peer.measure_peer([row], [1], 1, run_side)
    assert got["max_abs_diff"][row] <= bound
    r = PEER[row]
    write_batches("tiny", 2, r.method, r.overrides, models / f"{row}.batches.safetensors", seed=1)
    bad = peer.measure_peer([row], [1], 1, run_side)
    assert bad["max_abs_diff"][row] > bound, bad["max_abs_diff"]


def test_peer_table_renders_the_data_driven_rows_and_what_is_not_timed():
    from otmf_exp.benchmark.peer_methods import NOT_YET

    runs = {"ours": [{"merge_s": 1.0, "peak_mb": 70.0}], "fusionbench": [{"merge_s": 2.0, "peak_mb": 100.0}]}
    rows = ["adamerging_task", "adamerging_plus", "concrete_adamerging", "continual_finetune"]
    res = {
        "peer": {
            "table": peer.tabulate({"1": {r: runs for r in rows}}),
            "max_abs_diff": {"adamerging_task": 1e-7, "adamerging_plus": 1e-3},
            "parity_bound": {"adamerging_task": 1e-5, "adamerging_plus": 1e-5},
            "command": "python scripts/bench.py --peer --quick",
            "date": "2026-01-01 00:00 UTC",
            "quick": True,
            "repeats": 1,
            "tasks": 8,
            "machine": {"cpu": "x86_64", "cpu_cores": 2, "ram_gb": 23.0, "torch": "2.x"},
        }
    }
    text = render(res, peer_only=True)
    line = {r: next(ln for ln in text.splitlines() if ln.startswith(f"| {r} ")) for r in rows}
    assert "time yes, peak yes, Δw ok" in line["adamerging_task"]
    assert "Δw > 1e-05" in line["adamerging_plus"]  # the check can fail in the table too
    assert "Δw not compared" in line["continual_finetune"]
    assert "CLIPTaskWiseAdaMergingAlgorithm" in text and "ConcreteTaskWiseAdaMergingForCLIP" in text
    not_timed = next(ln for ln in text.splitlines() if ln.startswith("Not timed side by side yet"))
    assert all(n in not_timed for n in NOT_YET) and "adamerging" not in not_timed
    assert not set(rows) & set(NOT_YET)
    # the rows bench-peer has that this measurement lacks are named, not left out silently
    missing = next(ln for ln in text.splitlines() if ln.startswith("Rows of `bench-peer` not in this"))
    assert "fisher" in missing and "dop" in missing and "adamerging_task" not in missing

"""scripts/finetune.py end to end on a tiny budget: overfitting in bf16 with fp32 master weights, and an
exact resume (N steps straight == N/2 steps, stop, resume, N/2 steps: same weights, same data order).

All runs share one configuration, so the step compiles once for the module.
"""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax import cli
from model1_jax.text import tokenizers
from model1_jax.train import data as mdata

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("finetune_script", ROOT / "scripts" / "finetune.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

STEPS = 80
TEXT = "MODEL1 fine-tunes on this short text until it knows every byte of it by heart. " * 2
# Two layers that still hold every module kind (CSA + hash routing, HCA + biased routing, the MTP block's
# sliding attention): Config.tiny() minus its first and last layer, to keep the compilation short.
CONFIG = m1.Config.tiny().replace(num_hidden_layers=2, layer_types=(m1.CSA, m1.HCA),
                                  mlp_layer_types=(m1.HASH_MOE, m1.MOE))


class OrderRecorder:
    """Records the data rows of every batch each run takes (`Batches.batch` patched once per test)."""

    def __init__(self, monkeypatch):
        self.runs: list[list] = []
        original = mdata.Batches.batch

        def recording(batches, i):
            self.runs[-1].append((i, batches.rows(i).tolist()))
            return original(batches, i)

        monkeypatch.setattr(mdata.Batches, "batch", recording)

    def new_run(self) -> list:
        self.runs.append([])
        return self.runs[-1]


def run(tmp_path, ckpt: str, *extra: str):
    """One in-process script run on the short text, through the default (sparse) attention.

    lr 5e-3: at 1e-2 this bf16 run is chaotic on either attention path (a loss spike near step 60), so the
    thresholds below would test one trajectory's luck; at 5e-3 the loss falls steadily (3.2 at step 10, 0.05 at 40,
    0.003 at 80 when measured)."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG.to_hf()))
    args = script.parse_args([
        "--config", str(config), "--data", str(data), "--seq-len", "32", "--batch-size", "2", "--eval-fraction", "0.2",
        "--steps", str(STEPS), "--lr", "5e-3", "--warmup-steps", "5", "--min-lr-ratio", "0.5",
        "--weight-decay", "0", "--dtype", "bfloat16", "--log-every", "20", "--eval-every", "40",
        "--eval-batches", "1", "--checkpoint-every", "20", "--checkpoint-dir", str(tmp_path / ckpt),
        "--no-progress", *extra])
    return script.run(args)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    mp = pytest.MonkeyPatch()
    try:
        recorder = OrderRecorder(mp)
        order = recorder.new_run()
        trainer, history = run(tmp, "ckpt")
    finally:
        mp.undo()
    return tmp, trainer, history, order


def test_overfits_in_bf16_and_every_trainable_parameter_changes(straight):
    tmp, trainer, history, _ = straight
    assert [r["step"] for r in history] == [20, 40, 60, 80]
    assert history[0]["main_loss"] > 10 * history[-1]["main_loss"] and history[-1]["main_loss"] < 0.05, history
    assert "eval_loss" in history[-1] and np.isfinite(history[-1]["tokens_per_s"])
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(trainer.state.params))
    model = trainer.model()
    assert model.layers[0].self_attn.q_a_proj.kernel.dtype == np.float32       # storage as built
    assert model.layers[0].self_attn.q_a_proj.dtype == np.dtype("bfloat16")    # compute
    init = m1.Model1(CONFIG, rngs=nnx.Rngs(0))                               # the script's seed-0 init
    before = {tuple(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(init))}
    trained = {tuple(p) for p, _ in nnx.to_flat_state(trainer.state.params)}
    for path, value in nnx.to_flat_state(nnx.state(model)):
        path, changed = tuple(path), not np.array_equal(np.asarray(value), before[tuple(path)])
        frozen = "indexer" in path or path[-1] == "tid2eid"
        assert changed == (not frozen), ("/".join(map(str, path)), changed, path in trained)
    checkpoints = sorted(int(p.name) for p in (tmp / "ckpt" / "train").iterdir() if p.name.isdigit())
    assert checkpoints == [60, 80]


def test_final_model_loads_with_from_pretrained(straight):
    tmp, trainer, _, _ = straight
    loaded = m1.from_pretrained(tmp / "ckpt" / "model", dtype=np.float32)
    assert loaded.config == trainer.model().config
    want = {tuple(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(trainer.model()))}
    got = {tuple(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(loaded))}
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    tokenizer = tokenizers.HFTokenizer(tmp / "ckpt" / "model")  # what scripts/generate.py --model reads
    assert tokenizer.encode(TEXT[:20]) == list(TEXT[:20].encode())


def test_generate_script_loads_the_export_by_a_relative_path(straight, monkeypatch):
    tmp, trainer, _, _ = straight
    monkeypatch.chdir(tmp)
    loaded = cli.load_model(str(pathlib.Path("ckpt") / "model"), dtype=np.float32)
    assert loaded.config == trainer.model().config
    want = trainer.model().lm_head.kernel[...]
    np.testing.assert_array_equal(np.asarray(loaded.lm_head.kernel[...]), np.asarray(want))
    with pytest.raises(SystemExit, match="--model: 'no-such-model': no such directory"):
        cli.load_model("no-such-model", dtype=np.float32)


def test_stop_and_resume_reproduces_the_straight_run(straight, tmp_path, monkeypatch):
    _, trainer, _, order = straight
    recorder = OrderRecorder(monkeypatch)
    first = recorder.new_run()
    run(tmp_path, "ckpt", "--stop-after", str(STEPS // 2))
    second = recorder.new_run()
    resumed, _ = run(tmp_path, "ckpt", "--resume")
    assert [i for i, _ in first] == list(range(STEPS // 2))
    assert [i for i, _ in second] == list(range(STEPS // 2, STEPS))
    assert first + second == order  # the same batches, in the same order
    assert int(resumed.state.step) == STEPS
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(trainer.state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_resume_refuses_a_different_run(straight, tmp_path):
    run(tmp_path, "ckpt", "--stop-after", "20")
    with pytest.raises(ValueError, match="batch_size: checkpoint 2, now 4"):
        script.run(script.parse_args(["--config", str(tmp_path / "config.json"), "--data", str(tmp_path / "text.txt"),
                                      "--seq-len", "32", "--batch-size", "4",
                                      "--steps", str(STEPS), "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume",
                                      "--eval-fraction", "0.2", "--lr", "1e-2", "--warmup-steps", "5"]))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(tmp_path, "ckpt")


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "sgd"], "unknown optimizer 'sgd'"),
    (["--seq-len", "5000"], "exceeds the model's max_position_embeddings"),
    (["--lora-rank", "4", "--lora-targets", "no_such_projection"], "match no projection"),
    (["--resume"], "--resume: no checkpoint"),
])
def test_bad_arguments_fail_clearly(argv, message, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--data", str(data), "--checkpoint-dir", str(tmp_path / "c"), *argv])
    assert message in str(exit_info.value)


def test_empty_dataset_fails_clearly(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="dataset is empty"):
        script.main(["--data", str(empty), "--checkpoint-dir", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()  # nothing written


def test_a_non_finite_step_stops_the_run_before_it_is_saved(tmp_path):
    """`fit` checks every step it logs or checkpoints; a NaN loss raises instead of being saved."""
    from types import SimpleNamespace

    from model1_jax.train.loop import fit

    class Exploding:
        state = SimpleNamespace(step=np.int32(0))
        biased_paths = frozenset()

        def step(self, batch):
            return {"loss": np.float32("nan"), "main_loss": np.float32("nan"), "mtp_loss": np.float32(0),
                    "balance_loss": np.float32(0), "grad_norm": np.float32(1), "grads_finite": np.bool_(True),
                    "learning_rate": np.float32(1e-3), "loads": {}}

    packed = mdata.pack(np.arange(40, dtype=np.int32), np.ones(40, bool), seq_len=8)
    with pytest.raises(FloatingPointError, match="step 3: non-finite loss"):
        fit(Exploding(), mdata.Batches(packed, 1), 10, log_every=3, progress=False)


def test_a_multi_process_export_is_refused_before_any_work(tmp_path, monkeypatch):
    """m1.save writes from one process: under jax.distributed the script stops at once unless --no-export."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    monkeypatch.setattr(script.distributed, "initialize", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(SystemExit, match="this run has 2: pass --no-export"):
        script.main(["--data", str(data), "--checkpoint-dir", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()
    with pytest.raises(NotImplementedError, match="m1.save writes from a single process"):
        m1.save(m1.Model1(CONFIG, rngs=nnx.Rngs(0)), tmp_path / "model")
    assert not (tmp_path / "model").exists()

"""Checkpoint -> ONNX export: the file, its checks, fp16/int8 copies, inspect and bench.

Checkpoints here are random MobileNetV2 weights at 64 px (exports take
seconds, not minutes). Their batch-norm statistics are fitted on random crops
so different crops give clearly different probabilities; with torchvision's
fresh init every crop would get the same near-uniform output and a parity
test could not fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from export import ExportError  # noqa: E402
from export.bench import bench, format_table, with_siblings  # noqa: E402
from export.cli import main  # noqa: E402
from export.export_cmd import PARITY_ATOL, check_parity  # noqa: E402
from export.onnx_export import CalibratedClassifier  # noqa: E402
from export.quantize import MAX_ACCURACY_LOSS_POINTS, accuracy_gate  # noqa: E402
from service.cli_support import run_main  # noqa: E402
from service.model_file import check_model_file  # noqa: E402
from training.data import load_folder  # noqa: E402
from training.model import CHECKPOINT_FORMAT, build_model, load_checkpoint  # noqa: E402

pytestmark = pytest.mark.train

SIZE = 64
LABELS = ["red", "green", "blue"]
BGR = {"red": (40, 40, 220), "green": (40, 200, 40), "blue": (210, 60, 30)}
TEMPERATURE = 1.5


# ---------------------------------------------------------------- fixtures


def _write_crops(root, per_class, seed):
    """Labelled folder: a band of the class colour on grey metal, with noise."""
    rng = np.random.default_rng(seed)
    files = []
    for name in LABELS:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = np.full((SIZE, SIZE, 3), 150, np.uint8)
            top = rng.integers(10, 40)
            image[top : top + 12] = BGR[name]
            noise = rng.integers(-20, 21, image.shape)
            image = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
            path = folder / f"{i}.png"
            cv2.imwrite(str(path), image)
            files.append(str(path.resolve()))
    return files


def _checkpoint(path, val_files=None):
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", len(LABELS), SIZE, weights="none")
    model.train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average over the fitting batch
        crops = np.random.default_rng(1).integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
        model(torch.from_numpy(crops))
        torch.nn.init.normal_(model.head.weight, std=0.2)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arch": "mobilenet_v2",
        "img_size": SIZE,
        "labels": LABELS,
        "state_dict": model.state_dict(),
        "temperature": TEMPERATURE,
        "weights_origin": "none",
        "dataset_fingerprint": "sha256:" + "ab" * 32,
        "config": {"epochs": 1},
        "metrics": {"val_accuracy": 0.5},
        "created": "2026-12-03T19:00:00+00:00",
    }
    if val_files is not None:
        ckpt["val_files"] = val_files
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    val_files = _write_crops(root / "val", per_class=3, seed=2)
    _write_crops(root / "calib", per_class=6, seed=3)
    return root, val_files


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("run") / "best.pt", val_files=data[1])


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    """A checkpoint without val_files (as from an older trainer)."""
    return _checkpoint(tmp_path_factory.mktemp("bare") / "best.pt")


def export(*argv):
    """Run ``python -m export ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = run_main(main, [str(a) for a in argv])
        except SystemExit as exc:  # argparse's own exit on a bad option
            status = exc.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fp32(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "model.onnx"
    status, stdout, stderr = export("--checkpoint", checkpoint, "--out", out)
    assert status == 0, stderr
    return out, stdout


def _ort(path, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"crops": images})[0]


def _val_images(data):
    return load_folder(data[0] / "val", SIZE, LABELS).images


# ---------------------------------------------------------------- fp32


def test_fp32_export_is_one_checked_file(fp32):
    path, stdout = fp32
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no .data, no temp

    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    info = check_model_file(path)
    assert info.model_id in stdout and "argmax identical" in stdout
    assert info.labels == LABELS and info.input_size == SIZE and info.precision == "fp32"

    meta = info.metadata
    assert json.loads(meta["beltsort.labels"]) == LABELS
    assert meta["beltsort.input_size"] == str(SIZE)
    assert meta["beltsort.arch"] == "mobilenet_v2"
    assert meta["beltsort.weights_origin"] == "none"
    assert meta["beltsort.dataset_fingerprint"] == "sha256:" + "ab" * 32
    assert float(meta["beltsort.val_accuracy"]) == 0.5
    assert float(meta["beltsort.temperature"]) == TEMPERATURE
    assert meta["beltsort.opset"] == "18"
    assert meta["beltsort.version"] and meta["beltsort.created_at"].startswith("20")
    assert {o.version for o in model.opset_import if o.domain == ""} == {18}


def test_dynamic_batch_matches_torch_with_temperature(fp32, checkpoint, data):
    path, _ = fp32
    images = _val_images(data)
    net, _ = load_checkpoint(checkpoint)
    wrapped = CalibratedClassifier(net, TEMPERATURE).eval()
    for batch in (images[:1], images[:5]):
        probs = _ort(path, batch)
        with torch.inference_mode():
            logits = net(torch.from_numpy(batch))
            expected = torch.softmax(logits / TEMPERATURE, dim=1).numpy()
            untempered = torch.softmax(logits, dim=1).numpy()
            assert np.array_equal(wrapped(torch.from_numpy(batch)).numpy(), expected)
        assert probs.shape == (len(batch), len(LABELS)) and probs.dtype == np.float32
        assert np.abs(probs - expected).max() <= PARITY_ATOL
        assert np.array_equal(probs.argmax(1), expected.argmax(1))
        # The temperature is really applied (and the crops really differ).
        assert np.abs(probs - untempered).max() > 1e-3
    assert np.abs(_ort(path, images[:5]) - _ort(path, images[:5])[0]).max() > 1e-3


def test_export_without_validation_crops_says_what_to_do(bare_checkpoint, tmp_path):
    status, _, stderr = export("--checkpoint", bare_checkpoint, "--out", tmp_path / "m.onnx")
    assert status == 2
    assert "no 'val_files'" in stderr and "--val DIR" in stderr
    assert not (tmp_path / "m.onnx").exists()


def test_export_with_moved_val_files(tmp_path):
    ckpt = _checkpoint(tmp_path / "best.pt", val_files=[str(tmp_path / "gone" / "red" / "0.png")])
    status, _, stderr = export("--checkpoint", ckpt, "--out", tmp_path / "m.onnx")
    assert status == 2 and "val_files" in stderr and "--val DIR" in stderr


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    for path, expected in (
        (text, "torch.load(weights_only=True) fails"),
        (other, "is not a beltsort checkpoint"),
    ):
        status, _, stderr = export("--checkpoint", path, "--out", tmp_path / "m.onnx")
        assert status == 2 and expected in stderr and "python -m training fit" in stderr
        assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--int8"], "--int8 needs --calibration"),
        (["--calibration", "."], "only used with --int8"),
        (["--opset", "17"], "invalid choice: 17"),
        (["--fp16", "--int8"], "not allowed with"),
    ],
)
def test_bad_options(checkpoint, tmp_path, extra, expected):
    status, _, stderr = export("--checkpoint", checkpoint, "--out", tmp_path / "m.onnx", *extra)
    assert status == 2 and expected in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- fp16 and int8


@pytest.mark.slow
def test_fp16_export_from_a_val_folder(bare_checkpoint, data, tmp_path):
    out = tmp_path / "model.fp16.onnx"
    status, stdout, stderr = export(
        "--checkpoint", bare_checkpoint, "--out", out, "--fp16", "--val", data[0] / "val"
    )
    assert status == 0, stderr
    assert "fp16" in stdout and "points" in stdout
    info = check_model_file(out)
    assert info.precision == "fp16" and info.metadata["beltsort.precision"] == "fp16"

    model = onnx.load(str(out))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    weights = [t for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type in floats]
    assert len(weights) > 50
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    images = _val_images(data)
    for batch in (images[:1], images[:5]):
        probs = _ort(out, batch)
        assert probs.shape == (len(batch), 3) and probs.dtype == np.float32
        # The softmax runs in float32: rows sum to 1 far tighter than fp16's 1e-3.
        assert np.abs(probs.sum(axis=1) - 1).max() < 1e-5


@pytest.mark.slow
def test_int8_export_forced(checkpoint, fp32, data, tmp_path):
    out = tmp_path / "model.int8.onnx"
    status, stdout, stderr = export(
        "--checkpoint",
        checkpoint,
        "--out",
        out,
        "--int8",
        "--calibration",
        data[0] / "calib",
        "--force",
    )
    assert status == 0, stderr
    info = check_model_file(out)
    assert info.precision == "int8" and "int8" in stdout
    model = onnx.load(str(out))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert info.size_bytes < fp32[0].stat().st_size / 2
    images = _val_images(data)
    for batch in (images[:1], images[:5]):
        probs = _ort(out, batch)
        assert probs.shape == (len(batch), 3)
        assert np.abs(probs.sum(axis=1) - 1).max() < 1e-5


def test_accuracy_gate(caplog):
    limit = MAX_ACCURACY_LOSS_POINTS
    assert accuracy_gate("int8", 90.0, 90.0 - limit, force=False) == -limit
    assert accuracy_gate("int8", 90.0, 95.0, force=False) == 5.0
    with pytest.raises(ExportError, match=r"loses 0\.60 points .* --force"):
        accuracy_gate("int8", 90.0, 89.4, force=False)
    with caplog.at_level(logging.WARNING, logger="export.quantize"):
        assert accuracy_gate("fp16", 90.0, 80.0, force=True) == -10.0
    assert "writing it anyway" in caplog.text


def test_parity_check_bounds():
    reference = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    assert check_parity(reference, reference + 5e-5, "crops") == pytest.approx(5e-5, rel=1e-2)
    with pytest.raises(ExportError, match=r"max \|probability difference\| 2.00e-04"):
        check_parity(reference, reference + 2e-4, "crops")
    flipped = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=np.float32)
    with pytest.raises(ExportError, match="argmax differs on 1 of 2"):
        check_parity(reference, flipped, "crops")


# ---------------------------------------------------------------- bench


def test_bench_rows_and_ratios(fp32, checkpoint):
    rows = bench([fp32[0]], checkpoint, batches=(1, 2), seconds=0.01, threads=1)
    cpu = [(r.name, r.batch) for r in rows if r.device == "CPU"]
    assert cpu == [("model.onnx", 1), ("model.onnx", 2), ("PyTorch eager", 1), ("PyTorch eager", 2)]
    assert all(r.runs >= 5 and r.p50_ms > 0 and r.crops_per_s > 0 for r in rows)
    table = format_table(rows)
    assert "x eager" in table and "PyTorch eager" in table


def test_bench_finds_siblings(tmp_path):
    for name in ("model.onnx", "model.int8.onnx", "model_fp16.onnx", "other.onnx", "model.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = [p.name for p in with_siblings([tmp_path / "model.onnx"])]
    assert found == ["model.onnx", "model.int8.onnx", "model_fp16.onnx"]
    two = [tmp_path / "model.onnx", tmp_path / "other.onnx"]
    assert with_siblings(two) == two

"""The model-file contract check the daemon runs at load (service.model_file).

The files are small hand-built ONNX graphs with the contract's signature
(uint8 crops -> mean colour -> linear -> softmax), so these tests need no
torch and run in well under a second each; real onnxruntime runs them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.errors import ModelFileError
from service.model_file import ModelInfo, check_model_file

SIZE = 8
LABELS = ["red", "green", "blue"]
REPO = Path(__file__).resolve().parents[1]


def tiny_model(
    *,
    input_type: int = TensorProto.UINT8,
    batch: int | str = "N",
    softmax: bool = True,
    labels: list[str] | None = LABELS,
    size: int = SIZE,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """crops (N, S, S, 3) -> mean over pixels -> (N, 3) @ W (3, C) -> softmax -> probs (N, C)."""
    classes = len(labels) if labels else 3
    weight = np.random.default_rng(0).normal(size=(3, classes)).astype(np.float32) / 255
    nodes = [
        helper.make_node("Cast", ["crops"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits" if softmax else "probs"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("crops", input_type, [batch, size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(weight, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    meta = {"beltsort.input_size": str(size), "beltsort.precision": "fp32"}
    if labels is not None:
        meta["beltsort.labels"] = json.dumps(labels)
    meta.update(metadata or {})
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path), save_as_external_data=False)
    return path


def refused(path: Path) -> str:
    with pytest.raises(ModelFileError) as caught:
        check_model_file(path)
    message = str(caught.value)
    assert message.startswith(f"model file {path}: ")
    assert "\n" not in message
    return message


def test_good_file_is_described(tmp_path):
    path = save(tiny_model(), tmp_path / "m.onnx")
    info = check_model_file(path)

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(info, ModelInfo)
    assert info.sha256 == sha
    assert info.model_id == sha[:12]
    assert info.size_bytes == path.stat().st_size
    assert info.labels == LABELS and info.num_classes == 3
    assert info.input_size == SIZE
    assert (info.input_name, info.output_name, info.precision) == ("crops", "probs", "fp32")
    assert info.metadata["beltsort.labels"] == json.dumps(LABELS)
    assert info.model_bytes == path.read_bytes()
    assert "model_bytes" not in repr(info)


def test_model_id_follows_the_bytes(tmp_path):
    a = check_model_file(save(tiny_model(), tmp_path / "a.onnx"))
    b = check_model_file(save(tiny_model(metadata={"beltsort.note": "x"}), tmp_path / "b.onnx"))
    assert a.model_id != b.model_id


def test_missing_and_empty_files(tmp_path):
    assert "does not exist" in refused(tmp_path / "absent.onnx")
    assert "is not a file" in refused(tmp_path)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "is empty" in refused(empty)


def test_truncated_file(tmp_path):
    good = save(tiny_model(), tmp_path / "m.onnx").read_bytes()
    for keep in (len(good) // 2, len(good) - 7, 40):
        cut = tmp_path / f"cut{keep}.onnx"
        cut.write_bytes(good[:keep])
        message = refused(cut)
        assert "re-export" in message


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(1).bytes(4096))
    assert "is not an ONNX model" in refused(junk)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    assert "is not an ONNX model" in refused(text)


def test_wrong_input_dtype(tmp_path):
    path = save(tiny_model(input_type=TensorProto.FLOAT), tmp_path / "m.onnx")
    message = refused(path)
    assert "input 'crops' is float32" in message and "uint8" in message


def test_fixed_batch_is_refused(tmp_path):
    assert "batch axis must be dynamic" in refused(save(tiny_model(batch=1), tmp_path / "m.onnx"))


def test_input_size_must_match_metadata(tmp_path):
    model = tiny_model(metadata={"beltsort.input_size": "16"})
    assert "shape" in refused(save(model, tmp_path / "m.onnx"))


def test_missing_labels(tmp_path):
    message = refused(save(tiny_model(labels=None), tmp_path / "m.onnx"))
    assert "no beltsort.labels" in message


@pytest.mark.parametrize(
    ("labels", "expected"),
    [("red,green,blue", "not a JSON list"), ('["red", "red", "blue"]', "repeats red")],
)
def test_bad_labels(tmp_path, labels, expected):
    model = tiny_model(metadata={"beltsort.labels": labels})
    assert expected in refused(save(model, tmp_path / "m.onnx"))


def test_label_count_must_match_output(tmp_path):
    model = tiny_model(metadata={"beltsort.labels": json.dumps(["a", "b", "c", "d"])})
    assert "[N, 4]" in refused(save(model, tmp_path / "m.onnx"))


def test_output_must_be_probabilities(tmp_path):
    message = refused(save(tiny_model(softmax=False), tmp_path / "m.onnx"))
    assert "not probabilities" in message


def test_unknown_precision(tmp_path):
    model = tiny_model(metadata={"beltsort.precision": "int4"})
    assert "'int4'" in refused(save(model, tmp_path / "m.onnx"))


def test_external_data_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(
        tiny_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "m.onnx.data").exists()
    message = refused(path)
    assert "external data" in message and "m.onnx.data" in message


def test_structure_only_check_skips_the_session(tmp_path):
    path = save(tiny_model(softmax=False), tmp_path / "m.onnx")
    info = check_model_file(path, run_session=False)
    assert info.labels == LABELS


def test_inspect_command(tmp_path):
    good = save(tiny_model(), tmp_path / "good.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[:100])
    command = [sys.executable, "-m", "export", "inspect"]

    ok = subprocess.run(
        [*command, str(good)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    info = check_model_file(good)
    assert info.model_id in ok.stdout and info.sha256 in ok.stdout
    assert "0=red, 1=green, 2=blue" in ok.stdout
    assert "crops: uint8 [N, 8, 8, 3]" in ok.stdout

    as_json = subprocess.run(
        [*command, str(good), "--json"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert json.loads(as_json.stdout)["model_id"] == info.model_id

    broken = subprocess.run(
        [*command, str(bad)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert broken.returncode == 2
    assert broken.stdout == ""
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an ONNX model" in lines[0], broken.stderr

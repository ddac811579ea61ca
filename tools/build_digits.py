"""Build skyhop/catalog/digits.onnx and tests/vectors/digits_samples.npz, deterministically.

Run from anywhere (needs the ``build-models`` extra: scikit-learn and onnx)::

    python tools/build_digits.py            # writes both files, prints accuracy and sha256
    python tools/build_digits.py --check    # builds in memory, fails if the files differ

The model is a 64→32 (ReLU)→10 MLP trained on scikit-learn's bundled 8x8 digits (no
download). The ONNX graph is written by hand with ``onnx.helper`` so the bytes depend only
on the weights: no converter version, no timestamps, and training runs on one BLAS thread.
Two builds on the same platform give byte-identical files whatever the core count; another
BLAS or numpy build may still change the last bits of the weights, which is why
skyhop/catalog/catalog.toml pins the sha256 of the committed file rather than of a rebuild.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
MODEL_PATH = REPO / "skyhop" / "catalog" / "digits.onnx"
SAMPLES_PATH = REPO / "tests" / "vectors" / "digits_samples.npz"

SEED = 0
HIDDEN = 32
N_SAMPLES = 32
PIXEL_MAX = 16.0  # load_digits pixels are 0..16; the graph takes them raw
OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.17 reads IR 8; newer IRs would lock out older runtimes
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # zip's epoch: keeps the npz free of build timestamps


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, x_test, y_train, y_test)``: raw pixels float32, labels int64."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


def train(x_train: np.ndarray, y_train: np.ndarray) -> MLPClassifier:
    """Fit the MLP on pixels scaled to 0..1 (the scale is folded into the graph later)."""
    # lbfgs is full-batch, so there is no shuffling to seed beyond the initial weights.
    mlp = MLPClassifier(
        hidden_layer_sizes=(HIDDEN,), activation="relu", solver="lbfgs",
        alpha=1e-3, max_iter=2000, random_state=SEED,
    )
    # A multi-threaded BLAS sums in an order that depends on the thread count, and lbfgs
    # amplifies those last bits: one thread makes the weights independent of the machine's
    # core count and of OMP_NUM_THREADS.
    with threadpool_limits(limits=1):
        return mlp.fit(x_train / PIXEL_MAX, y_train)


def to_onnx(mlp: MLPClassifier) -> onnx.ModelProto:
    """Hand-written graph: image → MatMul/Add/Relu → MatMul/Add → Softmax, ArgMax."""
    # Folding 1/16 into the first weights lets callers send load_digits pixels unchanged.
    w1 = (mlp.coefs_[0] / PIXEL_MAX).astype(np.float32)
    b1 = mlp.intercepts_[0].astype(np.float32)
    w2 = mlp.coefs_[1].astype(np.float32)
    b2 = mlp.intercepts_[1].astype(np.float32)
    inits = [numpy_helper.from_array(a, name) for a, name in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", ["image", "w1"], ["h_mm"], name="fc1"),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"], name="fc1_bias"),
        helper.make_node("Relu", ["h_pre"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w2"], ["z_mm"], name="fc2"),
        helper.make_node("Add", ["z_mm", "b2"], ["logits"], name="fc2_bias"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "digits",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 64])],
        outputs=[
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="skyhop-models-digits", producer_version="1",
        doc_string="8x8 digits MLP; input raw load_digits pixels 0..16",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def npz_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """An ``np.load``-able npz with fixed member timestamps (np.savez stamps the clock)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in (("images", images), ("labels", labels)):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def build() -> tuple[bytes, bytes, float]:
    """Return ``(onnx_bytes, npz_bytes, test_accuracy)`` without touching the disk."""
    x_train, x_test, y_train, y_test = split()
    mlp = train(x_train, y_train)
    accuracy = float((mlp.predict(x_test / PIXEL_MAX) == y_test).mean())
    samples = npz_bytes(x_test[:N_SAMPLES].astype(np.float32), y_test[:N_SAMPLES])
    return to_onnx(mlp).SerializeToString(), samples, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="rebuild in memory and fail if the committed files differ")
    args = parser.parse_args(argv)
    model, samples, accuracy = build()
    print(f"test accuracy {accuracy:.4f}")
    if accuracy <= 0.9:
        print("accuracy too low: refusing to write", file=sys.stderr)
        return 1
    for path, data in ((MODEL_PATH, model), (SAMPLES_PATH, samples)):
        digest = hashlib.sha256(data).hexdigest()
        if args.check:
            same = path.is_file() and path.read_bytes() == data
            print(f"{'same' if same else 'DIFFERS'} {digest} {path.relative_to(REPO)}")
            if not same:
                return 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {digest} {path.relative_to(REPO)} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

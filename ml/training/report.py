"""report.html: one self-contained page per trained model (pictures inline as PNG data URLs, matplotlib Agg).

Training curves (loss, accuracy, learning rate), the confusion matrix, the reliability diagram before and after
calibration, the auto-accept table, per-class precision/recall/F1, and the most confidently wrong validation
images with their true and predicted labels.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPORT_FILE = "report.html"
MAX_WRONG_IMAGES = 16
MAX_MATRIX_CLASSES = 50
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}
"""Every text in the plots is literal: a class name such as ``$x^$`` is shown as written, never parsed as
mathtext (which may fail at ``savefig``) or LaTeX."""


def write_report(path: Path, metrics: Mapping[str, Any], class_names: Sequence[str], model_name: str,
                 wrong: Sequence[tuple[str, str, str, float]]) -> Path:
    """Render the page to ``path``. ``wrong``: (image path, true label, predicted label, confidence), most
    confident first."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    with matplotlib.rc_context(LITERAL_TEXT):
        sections = [
            f"<h1>{_e(model_name)}: training report</h1>",
            _summary(metrics),
            "<h2>Training curves</h2>" + _img(_curves(metrics.get("epochs") or []), "training curves"),
            "<h2>Reliability before and after calibration</h2>" + _img(_reliability(metrics), "reliability diagram"),
            "<h2>Auto-accept</h2>" + _auto_accept_table(metrics),
            "<h2>Per class</h2>" + _per_class_table(metrics.get("per_class") or {}),
        ]
        matrix = metrics.get("confusion_matrix")
        if matrix is not None and len(class_names) <= MAX_MATRIX_CLASSES:
            sections.append("<h2>Confusion matrix</h2>"
                            + _img(_confusion(np.asarray(matrix), class_names), "confusion matrix"))
        sections.append("<h2>Most confidently wrong validation images</h2>"
                        + (_img(_wrong_grid(wrong), "confidently wrong images") if wrong
                           else "<p>None: every validation image is right.</p>"))
    return _write_page(path, model_name, sections)


def _write_page(path: Path, model_name: str, sections: Sequence[str]) -> Path:
    """The page around ``sections`` (HTML), written to ``path``."""
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + _e(model_name) + " report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "img{max-width:100%}</style></head><body>" + "\n".join(sections) + "</body></html>\n")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _e(text: Any) -> str:
    return html.escape(str(text))


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else _e(value)


def _summary(metrics: Mapping[str, Any]) -> str:
    rows = [("val_accuracy", metrics.get("val_accuracy")), ("macro_f1", metrics.get("macro_f1")),
            ("balanced_accuracy", metrics.get("balanced_accuracy")), ("best_epoch", metrics.get("best_epoch")),
            ("temperature", metrics.get("temperature")),
            *([("temperature note", _e(metrics["temperature_note"]))] if metrics.get("temperature_note") else []),
            *_calibration_rows(metrics)]
    return _key_value_table(rows)


def _calibration_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    ece, nll = metrics.get("ece") or {}, metrics.get("nll") or {}
    return [("ECE before / after", f"{_fmt(ece.get('before'))} / {_fmt(ece.get('after'))}"),
            ("NLL before / after", f"{_fmt(nll.get('before'))} / {_fmt(nll.get('after'))}")]


def _key_value_table(rows: Sequence[tuple[str, Any]]) -> str:
    """One row per (name, value); a string value is HTML already, anything else is formatted."""
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v if isinstance(v, str) else _fmt(v)}</td></tr>"
                               for k, v in rows) + "</table>"


def _auto_accept_table(metrics: Mapping[str, Any]) -> str:
    rows = metrics.get("auto_accept") or []
    body = "".join(f"<tr><td>{r['precision']:.2f}</td><td>{'never' if r['threshold'] is None else _fmt(r['threshold'])}</td>"
                   f"<td>{r['coverage']:.3f}</td></tr>" for r in rows)
    return "<table><tr><th>target precision</th><th>confidence threshold</th><th>coverage</th></tr>" + body + "</table>"


def _per_class_table(per_class: Mapping[str, Mapping[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(name)}</th><td>{_fmt(r['precision'], 3)}</td><td>{_fmt(r['recall'], 3)}</td>"
                   f"<td>{_fmt(r['f1'], 3)}</td><td>{r['support']}</td></tr>" for name, r in per_class.items())
    return "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>" + body + "</table>"


def _img(png: bytes, alt: str) -> str:
    return f"<p><img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _curves(history: Sequence[Mapping[str, Any]]) -> bytes:
    import matplotlib.pyplot as plt

    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3))
    axes[0].plot(epochs, [h.get("train_loss") for h in history], "o-", label="train")
    axes[0].plot(epochs, [h.get("val_loss") for h in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, [h.get("val_accuracy") for h in history], "o-")
    axes[1].set_title("val accuracy")
    axes[2].plot(epochs, [h.get("lr") for h in history], "o-")
    axes[2].set_title("learning rate (end of epoch)")
    for axis in axes:
        axis.set_xlabel("epoch")
    return _png(figure)


def _reliability(metrics: Mapping[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    reliability = metrics.get("reliability") or {}
    figure, axes = plt.subplots(1, 2, figsize=(9, 4))
    for axis, key in zip(axes, ("before", "after")):
        bins = reliability.get(key) or []
        centers = [(b["lo"] + b["hi"]) / 2 for b in bins if b["count"]]
        accuracy = [b["accuracy"] for b in bins if b["count"]]
        width = (bins[0]["hi"] - bins[0]["lo"]) if bins else 0.1
        axis.bar(centers, accuracy, width=width * 0.9, color="#4a7ebb", label="accuracy")
        axis.plot([0, 1], [0, 1], "k--", label="perfect")
        ece = (metrics.get("ece") or {}).get(key)
        axis.set_title(f"{key} (ECE {ece:.4f})" if isinstance(ece, float) else key)
        axis.set_xlabel("confidence")
        axis.set_ylabel("accuracy")
        axis.legend(loc="upper left")
    return _png(figure)


def _confusion(matrix: np.ndarray, class_names: Sequence[str]) -> bytes:
    import matplotlib.pyplot as plt

    size = max(4, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names, rotation=90)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(class_names) <= 20:
        for (i, j), value in np.ndenumerate(matrix):
            axis.text(j, i, str(value), ha="center", va="center", fontsize=7,
                      color="white" if value > matrix.max() / 2 else "black")
    return _png(figure)


def _wrong_grid(wrong: Sequence[tuple[str, str, str, float]]) -> bytes:
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = list(wrong)[:MAX_WRONG_IMAGES]
    columns = min(4, len(shown))
    rows = (len(shown) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (path, true, predicted, confidence) in zip(axes.flat, shown):
        with Image.open(path) as image:
            axis.imshow(np.asarray(image.convert("RGB")))
        axis.set_title(f"true {true}\npred {predicted} ({confidence:.2f})", fontsize=8)
    return _png(figure)


MAX_PR_CLASSES = 40


def write_multilabel_report(path: Path, metrics: Mapping[str, Any], class_names: Sequence[str], model_name: str,
                            probabilities: np.ndarray, truth: np.ndarray) -> Path:
    """The multi-label page: mAP and F1 summary, training curves, per-class PR curves (the tuned threshold
    marked; the first ``MAX_PR_CLASSES`` classes), per-class AP / threshold / calibration / F1, auto-accept."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    rows = [("mAP", metrics.get("map")), ("micro_f1", metrics.get("micro_f1")), ("macro_f1", metrics.get("macro_f1")),
            ("exact tag sets (val_accuracy)", metrics.get("val_accuracy")), ("best_epoch", metrics.get("best_epoch")),
            *_calibration_rows(metrics)]
    summary = _key_value_table(rows)
    per_class = metrics.get("per_class") or {}
    ap, methods = metrics.get("per_class_ap") or {}, metrics.get("calibration") or {}
    body = "".join(f"<tr><th>{_e(name)}</th><td>{_fmt(ap.get(name), 3)}</td><td>{_fmt(r.get('threshold'), 3)}</td>"
                   f"<td>{_e(methods.get(name, '-'))}</td><td>{_fmt(r['precision'], 3)}</td><td>{_fmt(r['recall'], 3)}</td>"
                   f"<td>{_fmt(r['f1'], 3)}</td><td>{r['support']}</td></tr>" for name, r in per_class.items())
    table = ("<table><tr><th>class</th><th>AP</th><th>threshold</th><th>calibration</th><th>precision</th>"
             "<th>recall</th><th>F1</th><th>positives</th></tr>" + body + "</table>")
    thresholds = metrics.get("thresholds") or {}
    with matplotlib.rc_context(LITERAL_TEXT):
        sections = [
            f"<h1>{_e(model_name)}: multi-label training report</h1>", summary,
            "<h2>Training curves</h2>" + _img(_curves(metrics.get("epochs") or []), "training curves"),
            "<h2>Precision-recall per class</h2>" + _img(_pr_curves(probabilities, truth, class_names, thresholds),
                                                          "PR curves"),
            "<h2>Per class</h2>" + table,
            "<h2>Auto-accept (all tags pooled; per class in metrics.json)</h2>" + _auto_accept_table(metrics),
        ]
    return _write_page(path, model_name, sections)


def _pr_curves(probabilities: np.ndarray, truth: np.ndarray, class_names: Sequence[str],
               thresholds: Mapping[str, float]) -> bytes:
    import matplotlib.pyplot as plt

    shown = list(class_names)[:MAX_PR_CLASSES]
    columns = min(4, max(1, len(shown)))
    rows = (len(shown) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.ravel()[len(shown):]:
        axis.axis("off")
    for c, (axis, name) in enumerate(zip(axes.ravel(), shown)):
        scores, positives = probabilities[:, c], truth[:, c].astype(bool)
        order = np.argsort(-scores, kind="stable")
        hits = np.cumsum(positives[order])
        total = max(1, int(positives.sum()))
        axis.plot(hits / total, hits / np.arange(1, len(order) + 1), "-")
        threshold = thresholds.get(name)
        if threshold is not None and positives.any():
            accepted = scores >= threshold
            tp = int((accepted & positives).sum())
            axis.plot([tp / total], [tp / max(1, int(accepted.sum()))], "ro")
        axis.set_title(str(name)[:30], fontsize=9)
        axis.set_xlim(0, 1.02)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("recall", fontsize=8)
        axis.set_ylabel("precision", fontsize=8)
    figure.tight_layout()
    return _png(figure)

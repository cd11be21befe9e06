"""Multi-label: the contract's validation (every error names its entry), and the pieces training measures and
stores (average precision, thresholds, per-class calibration, auto-accept on a split it never saw, losses,
mixed multi-hot targets, balancing), and the CLIP per-class rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from ml.training import multilabel
from ml.training.augment import build_mixup
from ml.training.data import stratified_split
from schemas.annotation import AnnotationRequest
from schemas.codec import TRAINING_ADAPTER, Invalid, decode
from schemas.training import TrainingRequest

CLASSES = ["cat", "dog", "car"]


def training_body(train_urls: list, *, multi_label: bool = True, val_urls: list | None = None) -> dict:
    return {"task": "train", "config": {"model_name": "resnet10t", "num_classes": 3, "multi_label": multi_label},
            "dataset": {"train_urls": train_urls, "val_urls": val_urls or [], "class_names": CLASSES},
            "output_path": "s3://b/out"}


def invalid_message(body: dict) -> str:
    result = decode(TRAINING_ADAPTER, json.loads(json.dumps(body)), "job_id", b"job-1")
    assert isinstance(result, Invalid), result
    assert result.entity_id == "job-1"  # named: the worker answers it with a failed invalid_request event
    return result.message


def test_multi_label_entries_are_accepted_including_empty_tag_sets():
    body = training_body([{"url": "s3://b/1.png", "labels": ["cat", "dog"]}, {"url": "s3://b/2.png", "labels": []}],
                         val_urls=[{"url": "s3://b/3.png", "labels": ["car"]}])
    request = TrainingRequest.model_validate(body)
    assert request.config.multi_label and request.dataset.train_urls[1].labels == []


@pytest.mark.parametrize(("entries", "where", "problem"), [
    ([{"url": "s3://b/1.png", "labels": ["cat"]}, {"url": "s3://b/2.png", "labels": ["cat", "cow"]}],
     "dataset.train_urls[1]", "not in class_names"),
    ([{"url": "s3://b/1.png", "labels": ["dog", "dog"]}], "dataset.train_urls[0]", "repeats labels"),
    ([{"url": "s3://b/1.png", "labels": []}, {"url": "s3://b/2.png", "label": "cat"}],
     "dataset.train_urls[1]", "multi_label is true"),
    (["s3://b/cat/1.png"], "dataset.train_urls[0]", "plain URL"),
])
def test_multi_label_job_refuses_bad_entries_naming_them(entries, where, problem):
    message = invalid_message(training_body(entries))
    assert where in message and problem in message


def test_labels_on_a_single_label_job_name_the_entry():
    body = training_body([{"url": "s3://b/1.png", "label": "cat"}], multi_label=False,
                         val_urls=[{"url": "s3://b/2.png", "label": "dog"}, {"url": "s3://b/3.png", "labels": ["dog"]}])
    message = invalid_message(body)
    assert "dataset.val_urls[1]" in message and "multi_label is false" in message


def test_an_entry_with_both_label_and_labels_or_neither_is_refused():
    for entry in ({"url": "s3://b/1.png", "label": "cat", "labels": ["cat"]}, {"url": "s3://b/1.png"}):
        assert "train_urls" in invalid_message(training_body([entry]))


def test_many_bad_entries_are_summarised_not_listed_without_bound():
    entries = [{"url": f"s3://b/{i}.png", "labels": ["nope"]} for i in range(1000)]
    message = invalid_message(training_body(entries))
    assert "1000 dataset entries do not fit" in message and "dataset.train_urls[0]" in message and len(message) < 2000


def test_single_label_requests_validate_as_before():
    body = training_body(["s3://b/cat/1.png", {"url": "s3://b/x.png", "label": "dog"}], multi_label=False)
    request = TrainingRequest.model_validate(body)
    assert request.dataset.train_urls[1].label == "dog" and request.dataset.train_urls[1].labels is None


def test_classify_multi_label_takes_auto_accept_on_custom_and_tag_sets_as_examples():
    base = {"task": "classify", "model": "siglip", "images": [{"id": "a", "url": "s3://b/a.png"}],
            "classes": ["a", "b"], "top_k": 2, "multi_label": True}
    assert AnnotationRequest.model_validate(base).multi_label
    custom = AnnotationRequest.model_validate({**base, "model": "custom", "model_url": "s3://b/m",
                                               "auto_accept_precision": 0.9})
    assert custom.auto_accept_precision == 0.9
    with pytest.raises(ValueError, match="only allowed with model 'custom'"):
        AnnotationRequest.model_validate({**base, "auto_accept_precision": 0.9})
    with pytest.raises(ValueError, match=r"examples\[0\] has 'label' but the request has multi_label"):
        AnnotationRequest.model_validate({**base, "examples": [{"url": "s3://b/e.png", "label": "a"}]})
    few = AnnotationRequest.model_validate({**base, "examples": [{"url": "s3://b/e.png", "labels": ["a", "b"]},
                                                                 {"url": "s3://b/f.png", "labels": []}]})
    assert [e.labels for e in few.examples] == [["a", "b"], []]


def _rows(**thresholds) -> list[dict]:
    return [{"precision": p, "threshold": thresholds.get(f"p{int(p * 100)}")} for p in (0.90, 0.95, 0.98, 0.99)]


@pytest.fixture(scope="module")
def multi_label_package(tmp_path_factory):
    """A multi-label test_resnet package (random weights) with chosen thresholds and auto-accept tables: class 'cat'
    has its own table, the others use the pooled one."""
    import timm

    from handlers.model_handles import CustomHandle
    from handlers.model_config import ModelKey
    from ml.trained import TrainedModel
    from ml.training.package import build_package_config, write_package

    config = build_package_config(
        model_name="test_resnet", model_kwargs={}, class_names=CLASSES,
        data_config={"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
                     "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "crop_mode": "center"},
        training={}, best_epoch=1,
        calibration={"per_class": {c: {"method": "none", "a": 1.0, "b": 0.0} for c in CLASSES},
                     "auto_accept": {"global": _rows(p90=0.8, p95=0.9), "per_class": {"cat": _rows(p90=0.6)}}})
    config["multi_label"] = True
    config["thresholds"] = {"cat": 0.5, "dog": 0.4, "car": 0.3}
    model = timm.create_model("test_resnet", num_classes=len(CLASSES))
    package = write_package(tmp_path_factory.mktemp("ml-pkg") / "p", model.state_dict(), config, {})
    return CustomHandle(ModelKey("custom", "s3://b/p", "s3://b/p"), TrainedModel.load(package, device="cpu"))


def test_multi_label_package_auto_accepts_tags_by_their_own_thresholds(multi_label_package):
    from handlers.annotation import _score_multi_label

    handle = multi_label_package
    probabilities = torch.tensor([[0.65, 0.85, 0.95],   # cat by its own table (0.6), dog 0.85 >= pooled 0.8, car too
                                  [0.55, 0.79, 0.35],   # nothing reaches: cat < 0.6, dog < 0.8
                                  [0.99, 0.10, 0.81]])  # cat and car
    rows = list(torch.logit(probabilities.double()).float())  # the handle's forward: calibrated logits
    prepared = [0, 1, 2]
    ranked, tags, accepted = _score_multi_label(handle, rows, prepared, CLASSES, 3, 0.0, 0.9)
    assert accepted == [["car", "dog", "cat"], [], ["cat", "car"]]
    assert tags == [["car", "dog", "cat"], ["dog", "cat", "car"], ["cat", "car"]]  # the F1 thresholds: other sets
    # at 0.95 cat's own table has no threshold (its images did not prove it): never accepted, not the pooled 0.9
    _, _, strict = _score_multi_label(handle, rows, prepared, CLASSES, 3, 0.0, 0.95)
    assert strict == [["car"], [], []]
    _, _, capped = _score_multi_label(handle, rows, prepared, CLASSES, 1, 0.0, 0.9)  # top_k caps, most probable first
    assert capped == [["car"], [], ["cat"]]
    _, _, none = _score_multi_label(handle, rows, prepared, CLASSES, 3, 0.0, 0.99)  # no threshold: never accepted
    assert none == [[], [], []]
    _, _, subset = _score_multi_label(handle, rows, [2, 0], ["car", "cat"], 2, 0.0, 0.9)
    assert subset == [["car", "cat"], [], ["cat", "car"]]  # a requested subset keeps each class's own threshold
    _, _, unasked = _score_multi_label(handle, rows, prepared, CLASSES, 3, 0.0, None)
    assert unasked == [None, None, None]


def test_part_size_counts_accepted_labels():
    from handlers.parts import part_size_for

    body = {"task": "classify", "model": "custom", "model_url": "s3://b/m", "multi_label": True, "top_k": 50,
            "images": [{"id": f"i{i}", "url": "s3://b/a.png"} for i in range(200)]}
    names = [f"{'x' * 190}{i:03d}" for i in range(50)]
    plain = part_size_for(AnnotationRequest.model_validate(body), 1000, names, multi_label=True)
    accepting = part_size_for(AnnotationRequest.model_validate({**body, "auto_accept_precision": 0.9}), 1000, names,
                              multi_label=True)
    assert accepting < plain


# -- metrics -----------------------------------------------------------------------------------------------------

def test_average_precision_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.random(200) < 0.3
        scores = np.round(rng.random(200) + truth * 0.3, 1)  # rounded: many ties
        assert multilabel.average_precision(scores, truth) == pytest.approx(average_precision_score(truth, scores))
    assert multilabel.average_precision(np.array([0.2, 0.9]), np.array([False, False])) is None


def test_tuned_thresholds_reach_the_best_f1_of_any_cut():
    rng = np.random.default_rng(1)
    truth = rng.random((300, 3)) < [0.1, 0.4, 0.7]
    probabilities = np.clip(truth * 0.35 + rng.random((300, 3)) * 0.65, 0, 1)
    thresholds = multilabel.tune_thresholds(probabilities, truth)
    def f1(y: np.ndarray, predicted: np.ndarray) -> float:
        tp = (y & predicted).sum()
        return 2 * tp / (y.sum() + predicted.sum())

    for c in range(3):
        best = max(f1(truth[:, c], probabilities[:, c] >= t) for t in np.unique(probabilities[:, c]))
        assert f1(truth[:, c], probabilities[:, c] >= thresholds[c]) == pytest.approx(best)
    report = multilabel.f1_report(probabilities, truth, thresholds, ["a", "b", "c"])
    assert report["micro_f1"] == pytest.approx(f1_score(truth, probabilities >= thresholds, average="micro"))
    assert report["macro_f1"] == pytest.approx(f1_score(truth, probabilities >= thresholds, average="macro"))


def synthetic_logits(n: int, seed: int, scale=(0.5, 3.0, 1.0), bias=(0.0, 1.5, -1.0)) -> tuple[torch.Tensor, np.ndarray]:
    """Logits of a network over-/under-confident by a known affine map per class: the true probability of each tag
    is sigmoid(z / scale_c - bias_c)... written as z = scale_c * (true logit + bias_c)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.5, (n, 3))
    truth = rng.random((n, 3)) < 1 / (1 + np.exp(-true_logits))
    z = np.asarray(scale) * (true_logits + np.asarray(bias))
    return torch.tensor(z), truth.astype(np.int64)


def test_per_class_calibration_picks_the_map_that_recovers_the_truth():
    logits, truth = synthetic_logits(6000, 0)
    calibration = multilabel.fit_calibration(logits, truth, CLASSES)
    assert calibration["cat"]["method"] in ("temperature", "platt") and calibration["cat"]["a"] == pytest.approx(2.0, rel=0.15)
    assert calibration["dog"]["method"] == "platt"  # a bias no temperature can undo
    assert calibration["dog"]["a"] == pytest.approx(1 / 3, rel=0.15) and calibration["dog"]["b"] == pytest.approx(-1.5, abs=0.25)
    for row in calibration.values():
        assert row["nll_after"] <= row["nll_before"] + 1e-12
    # on fresh images from the same source the calibrated probabilities are better (NLL and ECE)
    test_logits, test_truth = synthetic_logits(6000, 1)
    a, b = multilabel.calibration_arrays(calibration, CLASSES)
    raw = multilabel.calibrated_probabilities(test_logits, np.ones(3), np.zeros(3))
    calibrated = multilabel.calibrated_probabilities(test_logits, a, b)
    assert multilabel.mean_nll(calibrated, test_truth) < multilabel.mean_nll(raw, test_truth)
    assert multilabel.expected_calibration_error(calibrated, test_truth) < 0.02


def test_calibration_of_a_class_without_positives_stays_finite():
    logits = torch.randn(50, 2, dtype=torch.float64)
    truth = np.zeros((50, 2), dtype=np.int64)
    truth[:10, 1] = 1
    calibration = multilabel.fit_calibration(logits, truth, ["never", "some"])
    assert calibration["never"]["method"] != "platt" and np.isfinite(calibration["never"]["a"])


def test_per_class_auto_accept_holds_on_a_split_the_thresholds_never_saw():
    logits, truth = synthetic_logits(4000, 2)
    calibration = multilabel.fit_calibration(logits, truth, CLASSES)
    a, b = multilabel.calibration_arrays(calibration, CLASSES)
    tables = multilabel.auto_accept_tables(multilabel.calibrated_probabilities(logits, a, b), truth, CLASSES)
    test_logits, test_truth = synthetic_logits(20000, 3)
    test_probabilities = multilabel.calibrated_probabilities(test_logits, a, b)
    checked = 0
    for c, name in enumerate(CLASSES):
        for row in tables["per_class"][name]:
            if row["threshold"] is None:
                continue
            accepted = test_probabilities[:, c] >= row["threshold"]
            if accepted.sum() >= 100:
                checked += 1
                assert test_truth[accepted, c].mean() >= row["precision"] - 0.02, (name, row)
    assert checked >= 6


# -- training pieces ---------------------------------------------------------------------------------------------

def test_asymmetric_loss_without_focusing_or_clip_is_bce():
    logits, targets = torch.randn(8, 5), (torch.rand(8, 5) < 0.3).float()
    plain = multilabel.AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, targets)
    assert plain.item() == pytest.approx(multilabel.BceLoss()(logits, targets).item(), rel=1e-5)
    # with its defaults easy negatives cost nothing and the loss is lower than BCE on a many-negatives batch
    easy = torch.full((4, 10), -6.0)
    assert multilabel.AsymmetricLoss()(easy, torch.zeros(4, 10)).item() == 0.0
    assert multilabel.AsymmetricLoss()(logits, targets).item() < plain.item()


def test_mixup_mixes_multi_hot_targets_with_the_image_weights():
    torch.manual_seed(0)
    mixup = build_mixup("heavy", 4, 0.0, multi_label=True)
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    targets = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.float32)
    mixed_images, mixed = mixup(images.clone(), targets.clone())
    assert mixed.shape == (4, 4) and torch.all((mixed >= 0) & (mixed <= 1))
    lam = mixed[1, 1].item()  # row i mixes with row 3 - i (the batch flipped): row 1 [0,1,1,0] with row 2 [0,0,0,0]
    assert 0.0 < lam <= 1.0 and mixed[1, 2].item() == pytest.approx(lam) and mixed[1, 0].item() == 0.0
    assert mixed[0, 3].item() == pytest.approx(1 - lam) and mixed[0, 0].item() == pytest.approx(1.0)
    # the images were mixed with the same weight (mixup: blended; cutmix: that share of the pixels)
    assert mixed_images[1].mean().item() == pytest.approx(lam * 1.0 + (1 - lam) * 2.0, abs=1e-4)


def test_balancing_for_multi_hot_labels():
    labels = [(0,), (0,), (0, 1), (), (), ()]
    assert multilabel.balanced_pos_weights(labels, 3) == [1.0, 5.0, 1.0]  # 3 vs 3; 1 vs 5; no positive
    weights = multilabel.balanced_sample_weights(labels, 3)
    assert weights[2] == 1.0 and weights[0] == pytest.approx(1 / 3) and weights[3] == pytest.approx(1 / 3)


def test_multi_label_split_keeps_every_rare_tag_in_both_splits():
    samples = [(f"{i}.png", (0,) if i % 2 else ()) for i in range(40)] + [(f"r{i}.png", (0, 2)) for i in range(4)]
    train, val = stratified_split(samples, 0.25, seed=0)
    assert len(train) + len(val) == 44
    assert any(2 in label for _, label in train) and any(2 in label for _, label in val)
    assert any(label == () for _, label in val)


def test_clip_rule_is_the_two_way_softmax_against_the_neutral_prompt():
    from ml.zeroshot import neutral_sigmoid_scores

    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)  # 3 classes + the neutral prompt
    scale = torch.tensor(100.0)
    scores = neutral_sigmoid_scores(images, texts, scale)
    for c in range(3):
        pair = (scale * images @ texts[[c, 3]].T).softmax(dim=-1)[:, 0]
        assert torch.allclose(scores[:, c], pair, atol=1e-6)
    # independent: dropping a class leaves the others' scores unchanged
    assert torch.allclose(neutral_sigmoid_scores(images, texts[[0, 3]], scale)[:, 0], scores[:, 0], atol=1e-6)


# -- send and fold -----------------------------------------------------------------------------------------------

async def test_send_builds_multi_label_classify_and_train_requests(tmp_path):
    from consumers.cli import build_parser
    from consumers.send import build_request
    from consumers.settings import KafkaSettings, Settings, WorkerSettings

    async def built(argv: list[str]) -> dict:
        args, extra = build_parser().parse_known_args(["send", *argv])
        args.urls = [*args.urls, *extra]
        return (await build_request(Settings(KafkaSettings(), WorkerSettings()), args))[2]

    body = await built(["classify", "--model", "siglip", "--multi-label", "--classes", "cat,dog", "https://x/a.jpg"])
    assert body["multi_label"] is True and body["classes"] == ["cat", "dog"]
    manifest = tmp_path / "tags.jsonl"
    manifest.write_text('{"url": "s3://b/1.png", "labels": ["dog", "cat"]}\n'
                        '{"url": "s3://b/2.png", "labels": [], "split": "val"}\n'
                        '{"url": "s3://b/3.png", "labels": ["car"]}\n')
    body = await built(["train", "--multi-label", "--manifest", str(manifest), "--model-name", "resnet10t",
                        "--output", "s3://b/models/m", "--multi-label-loss", "asymmetric"])
    assert body["config"]["multi_label"] is True and body["config"]["multi_label_loss"] == "asymmetric"
    assert body["dataset"]["class_names"] == ["car", "cat", "dog"] and body["config"]["num_classes"] == 3
    assert body["dataset"]["train_urls"] == [{"url": "s3://b/1.png", "labels": ["dog", "cat"]},
                                             {"url": "s3://b/3.png", "labels": ["car"]}]
    assert body["dataset"]["val_urls"] == [{"url": "s3://b/2.png", "labels": []}]
    with pytest.raises(ValueError, match="not in class_names"):  # --classes narrower than the labels: refused here
        await built(["train", "--multi-label", "--manifest", str(manifest), "--model-name", "resnet10t",
                     "--output", "s3://b/models/m", "--classes", "cat,dog"])


def test_fold_stores_several_accepted_tags_per_image(tmp_path):
    from examples.fold import Fold
    from schemas.annotation import AnnotationResult, ImageResult, ModelDescriptor, Prediction

    def part(request_id: str, tag_sets: dict[str, list[str]]) -> bytes:
        results = [ImageResult(id=image, labels=tags,
                               predictions=[Prediction(class_name=t, confidence=0.9) for t in tags])
                   for image, tags in tag_sets.items()]
        return AnnotationResult.completed_part(request_id, 0, 1, results=results, model=ModelDescriptor(
            family="custom", variant="resnet10t", weights="s3://b/m")).to_json_bytes()

    fold = Fold(tmp_path / "fold.sqlite")
    assert fold.apply("results", part("r1", {"a": ["cat", "dog"], "b": [], "c": ["car"]}))
    assert fold.apply_tags("r1") == 3
    assert fold.tags_of("a") == ["cat", "dog"] and fold.tags_of("b") == [] and fold.tags_of("c") == ["car"]
    # a later request's tag sets replace the AI tags of the images it answered, and only those
    assert fold.apply("results", part("r2", {"a": ["dog"], "b": ["cat", "car"]}))
    fold.apply_tags("r2")
    assert fold.tags_of("a") == ["dog"] and fold.tags_of("b") == ["car", "cat"] and fold.tags_of("c") == ["car"]


# -- few-shot one-vs-rest ----------------------------------------------------------------------------------------

def _tagged_embeddings(n: int, seed: int, directions: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """Unit vectors that are the sum of the directions of the tags each carries (plus noise)."""
    rng = np.random.default_rng(seed)
    present = rng.random((n, len(directions))) < 0.4
    vectors = present.astype(float) @ directions + 0.1 * rng.normal(size=(n, directions.shape[1]))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, [[CLASSES[c] for c in np.flatnonzero(row)] for row in present]


def test_one_vs_rest_heads_learn_tags_and_keep_the_zero_shot_rule_without_positives():
    from ml.fewshot import MissingExamplesError
    from ml.fewshot_multilabel import fit_one_vs_rest

    directions = np.linalg.qr(np.random.default_rng(0).normal(size=(32, 3)))[0].T  # 3 orthonormal directions
    support, labels = _tagged_embeddings(60, 1, directions)
    labels = [[t for t in tags if t != "car"] for tags in labels]  # no example of "car"
    zero_shot = 0.3 * np.random.default_rng(2).normal(size=(60, 3))  # a weak, uninformative zero-shot rule
    head = fit_one_vs_rest(support, labels, CLASSES, zero_shot)
    assert head.positives.keys() == {"cat", "dog"} and not head.fitted[2]
    queries, truth = _tagged_embeddings(200, 3, directions)
    query_zero_shot = 0.3 * np.random.default_rng(4).normal(size=(200, 3))
    probabilities = head.probabilities(queries, query_zero_shot)
    assert np.allclose(probabilities[:, 2], 1 / (1 + np.exp(-query_zero_shot[:, 2])))  # "car": its zero-shot rule
    for c in (0, 1):
        has = np.array([CLASSES[c] in tags for tags in truth])
        assert average_precision_score(has, probabilities[:, c]) > 0.9
    with pytest.raises(MissingExamplesError, match="car"):
        fit_one_vs_rest(support, labels, CLASSES, None)


def test_multi_label_augmentation_keeps_the_whole_image_in_view():
    """A tag can sit at the border of an image: multi-label runs resize the whole image (no crop, at train and at
    eval, recorded in the package's data config) and leave out what moves or erases content."""
    import timm
    from PIL import Image

    from ml.training.augment import GEOMETRIC_RAND_AUGMENT_OPS, eval_transform, resolve_data_config, train_transform

    model = timm.create_model("test_resnet", num_classes=2)
    image = Image.new("RGB", (48, 24), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 6, 24))  # a tagged object along the left edge of a wide image
    def red_columns(pixels: torch.Tensor) -> torch.Tensor:
        return (pixels[0] > pixels[1] + 1.0).any(dim=0)  # normalised: red (1, -1, -1), white (1, 1, 1)

    single = eval_transform(resolve_data_config(model, 32, "light"))(image)
    assert not red_columns(single).any()  # the single-label centre crop cuts the object away
    cfg = resolve_data_config(model, 32, "light", multi_label=True)
    assert (cfg.crop_pct, cfg.crop_mode) == (1.0, "squash")
    whole = eval_transform(cfg)(image)
    red = red_columns(whole)
    assert whole.shape == (3, 32, 32) and red[:3].all() and not red[8:].any()
    torch.manual_seed(0)
    views = [train_transform(cfg, "light", multi_label=True)(image) for _ in range(12)]
    assert all(torch.equal(v, whole) or torch.equal(v, whole.flip(-1)) for v in views)  # resize and flip only
    assert any(torch.equal(v, whole.flip(-1)) for v in views)
    for preset in ("medium", "heavy"):
        described = repr(train_transform(resolve_data_config(model, 32, preset, True), preset, multi_label=True))
        assert "RandAugment" in described and "name=Equalize" in described  # the photometric operations stay
        assert not any(name in described for name in ("RandomResized", "RandomErasing", "Crop"))
        assert not any(f"name={op}," in described for op in GEOMETRIC_RAND_AUGMENT_OPS), described

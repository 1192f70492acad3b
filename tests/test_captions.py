"""Caption store (datasets/captions.py), caption tool (tools/captions.py) and toy models, offline on CPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.captions import (
    DEFAULT_CAPTIONER,
    DEFAULT_ENCODER,
    TOY_CAPTIONER,
    TOY_ENCODER,
    CaptionLogWriter,
    CaptionModelNotFoundError,
    CaptionStoreError,
    CaptionStoreMismatchError,
    MissingCaptionsError,
    load_caption_features,
    model_slug,
    read_caption_features,
    read_caption_log,
    shard_log_paths,
    store_paths,
    to_relpath,
    write_caption_features,
)
from datasets.catalog import resolve_dataset
from datasets.splits import protocol_relpaths
from tools import captions as tool
from tools.toy_captioner import toy_model_dir

TOY = ["--captioner", TOY_CAPTIONER, "--encoder", TOY_ENCODER, "--device", "cpu", "--workers", "0"]


class Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module", autouse=True)
def toy_cache(tmp_path_factory):
    """Build the toy models once per module, in a temporary cache; one thread (tiny models, shared CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIMORS_CACHE", str(tmp_path_factory.mktemp("bimors-cache")))
        yield
    torch.set_num_threads(threads)


def make_dataset(root: Path, classes: int = 3, per_class: int = 6, size: int = 40) -> str:
    """A generic yaml-only dataset with random images; returns the yaml path (the DATASET argument)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "Fake" / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.png")
    yaml = root / "fake.yaml"
    yaml.write_text('DATASET:\n  NAME: "ImageFolderRS"\n  FOLDER: "Fake"\n')
    return str(yaml)


def run_tool(root: Path, dataset: str, *extra: str):
    return tool.run(tool.build_parser().parse_args([dataset, "--root", str(root), *TOY, *extra]))


def store_of(root: Path):
    log_path, features_path = store_paths(root / "Fake", TOY_CAPTIONER, TOY_ENCODER)
    return read_caption_log(log_path), read_caption_features(features_path)


def forbid(monkeypatch, name: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} must not be called")

    monkeypatch.setattr(tool, name, fail)


# ------------------------------------------------------------------------------------- store API
def test_slugs_and_store_paths(tmp_path, monkeypatch):
    assert model_slug(DEFAULT_CAPTIONER) == "Salesforce--blip2-flan-t5-xl"
    log, vectors = store_paths(tmp_path, DEFAULT_CAPTIONER, DEFAULT_ENCODER)
    assert log == tmp_path / "captions" / "Salesforce--blip2-flan-t5-xl.jsonl"
    assert vectors == tmp_path / "captions" / "Salesforce--blip2-flan-t5-xl__bert-base-uncased.safetensors"
    folder = tmp_path / "models" / "my blip2:v1"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_slug(str(folder)) == model_slug("./models/my blip2:v1") == "my_blip2_v1"
    assert model_slug(str(folder) + "/") == "my_blip2_v1"
    assert model_slug(TOY_CAPTIONER) == "toy-blip2"
    assert to_relpath(tmp_path / "images" / "a" / "b.jpg", tmp_path / "images") == "a/b.jpg"
    with pytest.raises(ValueError, match="not under"):
        to_relpath(tmp_path / "elsewhere.jpg", tmp_path / "images")


def _settings(captioner=TOY_CAPTIONER, encoder=TOY_ENCODER):
    return tool.vector_settings(tool.caption_settings(captioner), encoder)


def test_feature_store_round_trip_and_missing_rows(tmp_path):
    dataset_dir = tmp_path / "Fake"
    _, path = store_paths(dataset_dir, TOY_CAPTIONER, TOY_ENCODER)
    features = torch.randn(3, 5)
    relpaths = ["b/1.png", "a/2.png", "c/3.png"]
    write_caption_features(path, features, relpaths, _settings(), {"torch": "x"})
    assert not list(path.parent.glob(".*tmp*")), "the temporary file must be renamed away"

    store = load_caption_features(dataset_dir, TOY_CAPTIONER, TOY_ENCODER, dataset="fake")
    assert store.dim == 5 and store.relpaths == relpaths and store.features.dtype == torch.float32
    assert torch.equal(store.features, features)
    assert store.metadata["generation"] == tool.GENERATION_KWARGS and store.metadata["info"] == {"torch": "x"}
    idx = store.index(["c/3.png", "b/1.png", "c/3.png"])
    assert idx.dtype == torch.long and idx.tolist() == [2, 0, 2]

    with pytest.raises(MissingCaptionsError) as err:
        store.index(["a/2.png", "x/9.png", "y/8.png"])
    message = str(err.value)
    assert "2 of 3 images" in message and "x/9.png" in message and "y/8.png" in message
    assert f"python -m tools.captions fake --root {tmp_path} --captioner toy-blip2 --encoder toy-bert" in message
    assert isinstance(err.value, ValueError)


def test_missing_and_mismatched_store_are_refused(tmp_path):
    dataset_dir = tmp_path / "Fake"
    with pytest.raises(MissingCaptionsError, match=r"python -m tools\.captions Fake --root .* --subset all"):
        load_caption_features(dataset_dir)
    _, path = store_paths(dataset_dir, TOY_CAPTIONER, TOY_ENCODER)
    write_caption_features(path, torch.zeros(1, 4), ["a/1.png"], _settings(encoder="other-org/other-bert"))
    with pytest.raises(CaptionStoreMismatchError, match="other-org/other-bert"):
        load_caption_features(dataset_dir, TOY_CAPTIONER, TOY_ENCODER)


def test_caption_log_torn_last_line_and_damage(tmp_path):
    path = tmp_path / "captions" / "x.jsonl"
    settings = tool.caption_settings(TOY_CAPTIONER)
    with CaptionLogWriter(path, settings) as writer:
        writer.write([])
    assert not path.exists(), "nothing is written before the first record"
    with CaptionLogWriter(path, settings) as writer:
        writer.write([{"path": "a.png", "caption": "a river"}, {"path": "b.png", "caption": ""}])
        writer.write([{"path": "c.png", "error": "OSError: broken"}])
    with open(path, "ab") as fh:
        fh.write(b'{"path": "d.png", "capt')  # killed while writing
    log = read_caption_log(path)
    assert log.captions == {"a.png": "a river", "b.png": ""} and log.failures == {"c.png": "OSError: broken"}

    with CaptionLogWriter(path, settings) as writer:  # the torn tail is cut before appending
        writer.write([{"path": "c.png", "caption": "fixed"}, {"path": "d.png", "caption": "a road"}])
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 6
    log = read_caption_log(path)
    assert log.captions["c.png"] == "fixed" and log.captions["d.png"] == "a road" and not log.failures

    with pytest.raises(CaptionStoreMismatchError, match="dtype"):
        CaptionLogWriter(path, tool.caption_settings(TOY_CAPTIONER, "bfloat16"))
    path.write_text(path.read_text().replace('"a road"}', '"a road"', 1))
    with pytest.raises(CaptionStoreError, match="line 6"):
        read_caption_log(path)


# ------------------------------------------------------------------------------------- models
def test_toy_models_are_deterministic_and_load_through_from_pretrained(tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    first = toy_model_dir(TOY_ENCODER, tmp_path / "one")
    second = toy_model_dir(TOY_ENCODER, tmp_path / "two")
    encoder_a, encoder_b = tool.load_encoder(str(first)), tool.load_encoder(str(second))
    for (name, a), b in zip(encoder_a.model.state_dict().items(), encoder_b.model.state_dict().values()):
        assert torch.equal(a, b), name
    folder = toy_model_dir(TOY_CAPTIONER)
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    processor = Blip2Processor.from_pretrained(folder)
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    captioner = tool.load_captioner(str(folder))  # a local folder, through the same code path as a hub id
    images = [torch.rand(3, 224, 224) for _ in range(2)]
    texts = captioner.caption(images)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert captioner.caption(images) == texts


def test_encoding_is_masked_mean_and_accepts_empty_captions():
    encoder = tool.load_encoder(TOY_ENCODER)
    captions = ["", "aerial view of a river near a bridge", "forest"]
    batched = encoder.encode(captions)
    assert batched.shape == (3, encoder.dim) and torch.isfinite(batched).all()
    for i, caption in enumerate(captions):  # padding in the batch changes nothing
        torch.testing.assert_close(batched[i], encoder.encode([caption])[0], atol=1e-5, rtol=1e-5)
    ids = encoder.tokenizer("", return_tensors="pt")
    assert ids["input_ids"].shape[1] == 2  # [CLS] [SEP]: both are averaged
    with torch.no_grad():
        hidden = encoder.model(**ids).last_hidden_state[0]
    torch.testing.assert_close(batched[0], hidden.mean(0), atol=1e-5, rtol=1e-5)


def test_unknown_captioner_offline_lists_what_was_tried(tmp_path):
    with pytest.raises(CaptionModelNotFoundError) as err:
        tool.load_captioner("no-such-org/no-such-blip2")
    message = str(err.value)
    assert "toy-blip2" in message and "local folder" in message and "no-such-org/no-such-blip2" in message
    assert "HF_HUB_OFFLINE" in message and "--captioner /path/to/model" in message
    with pytest.raises(CaptionModelNotFoundError, match="does not exist"):
        tool.load_encoder(str(tmp_path / "missing-bert"))


def test_load_image_resizes_and_minmax_normalises(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(50, 101, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    image = tool.load_image(tmp_path / "x.png")
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert image.min().item() == 0.0 and image.max().item() == pytest.approx(1.0)
    Image.new("L", (16, 16), 7).save(tmp_path / "flat.png")  # grey, constant: no division by zero
    flat = tool.load_image(tmp_path / "flat.png")
    assert flat.shape == (3, 224, 224) and torch.equal(flat, torch.zeros_like(flat))


# ------------------------------------------------------------------------------------- the tool
def test_tool_captions_encodes_and_reruns_for_free(tmp_path, monkeypatch, capsys):
    dataset = make_dataset(tmp_path)
    store = run_tool(tmp_path, dataset, "--subset", "all", "--batch-size", "4")
    log, vectors = store_of(tmp_path)
    assert len(log.captions) == 18 and not log.failures
    assert vectors.relpaths == sorted(log.captions) and vectors.features.shape == (18, 32)
    assert store.relpaths == vectors.relpaths
    assert vectors.metadata["captioner"] == TOY_CAPTIONER and vectors.metadata["encoder"] == TOY_ENCODER
    assert vectors.metadata["generation"] == {"max_length": 16, "num_beams": 4, "early_stopping": True}
    assert vectors.metadata["preprocessing"]["processor_rescale"] is False
    assert log.settings == tool.caption_settings(TOY_CAPTIONER)

    encoder = tool.load_encoder(TOY_ENCODER)
    some = vectors.relpaths[:3]
    expected = encoder.encode([log.captions[p] for p in some])
    torch.testing.assert_close(vectors.features[vectors.index(some)], expected, atol=1e-5, rtol=1e-5)

    forbid(monkeypatch, "load_captioner")
    forbid(monkeypatch, "load_encoder")
    before = (tmp_path / "Fake" / "captions" / "toy-blip2.jsonl").read_bytes()
    assert tool.main([dataset, "--root", str(tmp_path), *TOY, "--subset", "all"]) == 0
    assert (tmp_path / "Fake" / "captions" / "toy-blip2.jsonl").read_bytes() == before

    capsys.readouterr()
    assert tool.main([dataset, "--root", str(tmp_path), *TOY, "--subset", "all", "--show", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "18 of 18 images" in lines[0] and "18 caption vectors" in lines[0]
    assert len(lines) == 4 and all(line.split("\t")[1] == log.captions[line.split("\t")[0]] for line in lines[1:])


def test_protocol_subset_captions_only_protocol_images(tmp_path):
    dataset = make_dataset(tmp_path)
    run_tool(tmp_path, dataset, "--subset", "protocol", "--shots", "1", "--seeds", "1", "2")
    log, vectors = store_of(tmp_path)
    expected = protocol_relpaths(resolve_dataset(dataset, tmp_path), shots=1, seeds=(1, 2))
    assert sorted(log.captions) == sorted(expected) == vectors.relpaths
    assert len(expected) < 18


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, monkeypatch):
    full_root, killed_root = tmp_path / "full", tmp_path / "killed"
    full, killed = make_dataset(full_root), make_dataset(killed_root)
    run_tool(full_root, full, "--subset", "all", "--batch-size", "2")

    real_caption = tool.Captioner.caption
    seen: list[int] = []

    def caption_then_die(self, images):
        if sum(seen) >= 4:
            raise Killed
        seen.append(len(images))
        return real_caption(self, images)

    monkeypatch.setattr(tool.Captioner, "caption", caption_then_die)
    with pytest.raises(Killed):
        run_tool(killed_root, killed, "--subset", "all", "--batch-size", "2")
    log_path, features_path = store_paths(killed_root / "Fake", TOY_CAPTIONER, TOY_ENCODER)
    assert len(read_caption_log(log_path).captions) == 4 and not features_path.exists()
    with open(log_path, "ab") as fh:
        fh.write(b'{"path": "class2/img5.png", "caption": "half wr')

    seen.clear()
    monkeypatch.setattr(tool.Captioner, "caption", lambda self, images: seen.append(len(images)) or
                        real_caption(self, images))
    run_tool(killed_root, killed, "--subset", "all", "--batch-size", "2")
    assert sum(seen) == 14, "only the images without a caption are captioned again"

    (full_log, full_vec), (resumed_log, resumed_vec) = store_of(full_root), store_of(killed_root)
    assert resumed_log.captions == full_log.captions and not resumed_log.failures
    assert resumed_vec.relpaths == full_vec.relpaths
    torch.testing.assert_close(resumed_vec.features, full_vec.features, atol=1e-5, rtol=1e-5)
    assert all(json.loads(line) for line in log_path.read_text().splitlines())


def test_corrupt_image_is_reported_not_fatal(tmp_path, caplog):
    dataset = make_dataset(tmp_path)
    (tmp_path / "Fake" / "images" / "class1" / "broken.png").write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING):
        assert tool.main([dataset, "--root", str(tmp_path), *TOY, "--subset", "all"]) == 0
    assert "1 images could not be read" in caplog.text and "class1/broken.png" in caplog.text
    log, vectors = store_of(tmp_path)
    assert list(log.failures) == ["class1/broken.png"] and len(log.captions) == 18
    assert "class1/broken.png" not in vectors
    store = load_caption_features(tmp_path / "Fake", TOY_CAPTIONER, TOY_ENCODER)
    with pytest.raises(MissingCaptionsError, match="could not be read"):
        store.index(["class0/img0.png", "class1/broken.png"])

    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "Fake" / "images" / "class1" / "broken.png")
    run_tool(tmp_path, dataset, "--subset", "all")  # fixed image: captioned on the next run
    log, vectors = store_of(tmp_path)
    assert not log.failures and "class1/broken.png" in vectors and len(vectors) == 19


def test_store_made_with_other_settings_is_refused(tmp_path, monkeypatch, caplog):
    dataset = make_dataset(tmp_path, classes=2, per_class=3)
    run_tool(tmp_path, dataset, "--subset", "all")
    forbid(monkeypatch, "load_captioner")
    with pytest.raises(CaptionStoreMismatchError, match="dtype: store has 'float32', asked for 'bfloat16'"):
        run_tool(tmp_path, dataset, "--subset", "all", "--dtype", "bfloat16")
    monkeypatch.setattr(tool, "GENERATION_KWARGS", {**tool.GENERATION_KWARGS, "num_beams": 1})
    with caplog.at_level(logging.ERROR):
        assert tool.main([dataset, "--root", str(tmp_path), *TOY, "--subset", "all"]) == 1
    assert "refusing to mix" in caplog.text and "num_beams" in caplog.text


def test_shards_merge_into_one_store(tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path)
    assert run_tool(tmp_path, dataset, "--subset", "all", "--shard", "0/2") is None
    assert run_tool(tmp_path, dataset, "--subset", "all", "--shard", "1/2") is None
    log_path, features_path = store_paths(tmp_path / "Fake", TOY_CAPTIONER, TOY_ENCODER)
    shards = shard_log_paths(log_path)
    assert len(shards) == 2 and not log_path.exists() and not features_path.exists()
    sizes = [len(read_caption_log(s).captions) for s in shards]
    assert sizes == [9, 9]

    with tool.file_lock(tool.lock_path(shards[0])), pytest.raises(CaptionStoreError, match="still being written"):
        run_tool(tmp_path, dataset, "--subset", "all")

    forbid(monkeypatch, "load_captioner")
    store = run_tool(tmp_path, dataset, "--subset", "all")
    assert not shard_log_paths(log_path) and len(store) == 18
    assert read_caption_log(log_path).captions.keys() == set(store.relpaths)


def test_bad_shard_argument():
    with pytest.raises(SystemExit):
        tool.build_parser().parse_args(["x", "--root", "r", "--shard", "2/2"])
    assert tool.parse_shard("1/4") == (1, 4)

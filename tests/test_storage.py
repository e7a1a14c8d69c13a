"""The storage layer against a real S3-compatible server on 127.0.0.1 and the local filesystem: whole-folder
publishing that a crash cannot leave half-done, the per-node download cache, and models loaded from a URI."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_zephyr import storage
from ray_zephyr.errors import UserError


def _folder(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        (tmp_path / name / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name / relative).write_text(text)
    return tmp_path / name


class Crash(Exception):
    pass


def _crash():
    raise Crash


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_crash_mid_publish_leaves_nothing_a_job_would_load(where, tmp_path, request):
    dest = storage.join(request.getfixturevalue("s3") if where == "s3" else str(tmp_path / "out"), "model")
    first = _folder(tmp_path, "v1", {"config.json": "{}", "model.safetensors": "v1", "sub/tok.json": "t1"})
    storage.publish_dir(first, dest)
    assert storage.read_text(storage.join(dest, "model.safetensors")) == "v1"

    second = _folder(tmp_path, "v2", {"config.json": "{}", "model.safetensors": "v2", "z-last.json": "last"})
    with pytest.raises(Crash):
        storage.publish_dir(second, dest, before_last_file=_crash)
    if where == "local":  # the old folder is untouched: the new one was never renamed into place
        assert storage.read_text(storage.join(dest, "model.safetensors")) == "v1"
    else:  # an object store cannot rename: the folder says it is incomplete, and readers refuse it
        with pytest.raises(UserError, match="is incomplete: a save into it was interrupted"):
            storage.local_copy(dest)

    storage.publish_dir(second, dest)
    assert sorted(storage.listing(dest)) == ["config.json", "model.safetensors", "z-last.json"]  # stale sub/ gone
    copy = Path(storage.local_copy(dest))
    assert (copy / "model.safetensors").read_text() == "v2"


def test_local_copy_downloads_once_per_node_and_again_when_the_folder_changes(s3, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    dest = storage.join(s3, "model")
    storage.publish_dir(_folder(tmp_path, "a", {"w.bin": "one"}), dest)
    copy = Path(storage.local_copy(dest))
    assert copy.is_relative_to(tmp_path / "cache") and (copy / "w.bin").read_text() == "one"
    (copy / "w.bin").write_text("touched locally")  # a second call with the same remote listing reuses the copy
    assert (Path(storage.local_copy(dest)) / "w.bin").read_text() == "touched locally"
    storage.publish_dir(_folder(tmp_path, "b", {"w.bin": "two!"}), dest)
    assert (Path(storage.local_copy(dest)) / "w.bin").read_text() == "two!"
    with pytest.raises(UserError, match="does not exist or is empty"):
        storage.local_copy(storage.join(s3, "nothing-here"))


def test_a_model_and_its_tokenizer_load_from_a_uri(s3, embedded_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ray_zephyr.config import load_recipe
    from ray_zephyr.models import load_tokenizer

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    uri = storage.join(s3, "sft", "model")
    storage.publish_dir(embedded_model_dir, uri)
    recipe = load_recipe("tiny-dpo", [f"model.name_or_path={uri}", f"train.output_dir={s3}/dpo"])
    assert "<|assistant|>" in load_tokenizer(recipe).chat_template
    from ray_zephyr.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(uri))
    expected = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    assert all((model.state_dict()[k] == v).all() for k, v in expected.state_dict().items())


def test_unknown_scheme_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"cannot open storage 'nosuch://bucket/x'"):
        storage.listing("nosuch://bucket/x")


def test_serving_loads_a_model_from_a_uri(s3, embedded_model_dir, tmp_path, monkeypatch):
    from ray_zephyr.serving.engines import load_engine
    from ray_zephyr.serving.settings import ServeSettings

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    uri = storage.join(s3, "dpo", "model")
    storage.publish_dir(embedded_model_dir, uri)
    settings = ServeSettings(model=uri, engine="transformers", num_gpus=0)
    assert settings.served_name() == "dpo"
    engine = load_engine(settings)
    assert engine.context_length > 0 and "<|assistant|>" in engine.tokenizer.chat_template

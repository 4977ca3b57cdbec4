"""HF LLaVA <-> safevlm_jax checkpoints: bit-exact round trips, transformers loads our export,
and every kind of bad input fails before anything is written, naming the key or file."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from checkpoints_tools import import_hf as import_hf_module
from checkpoints_tools.export_hf import export_hf
from checkpoints_tools.import_hf import import_hf
from safevlm_jax.checkpoint.format import load_checkpoint
from tests.hf_llava import TINY_SAFETY, read_all, rename_keys, save_tiny_llava

PUBLISHED = lambda k: re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k)  # noqa: E731
IN_MEMORY = lambda k: (re.sub(r"^language_model\.lm_head\.", "lm_head.",  # noqa: E731
                              re.sub(r"^language_model\.model\.", "model.language_model.",
                                     re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", k))))


@pytest.mark.parametrize("dtype,tie,kv_heads,shard,source_style,export_style", [
    (torch.float32, False, 2, "100KB", None, "transformers5"),  # sharded, GQA, as saved by 5.x
    (torch.bfloat16, True, 4, "50GB", PUBLISHED, "published"),  # tied, llava-hf names
    (torch.float32, False, 2, "50GB", IN_MEMORY, "published"),  # transformers 5 in-memory names
])
def test_hf_to_jax_to_hf_is_bit_exact(tmp_path, dtype, tie, kv_heads, shard, source_style, export_style):
    src = str(tmp_path / "hf")
    save_tiny_llava(src, dtype, tie, kv_heads, shard)
    if source_style is not None:
        rename_keys(src, source_style)
    if shard != "50GB":
        assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 2
    config = import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)
    assert config.param_dtype == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), key_style=export_style,
              max_shard_size=shard)
    before, after = read_all(src), read_all(str(tmp_path / "out"))
    if source_style is IN_MEMORY:
        before = {PUBLISHED(re.sub(r"^model\.language_model\.", "language_model.model.",
                                   re.sub(r"^model\.", "", k)).replace("lm_head.", "language_model.lm_head.")
                            if k.startswith("lm_head.") else
                            re.sub(r"^model\.language_model\.", "language_model.model.", re.sub(r"^model\.(?!language_model)", "", k))): v
                  for k, v in before.items()}
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and after[key].shape == value.shape, key
        assert after[key].tobytes() == value.tobytes(), key


def test_import_with_dtype_converts_every_tensor(tmp_path):
    save_tiny_llava(str(tmp_path / "hf"))
    config = import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), dtype="bfloat16", safety=TINY_SAFETY)
    _, model = load_checkpoint(str(tmp_path / "ckpt"))
    assert config.param_dtype == "bfloat16"
    assert model.language_model.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert model.safety_tokens_llm[...].dtype == jnp.bfloat16


def _inputs(config, batch=2, text=5):
    rng = np.random.default_rng(0)
    n = config.num_image_features
    ids = rng.integers(1, 400, (batch, text + n))
    ids[:, 1:1 + n] = config.image_token_index
    pixels = rng.normal(size=(batch, 3, 28, 28)).astype(np.float32)
    return ids, pixels, np.ones_like(ids)


def test_export_loads_in_transformers_with_our_logits(tmp_path):
    save_tiny_llava(str(tmp_path / "hf"), tie=True)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), safety=TINY_SAFETY)
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    config, model = load_checkpoint(str(tmp_path / "ckpt"), scan_layers=True)
    ids, pixels, mask = _inputs(config)
    ours = model(jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask),
                 use_safety=False).logits
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(
        str(tmp_path / "out"), local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                          attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def _single_file(tmp_path):
    src = str(tmp_path / "hf")
    save_tiny_llava(src)
    return src, os.path.join(src, "model.safetensors")


def _edit(path, fn):
    from safetensors.numpy import save_file

    from tests.hf_llava import read_all_file

    save_file(fn(read_all_file(path)), path, metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_listed_by_name(tmp_path):
    src, path = _single_file(tmp_path)
    _edit(path, lambda t: {**{k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k},
                           "language_model.model.extra_thing.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight.*extra_thing"):
        import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)
    assert not os.path.exists(tmp_path / "ckpt")


def test_shape_mismatch_names_key_file_expected_and_got(tmp_path):
    src, path = _single_file(tmp_path)
    _edit(path, lambda t: {**t, "multi_modal_projector.linear_2.bias": np.zeros(65, np.float32)})
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_2\.bias \(model\.safetensors\): "
                                         r"expected \(64,\), got \(65,\)"):
        import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    src, _ = _single_file(tmp_path)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"]["intermediate_size"] = 96
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"does not match its config\.json.*gate_proj\.weight.*expected \(96, 64\), got \(128, 64\)"):
        import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)


def test_mixed_dtypes_need_an_explicit_dtype(tmp_path):
    src, path = _single_file(tmp_path)
    _edit(path, lambda t: {**t, "multi_modal_projector.linear_1.bias":
                           t["multi_modal_projector.linear_1.bias"].astype(np.float16)})
    with pytest.raises(ValueError, match=r"dtypes .*F16.*multi_modal_projector\.linear_1\.bias.*--dtype"):
        import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)
    import_hf(src, str(tmp_path / "ckpt"), dtype="float32", safety=TINY_SAFETY)


def test_truncated_safetensors_names_the_file(tmp_path):
    src, path = _single_file(tmp_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)


def test_missing_index_shard_names_the_shard(tmp_path):
    src = str(tmp_path / "hf")
    save_tiny_llava(src, max_shard_size="100KB")
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        second = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(src, second))
    with pytest.raises(FileNotFoundError, match=rf"missing .*{re.escape(second)}"):
        import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)


def test_existing_output_is_refused_without_overwrite(tmp_path):
    src, _ = _single_file(tmp_path)
    os.makedirs(tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)
    import_hf(src, str(tmp_path / "ckpt"), overwrite=True, safety=TINY_SAFETY)
    assert os.path.isfile(tmp_path / "ckpt" / "config.json")


def test_crash_mid_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    src, _ = _single_file(tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the LLaVA weights were written")

    monkeypatch.setattr(import_hf_module, "init_safety", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        import_hf(src, str(tmp_path / "ckpt"), safety=TINY_SAFETY)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_cli_refuses_existing_output(tmp_path):
    os.makedirs(tmp_path / "ckpt")
    src, _ = _single_file(tmp_path)
    run = subprocess.run([sys.executable, "-m", "checkpoints_tools.import_hf", f"--hf_dir={src}",
                          f"--out={tmp_path / 'ckpt'}"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode != 0 and "already exists" in run.stderr


def test_shard_writer_streams_files_safetensors_reads_back_exactly(tmp_path, monkeypatch):
    """Each tensor goes to disk as it is added (header space reserved, padded when the file
    ends): files split at the size limit and when the header fills, every dtype and an empty
    tensor read back bit for bit, by safetensors itself and by our reader."""
    import ml_dtypes
    from safetensors.numpy import load_file

    from checkpoints_tools import safetensors_io
    from checkpoints_tools.safetensors_io import SafetensorsDir, ShardWriter

    monkeypatch.setattr(safetensors_io, "HEADER_RESERVE", 1024)  # ~10 entries per file
    rng = np.random.default_rng(0)
    dtypes = [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.uint8]
    tensors = {f"t.{i}": (rng.standard_normal((40, 7 + i)) * 100).astype(dtypes[i % 5]) for i in range(24)}
    tensors["empty"] = np.zeros((0, 3), np.float32)
    writer = ShardWriter(str(tmp_path), "4KB")
    for key, value in tensors.items():
        writer.add(key, value)
    with pytest.raises(ValueError, match="t.0 written twice"):
        writer.add("t.0", tensors["t.0"])
    files = writer.close()
    assert len(files) > 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(tensors) and set(index.values()) == set(files)
    ours, theirs = SafetensorsDir(str(tmp_path)), {}
    for f in files:
        theirs.update(load_file(str(tmp_path / f)))
        assert os.path.getsize(tmp_path / f) <= 8 + 1024 + 4096 + 40 * 31 * 8  # one big tensor may pass
    for key, value in tensors.items():
        for got in (theirs[key], ours.tensor(key)):
            assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes()

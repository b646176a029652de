"""`pretrain export`: what transformers and ONNX Runtime load gives our outputs, and what a
format cannot express is refused before anything is written."""
from __future__ import annotations

import json

import onnxruntime
import pytest
import torch
import transformers

from run_helpers import REPO, run_cli

TEXT = 'def greet(name):\n    """Say hello."""\n    return f"hello {name}"\n'


@pytest.fixture(scope="module")
def gpt_run(text_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpt") / "run"
    run_cli(["fit", "--config", str(REPO / "configs/experiments/gpt-tiny.yaml"), f"data.train={text_corpus['train']}",
             f"data.val={text_corpus['val']}", f"data.tokenizer={text_corpus['tokenizer']}", "data.seq_len=32",
             "data.batch_size=8", "data.num_workers=0", "model.dim=32", "model.depth=2", "model.heads=2",
             "trainer.devices=1", "trainer.max_steps=30", "trainer.val_every_steps=30", "trainer.val_batches=2",
             "trainer.checkpoint_every_steps=30", "trainer.log_every_steps=10", "logging.wandb=disabled",
             f"run.dir={run_dir}"])
    return run_dir


def ours(run_dir):
    from framework.export.export import read_objective

    return read_objective(run_dir)[0]


def greedy(model, prompt, steps):
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, model.logits(model(tokens))[:, -1:].argmax(-1)], dim=1)
    return tokens


def test_causal_lm_exports_to_gpt_neox_with_equal_logits_generation_loss_and_tokens(gpt_run, tmp_path, text_corpus):
    from framework.text.tokenizer import load_tokenizer

    out = tmp_path / "hf"
    printed = run_cli(["export", "--checkpoint", str(gpt_run), "--format", "hf", "--output", str(out)])
    assert "AutoModelForCausalLM.from_pretrained" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["tie_word_embeddings"] is True
    objective = ours(gpt_run)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()  # no trust_remote_code
    assert config["vocab_size"] == objective.model.vocab_size and config["max_position_embeddings"] == objective.cfg.model.max_seq_len

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    mine = load_tokenizer(text_corpus["tokenizer"])
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == mine.encode(TEXT).ids and tokenizer.decode(ids) == TEXT
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.mask_token) == ("<|endoftext|>", "<|pad|>", "<|mask|>")
    assert tokenizer.eos_token_id == model.config.eos_token_id

    batch = torch.tensor([ids[:24], ids[4:28]])
    with torch.no_grad():
        expected = objective.model.logits(objective.model(batch))
        theirs = model(batch, labels=batch)
    torch.testing.assert_close(theirs.logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    from framework.losses.language import next_token_loss

    torch.testing.assert_close(theirs.loss, next_token_loss(expected, batch), rtol=1e-5, atol=1e-6)

    prompt = batch[:1, :6]
    want = greedy(objective.model, prompt, 32)[0].tolist()
    got = model.generate(prompt, max_new_tokens=32, do_sample=False)[0].tolist()
    assert got == want[: len(got)] and (len(got) == len(want) or got[-1] == tokenizer.eos_token_id)
    assert len(got) > 6 + 8, "at least a few greedy steps were compared"
    card = (out / "README.md").read_text()
    assert "objective: `clm`" in card and "AutoModelForCausalLM.from_pretrained" in card and "train/loss" in card


def test_onnx_runtime_gives_our_logits_at_other_batch_sizes_and_lengths(gpt_run, tmp_path):
    out = tmp_path / "onnx"
    run_cli(["export", "--checkpoint", str(gpt_run), "--format", "onnx", "--output", str(out)])
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    objective = ours(gpt_run)
    for batch, length in ((1, 7), (4, 20)):
        tokens = torch.randint(0, objective.model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = objective.model.logits(objective.model(tokens))
        got = torch.from_numpy(session.run(None, {"input_ids": tokens.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_safetensors_export_keeps_transformers_metadata_and_every_weight(gpt_run, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "weights"
    run_cli(["export", "--checkpoint", str(gpt_run), "--format", "safetensors", "--output", str(out)])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        keys = set(f.keys())
        weight = f.get_tensor("model.embed.weight")
    objective = ours(gpt_run)
    assert keys == set(objective.state_dict()) and torch.equal(weight, objective.state_dict()["model.embed.weight"])


def _crafted_checkpoint(path, text_corpus, **model):
    """A Lightning-format checkpoint of a tiny objective built in this process."""
    from framework.config.load import config_to_dict, load_config
    from framework.objectives import objective_module
    from framework.objectives.text_common import tokenizer_facts

    objective_name = model.pop("objective", "clm")
    config = "bert-tiny" if objective_name == "mlm" else "gpt-tiny"
    cfg = load_config(str(REPO / f"configs/experiments/{config}.yaml"), [
        f"data.tokenizer={text_corpus['tokenizer']}", f"data.train={text_corpus['train']}", "model.dim=16", "model.depth=1",
        "model.heads=2", *(f"model.{k}={v}" for k, v in model.items())])
    vocab, special = tokenizer_facts(cfg)
    torch.manual_seed(0)
    objective = objective_module(cfg.objective.name).Objective(config_to_dict(cfg), vocab, special)
    with torch.no_grad():  # weights far from init, so greedy choices are clear-cut
        for parameter in objective.parameters():
            parameter.normal_(0, 0.5)
    torch.save({"state_dict": objective.state_dict(), "hyper_parameters": dict(objective.hparams)}, path)
    return path


def test_configs_a_format_cannot_express_are_refused_naming_the_key(tmp_path, text_corpus):
    learned = _crafted_checkpoint(tmp_path / "learned.ckpt", text_corpus, position="learned")
    out = tmp_path / "out"
    from framework.errors import ConfigError
    from framework.export.export import export

    with pytest.raises(ConfigError, match="model.position=learned"):
        export(learned, "hf", out)
    assert not out.exists() and not list(tmp_path.glob(".tmp-export-*")), "nothing is left behind"
    export(learned, "onnx", out)  # the same model goes to ONNX
    assert (out / "model.onnx").is_file()
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export(learned, "onnx", out)
    with pytest.raises(ConfigError, match="--format must be one of"):
        export(learned, "tflite", tmp_path / "x")


def test_llama_layout_exports_to_llama_for_causal_lm(tmp_path, text_corpus):
    from framework.export.export import export, read_objective

    checkpoint = _crafted_checkpoint(tmp_path / "llama.ckpt", text_corpus, norm="rmsnorm", mlp="swiglu", mlp_ratio=2.5)
    export(checkpoint, "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["intermediate_size"] == 40
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    objective = read_objective(checkpoint)[0]
    tokens = torch.randint(0, objective.model.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = objective.model.logits(objective.model(tokens))
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    want = greedy(objective.model, tokens[:1, :5], 32)[0].tolist()
    got = model.generate(tokens[:1, :5], max_new_tokens=32, do_sample=False)[0].tolist()
    assert got == want[: len(got)] and len(got) > 5 + 8


def test_a_mixed_layout_is_refused_naming_both_keys(tmp_path, text_corpus):
    from framework.errors import ConfigError
    from framework.export.export import export

    checkpoint = _crafted_checkpoint(tmp_path / "mixed.ckpt", text_corpus, norm="rmsnorm", mlp="gelu")
    with pytest.raises(ConfigError, match="model.norm=rmsnorm with model.mlp=gelu"):
        export(checkpoint, "hf", tmp_path / "hf")



def _crafted_vision(path, *overrides, experiment="simclr-digits"):
    """A checkpoint of a tiny backbone for 8 x 8 digits, weights (and BatchNorm statistics) far from init."""
    from framework.config.load import config_to_dict, load_config
    from framework.objectives import objective_module

    cfg = load_config(str(REPO / f"configs/experiments/{experiment}.yaml"), list(overrides))
    torch.manual_seed(0)
    objective = objective_module(cfg.objective.name).Objective(config_to_dict(cfg))
    with torch.no_grad():
        for name, tensor in objective.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith("running_var") else torch.randn_like(tensor) * 0.3)
    torch.save({"state_dict": objective.state_dict(), "hyper_parameters": dict(objective.hparams)}, path)
    return path


def test_grid_pooling_is_refused_for_transformers_and_exported_to_onnx(tmp_path):
    from framework.errors import ConfigError
    from framework.export.export import export

    checkpoint = _crafted_vision(tmp_path / "grid.ckpt", "model.patch_size=2", "model.dim=16", "model.depth=1",
                                 "model.heads=2", "model.pool=grid", experiment="mae-digits")
    with pytest.raises(ConfigError, match="model.pool=grid"):
        export(checkpoint, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export(checkpoint, "onnx", tmp_path / "onnx")  # its features, checked against ours inside


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_exports_to_vit_model_with_our_tokens_and_features(tmp_path, pool):
    from framework.evaluate.backbone import load_backbone

    checkpoint = _crafted_vision(tmp_path / "vit.ckpt", "model.patch_size=2", "model.dim=16", "model.depth=2",
                                 "model.heads=2", f"model.pool={pool}", experiment="mae-digits")
    run_cli(["export", "--checkpoint", str(checkpoint), "--format", "hf", "--output", str(tmp_path / "hf")])
    model = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    assert type(model).__name__ == "ViTModel"
    backbone = load_backbone(checkpoint)
    size = backbone.image_size  # the pretraining size: the processor resizes to it
    images = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(2))
    pixels = processor(images=[(i.permute(1, 2, 0) * 255).round().byte().numpy() for i in images], return_tensors="pt",
                       input_data_format="channels_last")["pixel_values"]
    quantized = (images * 255).round() / 255  # what 8-bit images carry
    torch.testing.assert_close(pixels, (quantized - backbone.pixel_mean) / backbone.pixel_std, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        tokens = backbone.encode(backbone.embed(quantized) + backbone.positions(size, size))
        hidden = model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(hidden, tokens, rtol=1e-4, atol=1e-4)
        pooled = hidden[:, 0] if pool == "cls" else hidden[:, 1:].mean(1)
        torch.testing.assert_close(pooled, backbone(quantized), rtol=1e-4, atol=1e-4)


def test_resnet_exports_to_resnet_model_and_the_cifar_stem_is_refused(tmp_path):
    from framework.errors import ConfigError
    from framework.evaluate.backbone import load_backbone
    from framework.export.export import export

    for block in ("basic", "bottleneck"):
        checkpoint = _crafted_vision(tmp_path / f"{block}.ckpt", "model.stem=imagenet", f"model.block={block}")
        export(checkpoint, "hf", tmp_path / block)
        model = transformers.AutoModel.from_pretrained(str(tmp_path / block)).eval()
        assert type(model).__name__ == "ResNetModel"
        backbone = load_backbone(checkpoint)
        images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            out = model(pixel_values=(images - backbone.pixel_mean) / backbone.pixel_std)
            torch.testing.assert_close(out.pooler_output.flatten(1), backbone(images), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.last_hidden_state, backbone.feature_map(images), rtol=1e-4, atol=1e-4)
    cifar = _crafted_vision(tmp_path / "cifar.ckpt")  # resnet-tiny: the CIFAR stem
    export(cifar, "safetensors", tmp_path / "cifar-weights")  # what remains for it: safetensors + load_backbone
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path / "cifar-weights/model.safetensors")(images), load_backbone(cifar)(images))
    with pytest.raises(ConfigError, match="model.stem=cifar"):
        export(cifar, "hf", tmp_path / "cifar")
    export(cifar, "onnx", tmp_path / "cifar-onnx")  # ONNX takes it, checked against ours inside
    assert (tmp_path / "cifar-onnx/model.onnx").is_file()


def test_onnx_takes_what_transformers_cannot_yet_mlm_and_a_speech_encoder(tmp_path, text_corpus):
    """The export checks ONNX Runtime against our forward inside (two batch sizes); here once
    more at another batch size and audio length."""
    from framework.export.export import export, read_objective
    from framework.export.onnx import _AudioFrames

    mlm = _crafted_checkpoint(tmp_path / "mlm.ckpt", text_corpus, objective="mlm")
    export(mlm, "onnx", tmp_path / "mlm")
    speech = _crafted_vision(tmp_path / "w2v.ckpt", "model.dim=16", "model.depth=1", "model.heads=2",
                             "model.conv_layers=[[16,10,5],[16,8,8]]", "model.pos_conv_kernel=8", "model.pos_conv_groups=2",
                             "objective.codebook_entries=8", "objective.final_dim=16", experiment="wav2vec2-digits")
    export(speech, "onnx", tmp_path / "speech")
    encoder = _AudioFrames(read_objective(speech)[0].export_backbone()).eval()
    session = onnxruntime.InferenceSession(str(tmp_path / "speech/model.onnx"), providers=["CPUExecutionProvider"])
    wave = torch.randn(4, 5000, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = encoder(wave)
    got = torch.from_numpy(session.run(None, {"waveforms": wave.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    from framework.errors import ConfigError

    with pytest.raises(ConfigError, match="model.input_norm=true"):
        export(speech, "hf", tmp_path / "speech-hf")


@pytest.mark.parametrize("layout", [[], ["position=learned", "norm=rmsnorm", "mlp=swiglu"]])
def test_mlm_exports_to_a_remote_code_masked_lm_with_our_logits(tmp_path, text_corpus, layout):
    from framework.export.export import export, read_objective
    from framework.losses.language import masked_token_loss

    checkpoint = _crafted_checkpoint(tmp_path / "mlm.ckpt", text_corpus, objective="mlm",
                                     **dict(item.split("=") for item in layout))
    summary = export(checkpoint, "hf", tmp_path / "hf")
    assert summary["trust_remote_code"] and "trust_remote_code=True" in (tmp_path / "hf/README.md").read_text()
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    objective = read_objective(checkpoint)[0]
    tokens = torch.randint(0, objective.model.vocab_size, (3, 12), generator=torch.Generator().manual_seed(5))
    tokens[:, 3] = tokenizer.mask_token_id
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, 8:] = False  # padding the model must not read
    labels = torch.full_like(tokens, -100)
    labels[:, 3] = 7
    with torch.no_grad():
        expected = objective.model.logits(objective.model(tokens, valid))
        out = model(input_ids=tokens, attention_mask=valid.long(), labels=labels)
    torch.testing.assert_close(out.logits[valid], expected[valid], rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    torch.testing.assert_close(out.loss, masked_token_loss(expected, labels), rtol=1e-5, atol=1e-6)


SPEECH = ["model.dim=16", "model.depth=2", "model.heads=2", "model.pos_conv_kernel=8", "model.pos_conv_groups=2",
          "model.input_norm=false"]


@pytest.mark.parametrize("objective,conv_mode", [("wav2vec2", "group_norm"), ("hubert", "layer_norm")])
def test_speech_exports_to_wav2vec2_and_hubert_models_with_our_frames(tmp_path, objective, conv_mode):
    from framework.export.export import read_objective
    from framework.export.onnx import _AudioFrames

    extra = ["objective.codebook_entries=8", "objective.final_dim=16"] if objective == "wav2vec2" else ["objective.clusters=5"]
    checkpoint = _crafted_vision(tmp_path / f"{objective}.ckpt", *SPEECH, f"model.conv_mode={conv_mode}",
                                 "model.conv_layers=[[16,10,5],[16,8,8]]", *extra, experiment=f"{objective}-digits")
    run_cli(["export", "--checkpoint", str(checkpoint), "--format", "hf", "--output", str(tmp_path / "hf")])
    model = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(model).__name__ == {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel"}[objective]
    extractor = transformers.AutoFeatureExtractor.from_pretrained(str(tmp_path / "hf"))
    ours = read_objective(checkpoint)[0]
    assert extractor.sampling_rate == ours.cfg.data.sample_rate
    wave = torch.randn(2, 4000, generator=torch.Generator().manual_seed(6)) * 0.1
    inputs = torch.from_numpy(extractor(list(wave.numpy()), sampling_rate=extractor.sampling_rate, return_tensors="np")["input_values"])
    normalised = (wave - wave.mean(1, keepdim=True)) / wave.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(inputs, normalised, rtol=1e-4, atol=1e-4)  # what our loader does to a clip
    with torch.no_grad():
        expected = _AudioFrames(ours.export_backbone().eval())(normalised)
        torch.testing.assert_close(model(inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

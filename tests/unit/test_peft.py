"""LoRA and BitFit on a tiny BERT (training/parameter_efficient.py): what trains, which modules
LoRA wraps, and the export: merged weights equal to the adapter model's, adapter/ beside it."""

from __future__ import annotations

import torch
from shardtune.training.config import PeftSection
from shardtune.training.parameter_efficient import (
    ADAPTER_DIR,
    apply_peft,
    lora_module_names,
    parameter_counts,
    save_adapter_config,
    save_merged,
)

HEAD = "AutoModelForTokenClassification"


def tiny(num_labels=3):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels)  # fmt: skip
    return BertForTokenClassification(config)


def test_lora_wraps_attention_and_dense_layers_and_trains_the_head():
    model = apply_peft(tiny(), PeftSection(method="lora", r=4), HEAD, "s3://b/base")
    wrapped = {name.rsplit(".", 1)[-1] for name in lora_module_names(model)}
    assert wrapped == {"query", "key", "value", "dense"}
    assert len(lora_module_names(model)) == 2 * 6  # per layer: q, k, v, attention out, in, out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    t, total = parameter_counts(model)
    assert 0 < t < total / 10


def test_bitfit_trains_biases_and_the_head_only():
    model = apply_peft(tiny(), PeftSection(method="bitfit"), HEAD, "x")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "classifier.weight" in trainable
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in trainable)
    assert "bert.encoder.layer.0.attention.self.query.weight" not in trainable


def test_merged_export_equals_the_adapter_model(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import BertForTokenClassification

    model = apply_peft(tiny(), PeftSection(method="lora", r=4), HEAD, "s3://b/base")
    with torch.no_grad():  # a trained adapter: lora_B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    config_dir = tmp_path / "hf_config"
    model.config.save_pretrained(config_dir)
    save_adapter_config(model, str(config_dir))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "export"
    save_merged(BertForTokenClassification, model.config, state, str(config_dir), str(out))

    merged = BertForTokenClassification.from_pretrained(out).eval()
    assert not [k for k in load_file(out / "model.safetensors") if "lora" in k or "base_layer" in k]
    adapter = PeftModel.from_pretrained(tiny().eval(), str(out / ADAPTER_DIR)).eval()
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        ours, theirs = merged(input_ids=x).logits, adapter(input_ids=x).logits
        with adapter.disable_adapter():
            base = adapter(input_ids=x).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours, base, atol=1e-3)

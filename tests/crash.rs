//! A real crash test of the `snella` binary: a run killed with SIGKILL at many instants (mid-step,
//! mid-evaluation, mid-checkpoint-write, mid-export) and resumed each time ends exactly as an uninterrupted
//! run: checkpoint tensors (the allocator's EMAs among them) and metadata, `metrics.jsonl` (time fields
//! aside), the pictures and the exports, with no temporary file left. After every kill the files on disk must
//! already obey the rule of `train/checkpoint.rs`: the checkpoint reads, `metrics.jsonl` starts with exactly
//! the lines it counts, and a picture shows no epoch it does not count. Ctrl-C (SIGINT), SIGTERM and a second
//! signal are checked the same way.
mod common;
use common::*;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use snella::train::checkpoint::{read_checkpoint_meta, CheckpointMeta};
use snella::train::pictures::{self, PICTURE_FILES};

/// A fixture and an uninterrupted run of its recipe, shared by the tests of this file.
struct Reference {
    /// Keeps the temp folder alive.
    _dir: tempfile::TempDir,
    root: PathBuf,
    recipe: PathBuf,
    out: PathBuf,
    seconds: f64,
}

/// SNELLA-8 with its allocator, 3 epochs of 6 steps, a checkpoint after every step, a test set larger than the
/// training set (so evaluations take a good share of the time), and the exports at the end.
fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let (dir, weights, data) = fixture(48, 96);
        let root = dir.path().to_path_buf();
        let out = root.join("reference");
        let mut cfg = recipe(&weights, &data, &out, "snella8", 3);
        cfg.checkpoint_every = 1;
        cfg.train_transform = "fgvc".into(); // the augmentation RNG must resume too
        let recipe = root.join("r.toml");
        std::fs::write(&recipe, cfg.to_toml().unwrap()).unwrap();
        let t0 = Instant::now();
        let o = train(&recipe, &out, &[]).wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        Reference { _dir: dir, root, recipe, out, seconds: t0.elapsed().as_secs_f64() }
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `snella train <recipe> --quiet --export --set out_dir=<out> <extra>`, started.
fn train(recipe: &Path, out: &Path, extra: &[&str]) -> Child {
    let out_dir = format!("out_dir={}", out.display());
    Command::new(env!("CARGO_BIN_EXE_snella"))
        .args(["train", recipe.to_str().unwrap(), "--quiet", "--export", "--set", &out_dir])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the snella binary")
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child that has not been waited for (so the pid is still ours).
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill({}, {sig})", child.id());
}

/// Every tensor of a checkpoint as raw bytes.
fn tensors(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect()
}

/// A metrics line without its time field.
fn timeless(line: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    v.as_object_mut().unwrap().remove("seconds");
    v
}

/// The checkpoint metadata with its time fields cleared.
fn timeless_meta(p: &Path) -> CheckpointMeta {
    let mut m = read_checkpoint_meta(p).unwrap();
    m.state.elapsed_s = 0.0;
    m.state.metrics = m.state.metrics.iter().map(|l| timeless(l).to_string()).collect();
    m.config.as_mut().unwrap().out_dir = PathBuf::new();
    m.config_hash = None;
    m
}

/// Files in a folder (not recursing), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// The run in `out` ended exactly as the reference: checkpoint tensors and metadata, metrics, exports, and
/// nothing else in the folders.
fn assert_same_as_reference(out: &Path, what: &str) {
    let r = reference();
    let (want, got) = (r.out.join("checkpoint.safetensors"), out.join("checkpoint.safetensors"));
    let (tw, tg) = (tensors(&want), tensors(&got));
    assert_eq!(tw.keys().collect::<Vec<_>>(), tg.keys().collect::<Vec<_>>(), "{what}: tensor names");
    assert!(tw.keys().any(|k| k.starts_with("alloc.")), "the allocator's state is in the checkpoint");
    for (k, v) in &tw {
        assert!(tg[k] == *v, "{what}: tensor {k} differs from the uninterrupted run");
    }
    assert_eq!(timeless_meta(&got), timeless_meta(&want), "{what}: checkpoint metadata");
    let lines = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p.join("metrics.jsonl")).unwrap().lines().map(timeless).collect()
    };
    let (mw, mg) = (lines(&r.out), lines(out));
    assert_eq!(mg.len(), 3, "{what}: one metrics line per epoch");
    assert_eq!(mg, mw, "{what}: metrics.jsonl");
    for f in ["merged.safetensors", "delta.safetensors"] {
        let same =
            std::fs::read(r.out.join("export").join(f)).unwrap() == std::fs::read(out.join("export").join(f)).unwrap();
        assert!(same, "{what}: export/{f} differs");
    }
    for f in PICTURE_FILES {
        let same = std::fs::read(r.out.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap();
        assert!(same, "{what}: {f} differs");
    }
    let mut want = vec!["checkpoint.safetensors", "export", "metrics.jsonl"];
    want.extend(PICTURE_FILES);
    want.sort();
    assert_eq!(listing(out), want, "{what}: stray files");
    assert_eq!(listing(&out.join("export")), ["delta.safetensors", "merged.safetensors"], "{what}: stray files");
}

/// Picture file name → bytes.
type Drawing = BTreeMap<&'static str, Vec<u8>>;

/// The pictures drawn from the first k counted lines, for every k: what a picture on disk may be.
fn drawings_of_prefixes(counted: &[String]) -> Vec<Drawing> {
    // Drawn once per distinct prefix (the time field aside, which no picture shows): kills repeat them.
    static CACHE: OnceLock<Mutex<HashMap<Vec<String>, Drawing>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    (0..=counted.len())
        .map(|k| {
            let key: Vec<String> = counted[..k].iter().map(|l| timeless(l).to_string()).collect();
            cache
                .entry(key)
                .or_insert_with(|| {
                    let dir = tempfile::tempdir().unwrap();
                    pictures::draw(dir.path(), &counted[..k], "snella8").unwrap();
                    PICTURE_FILES
                        .into_iter()
                        .filter_map(|f| Some((f, std::fs::read(dir.path().join(f)).ok()?)))
                        .collect()
                })
                .clone()
        })
        .collect()
}

/// After a kill: the checkpoint (if any) reads, `metrics.jsonl` starts with exactly the lines it counts (it
/// may hold more: a line written before the checkpoint that would count it, or part of one), and each picture
/// is absent or drawn from some of those lines (one evaluation behind when the kill came between a checkpoint
/// and its pictures). Returns whether `metrics.jsonl` held more.
fn assert_consistent_after_kill(out: &Path, what: &str) -> bool {
    let ck = out.join("checkpoint.safetensors");
    if !ck.exists() {
        return false;
    }
    let meta = read_checkpoint_meta(&ck).unwrap_or_else(|e| panic!("{what}: the checkpoint does not read: {e}"));
    let counted = &meta.state.metrics;
    assert_eq!(counted.len(), meta.state.epoch, "{what}");
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let on_disk: Vec<&str> = text.split_inclusive('\n').collect();
    assert!(on_disk.len() >= counted.len(), "{what}: metrics.jsonl lacks lines the checkpoint counts");
    for (i, line) in counted.iter().enumerate() {
        assert_eq!(on_disk[i], format!("{line}\n"), "{what}: metrics line {i} is not the one the checkpoint counts");
    }
    let allowed = drawings_of_prefixes(counted);
    for f in PICTURE_FILES {
        if let Ok(bytes) = std::fs::read(out.join(f)) {
            let ok = allowed.iter().any(|d| d.get(f) == Some(&bytes));
            assert!(ok, "{what}: {f} shows an epoch the checkpoint does not count");
        }
    }
    on_disk.len() > counted.len()
}

/// Whether a writer's temporary (`.<name>.tmp-<pid>`) is in the folder or its export folder.
fn temporary_present(out: &Path) -> bool {
    let mut names = listing(out);
    names.extend(listing(&out.join("export")));
    names.iter().any(|n| n.contains(".tmp-"))
}

#[test]
fn sigkill_at_random_instants_then_resume_matches_an_uninterrupted_run() {
    let r = reference();
    let out = r.root.join("killed");
    let t0 = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    // Kills land on average a few steps into each session, so the run needs many sessions to end.
    let step = r.seconds / 18.0;
    let (mut kills, mut mid_write, mut ahead, mut sessions, mut drawn) = (0, 0, 0, 0, 0);
    let mut fresh = true;
    while kills < 60 {
        assert!(t0.elapsed() < Duration::from_secs(100), "the kill loop does not progress");
        let resume: &[&str] = if fresh { &[] } else { &["--resume"] };
        let mut child = train(&r.recipe, &out, resume);
        sessions += 1;
        if kills % 2 == 0 {
            // At a random instant: mid-step, mid-evaluation, mid-write or at start-up.
            let deadline = Instant::now() + Duration::from_secs_f64(rng.gen_range(0.0..4.0 * step) + 0.03);
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_micros(500));
            }
        } else {
            // While a checkpoint is being written: the moment the n-th temporary of this process appears.
            let tmp = out.join(format!(".checkpoint.safetensors.tmp-{}", child.id()));
            let mut left = rng.gen_range(1..=3);
            let mut was = false;
            while child.try_wait().unwrap().is_none() {
                let is = tmp.exists();
                if is && !was {
                    left -= 1;
                    if left == 0 {
                        break;
                    }
                }
                was = is;
                std::thread::yield_now();
            }
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL (a no-op when the run has just ended)
        }
        let o = finish(child);
        if o.status.code().is_none() {
            kills += 1;
            fresh &= !out.join("checkpoint.safetensors").exists();
            mid_write += usize::from(temporary_present(&out));
            ahead += usize::from(assert_consistent_after_kill(&out, &format!("kill {kills}")));
            drawn += usize::from(PICTURE_FILES.iter().any(|f| out.join(f).exists()));
        } else {
            assert!(o.status.success(), "session {sessions}: {}", text(&o.stderr));
            if kills >= 40 {
                break; // the run ended; the later kills would only hit its exports
            }
            // Start over in the same folder: a fresh run must also clear what the finished one left.
            fresh = true;
        }
    }
    let o = finish(train(&r.recipe, &out, &["--resume"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    println!(
        "{kills} kills in {sessions} sessions ({mid_write} left a writer's temporary, {ahead} left metrics ahead of \
         the checkpoint, {drawn} found pictures), {:.1} s; the uninterrupted run takes {:.2} s",
        t0.elapsed().as_secs_f64(),
        r.seconds
    );
    assert!(kills >= 40, "only {kills} kills");
    assert!(mid_write > 0, "no kill landed while a file was being written");
    assert!(drawn > 0, "no kill found pictures to check");
    assert_same_as_reference(&out, "after the kills");
}

/// Waits until `path` exists (the child still running), then a few more steps of the run.
fn wait_into_the_run(child: &mut Child, path: &Path, steps: f64) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before {} appeared", path.display());
        assert!(t0.elapsed() < Duration::from_secs(60), "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_secs_f64(steps * reference().seconds / 18.0));
    assert!(child.try_wait().unwrap().is_none(), "the run ended before the signal");
}

#[test]
fn ctrl_c_writes_a_checkpoint_says_how_to_resume_and_exits_non_zero() {
    let r = reference();
    for (sig, code, name) in [(libc::SIGINT, 130, "SIGINT"), (libc::SIGTERM, 143, "SIGTERM")] {
        let out = r.root.join(format!("interrupted-{name}"));
        let ck = out.join("checkpoint.safetensors");
        let mut child = train(&r.recipe, &out, &[]);
        wait_into_the_run(&mut child, &ck, 4.0);
        signal(&child, sig);
        let o = finish(child);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{name}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with(&format!("snella: interrupted by {name} at epoch ")), "{name}: {err}");
        assert!(last.contains(&ck.display().to_string()), "{name}: the message names the checkpoint: {last}");
        assert!(text(&o.stdout).contains("\"interrupted\": true"), "{name}: {}", text(&o.stdout));
        // The checkpoint holds the point the message names, before the end of the run, and the outputs agree.
        let meta = read_checkpoint_meta(&ck).unwrap();
        let s = &meta.state;
        let at = format!("at epoch {} batch {} (step {})", s.epoch, s.step_in_epoch, s.global_step);
        assert!(last.contains(&at), "{name}: {last} vs the checkpoint {at}");
        assert!(s.global_step < 18, "{name}: the signal came after the last step");
        assert!(!assert_consistent_after_kill(&out, name), "{name}: metrics.jsonl holds lines the checkpoint lacks");
        let files: Vec<String> = listing(&out).into_iter().filter(|f| !PICTURE_FILES.contains(&f.as_str())).collect();
        assert_eq!(files, ["checkpoint.safetensors", "metrics.jsonl"], "{name}: no export of an unfinished run");
        // The command the message gives finishes the run as if it had never stopped.
        let command = last.split_once("resume with: ").map(|(_, c)| c).unwrap_or_default();
        let words: Vec<&str> = command.split_whitespace().collect();
        assert!(words.len() > 2 && words.contains(&"--resume"), "{name}: {command}");
        let o = Command::new(words[0]).args(&words[1..]).output().unwrap();
        assert!(o.status.success(), "{name}: {command}: {}", text(&o.stderr));
        assert_same_as_reference(&out, name);
    }
}

/// A second signal exits at once. Two SIGINTs sent while the process is stopped would merge into one (POSIX
/// keeps one pending instance of a signal), so the second signal here is SIGTERM, which the binary treats as
/// Ctrl-C: both are delivered when the process continues, before it runs another instruction of its own.
#[test]
fn a_second_signal_exits_at_once_and_the_last_checkpoint_stays_valid() {
    let r = reference();
    let out = r.root.join("twice");
    let ck = out.join("checkpoint.safetensors");
    let mut child = train(&r.recipe, &out, &[]);
    wait_into_the_run(&mut child, &ck, 3.0);
    signal(&child, libc::SIGSTOP);
    let before = std::fs::read(&ck).unwrap();
    signal(&child, libc::SIGINT);
    signal(&child, libc::SIGTERM);
    signal(&child, libc::SIGCONT);
    let o = finish(child);
    let err = text(&o.stderr);
    assert!(matches!(o.status.code(), Some(130 | 143)), "{:?}: {err}", o.status);
    assert!(!err.contains("interrupted by") && o.stdout.is_empty(), "it stopped gracefully instead: {err}");
    assert_eq!(std::fs::read(&ck).unwrap(), before, "the checkpoint changed after the second signal");
    read_checkpoint_meta(&ck).unwrap();
    assert_consistent_after_kill(&out, "second signal");
    let o = finish(train(&r.recipe, &out, &["--resume"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_same_as_reference(&out, "after a second signal");
}

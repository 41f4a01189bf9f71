//! Kernel launches on the emulated device: blocks spread over the host's cores, and inside a block one fiber
//! per CUDA thread, scheduled round-robin. A thread runs until it reaches `__syncthreads`, a warp intrinsic,
//! or its end:
//!
//! - a barrier opens when every thread of the block that has not ended waits at it; threads waiting at two
//!   different `__syncthreads` (divergent code) are a synccheck error;
//! - a warp intrinsic completes when every lane its mask names has arrived at the same call with the same
//!   mask; a named lane that has ended, waits at a barrier or at another intrinsic is a synccheck error;
//! - if no thread can run and neither completes, the block is deadlocked: a synccheck error that says where
//!   each thread waits.
//!
//! The built-ins that `cuda/emu/cuda_emu.h` declares are the `extern "C"` functions at the end of this file.
//! Every check's error names the kernel, the block, the thread and (for memory) the address.
use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use super::fiber::{self, Fiber};
use super::sanitizer::SharedMemory;
use super::Staging;
use crate::runtime::cuda::{EmuEntry, KernelSignature};

/// sm_90's limit on static plus dynamic shared memory without an opt-in attribute.
pub(crate) const SHARED_LIMIT: usize = 48 << 10;

/// A source line of a kernel (`file:line`), as the header passes it.
#[derive(Clone, Copy)]
pub(crate) struct Site(*const c_char);

impl Site {
    pub(crate) fn text(&self) -> &str {
        if self.0.is_null() {
            return "?";
        }
        // SAFETY: a string literal of the kernel's object file.
        let s = unsafe { CStr::from_ptr(self.0) }.to_str().unwrap_or("?");
        s.rsplit('/').next().unwrap_or(s)
    }
}

impl PartialEq for Site {
    #[inline]
    fn eq(&self, o: &Site) -> bool {
        // Two copies of one string literal (one per object file) name the same line.
        self.0 == o.0 || self.same_text(o)
    }
}

impl Site {
    #[cold]
    fn same_text(&self, o: &Site) -> bool {
        self.text() == o.text()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Collective {
    Shuffle(i32),
    Match,
    Vote(i32),
}

impl Collective {
    fn name(self) -> &'static str {
        match self {
            Collective::Shuffle(0) => "__shfl_sync",
            Collective::Shuffle(1) => "__shfl_up_sync",
            Collective::Shuffle(2) => "__shfl_down_sync",
            Collective::Shuffle(_) => "__shfl_xor_sync",
            Collective::Match => "__match_any_sync",
            Collective::Vote(0) => "__ballot_sync",
            Collective::Vote(1) => "__any_sync",
            Collective::Vote(_) => "__all_sync",
        }
    }
}

/// A warp intrinsic one lane has arrived at.
#[derive(Clone, Copy)]
struct WarpOp {
    kind: Collective,
    site: Site,
    mask: u32,
    value: u64,
    arg: i32,
    width: i32,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Runnable,
    Barrier,
    Warp,
    Exited,
}

#[derive(Clone, Copy)]
struct Thread {
    /// threadIdx.
    idx: (u32, u32, u32),
    state: State,
    /// Where it waits (barrier or warp intrinsic).
    site: Site,
    /// Its operand of the warp intrinsic it waits in (value, and the lane argument of a shuffle).
    value: u64,
    arg: i32,
    /// The value a completed warp intrinsic hands it.
    result: u32,
}

/// The lanes of one warp that wait in warp intrinsics (one group per mask; almost always one, full) and the
/// lanes that have ended or wait at a barrier, as bit masks over the 32 lanes.
#[derive(Clone, Default)]
struct Warp {
    groups: Vec<(WarpOp, u32)>,
    exited: u32,
    at_barrier: u32,
    /// Lanes that exist (the last warp of a block whose size is not a multiple of 32 has fewer).
    lanes: u32,
}

/// What every block of one launch shares (read-only).
pub(crate) struct Launch<'a> {
    pub(crate) kernel: &'static KernelSignature,
    entry: EmuEntry,
    args: *const *const c_void,
    pub(crate) grid: (u32, u32, u32),
    pub(crate) block: (u32, u32, u32),
    pub(crate) dynamic_shared: usize,
    pub(crate) staging: &'a Staging,
}

// SAFETY: the argument array and the staging copies are only read by the blocks (the copies' contents are
// written by the kernels, which is what they are for); they outlive every block of the launch.
unsafe impl Sync for Launch<'_> {}

/// One block being executed on this host thread: what the built-ins and the sanitizer callbacks read and
/// change. Reached through `CURRENT`; never borrowed across a fiber switch.
pub(crate) struct BlockRun {
    pub(crate) launch: *const Launch<'static>,
    pub(crate) block_idx: (u32, u32, u32),
    threads: Vec<Thread>,
    warps: Vec<Warp>,
    /// Threads ready to run, per warp: a warp's lanes run until none is ready before the next warp's do, so the
    /// fibers a warp intrinsic cycles through (32, not the whole block) stay in the cache.
    ready: Vec<std::collections::VecDeque<u32>>,
    /// The warp whose ready lanes run now.
    ready_warp: usize,
    fibers: Vec<Fiber>,
    /// The running thread (linear index).
    pub(crate) cur: usize,
    /// The scheduler's saved stack pointer while a fiber runs.
    sched_sp: *mut u8,
    /// Barriers the block has passed: racecheck's epoch.
    pub(crate) epoch: u32,
    pub(crate) shared: SharedMemory,
    pub(crate) fault: Option<String>,
    /// The staged argument copy the last global access hit (most accesses hit the same one again).
    pub(crate) last_group: usize,
}

thread_local! {
    /// The block this host thread is executing (null outside a launch).
    pub(crate) static CURRENT: Cell<*mut BlockRun> = const { Cell::new(std::ptr::null_mut()) };
    /// This host thread's fibers and shared memory, kept between blocks and launches.
    static WORKER: std::cell::RefCell<Option<Box<BlockRun>>> = const { std::cell::RefCell::new(None) };
}

/// Runs every block of a launch; the first fault (lowest block index) is the error.
pub(crate) fn launch(
    kernel: &'static KernelSignature,
    entry: EmuEntry,
    args: &[*const c_void],
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    dynamic_shared: usize,
    staging: &Staging,
) -> Result<(), String> {
    let launch = Launch { kernel, entry, args: args.as_ptr(), grid, block, dynamic_shared, staging };
    let blocks = grid.0 as usize * grid.1 as usize * grid.2 as usize;
    let first_fault = AtomicUsize::new(usize::MAX);
    let faults: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    let run = |b: usize| {
        // Blocks after a faulting one need not run; earlier ones must, so the reported fault is the first.
        if b > first_fault.load(Ordering::Relaxed) {
            return;
        }
        if let Err(msg) = run_block(&launch, b) {
            first_fault.fetch_min(b, Ordering::Relaxed);
            faults.lock().unwrap_or_else(|p| p.into_inner()).push((b, msg));
        }
    };
    if blocks <= 1 {
        (0..blocks).for_each(run);
    } else {
        (0..blocks).into_par_iter().with_min_len(4).for_each(run);
    }
    let mut faults = faults.into_inner().unwrap_or_else(|p| p.into_inner());
    faults.sort_by_key(|f| f.0);
    match faults.into_iter().next() {
        Some((_, msg)) => Err(msg),
        None => Ok(()),
    }
}

/// Runs block `linear` of the launch on this host thread.
fn run_block(launch: &Launch, linear: usize) -> Result<(), String> {
    let (gx, gy) = (launch.grid.0 as usize, launch.grid.1 as usize);
    let block_idx = ((linear % gx) as u32, ((linear / gx) % gy) as u32, (linear / (gx * gy)) as u32);
    let n = launch.block.0 as usize * launch.block.1 as usize * launch.block.2 as usize;
    WORKER.with(|w| {
        let mut slot = w.borrow_mut();
        let run = slot.get_or_insert_with(|| {
            Box::new(BlockRun {
                launch: std::ptr::null(),
                block_idx: (0, 0, 0),
                threads: Vec::new(),
                warps: Vec::new(),
                ready: Vec::new(),
                ready_warp: 0,
                fibers: Vec::new(),
                cur: 0,
                sched_sp: std::ptr::null_mut(),
                epoch: 0,
                shared: SharedMemory::new(),
                fault: None,
                last_group: 0,
            })
        });
        // SAFETY: the launch outlives this call; the pointer is cleared before returning.
        run.launch = unsafe { std::mem::transmute::<*const Launch<'_>, *const Launch<'static>>(launch) };
        run.block_idx = block_idx;
        run.epoch = 0;
        run.fault = None;
        run.last_group = 0;
        run.shared.start_block(launch.dynamic_shared);
        while run.fibers.len() < n {
            run.fibers.push(Fiber::new());
        }
        let (bx, by) = (launch.block.0 as usize, launch.block.1 as usize);
        run.threads.clear();
        run.threads.extend((0..n).map(|t| Thread {
            idx: ((t % bx) as u32, ((t / bx) % by) as u32, (t / (bx * by)) as u32),
            state: State::Runnable,
            site: Site(std::ptr::null()),
            value: 0,
            arg: 0,
            result: 0,
        }));
        run.warps.clear();
        run.warps.extend((0..n.div_ceil(32)).map(|w| Warp {
            lanes: if (w + 1) * 32 <= n { u32::MAX } else { (1u32 << (n - w * 32)) - 1 },
            ..Warp::default()
        }));
        run.ready.resize_with(n.div_ceil(32), Default::default);
        run.ready.truncate(n.div_ceil(32));
        for (w, q) in run.ready.iter_mut().enumerate() {
            q.clear();
            q.extend((w * 32) as u32..((w + 1) * 32).min(n) as u32);
        }
        run.ready_warp = 0;
        for (i, f) in run.fibers[..n].iter_mut().enumerate() {
            f.prepare(thread_main, std::ptr::null_mut(), i);
        }
        let ptr: *mut BlockRun = &mut **run;
        drop(slot);
        CURRENT.set(ptr);
        let result = schedule(ptr, n);
        CURRENT.set(std::ptr::null_mut());
        // SAFETY: no fiber runs any more; the worker state is ours again.
        unsafe { (*ptr).launch = std::ptr::null() };
        result
    })
}

/// Runs ready threads in turn until all have ended, opening barriers as they fill.
fn schedule(run: *mut BlockRun, n: usize) -> Result<(), String> {
    loop {
        // SAFETY: `run` is this thread's BlockRun; no reference to it is held across the switch.
        while let Some(t) = unsafe { (*run).next_ready() } {
            let t = t as usize;
            unsafe {
                let (save, next) = {
                    let r = &mut *run;
                    r.cur = t;
                    r.threads[t].state = State::Runnable;
                    (&mut r.sched_sp as *mut *mut u8, r.fibers[t].sp)
                };
                fiber::switch(save, next);
                if let Some(f) = (*run).fault.take() {
                    return Err(f);
                }
            }
        }
        // SAFETY: as above; every fiber is suspended now.
        let r = unsafe { &mut *run };
        let waiting: Vec<usize> = (0..n).filter(|&t| r.threads[t].state != State::Exited).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let first = r.threads[waiting[0]];
        if waiting.iter().all(|&t| r.threads[t].state == State::Barrier && r.threads[t].site == first.site) {
            for &t in &waiting {
                r.ready[t / 32].push_back(t as u32);
            }
            r.ready_warp = 0;
            for w in &mut r.warps {
                w.at_barrier = 0;
            }
            r.epoch += 1;
            continue;
        }
        let all_at_barriers = waiting.iter().all(|&t| r.threads[t].state == State::Barrier);
        let what = if all_at_barriers { "divergent __syncthreads" } else { "the block is deadlocked" };
        return Err(format!("synccheck: {}", r.prefix_block(&format!("{what}: {}", describe_waits(r, &waiting)))));
    }
}

/// "threads 0-31 wait at __syncthreads (f.cu:12); threads 32-63 wait at __syncthreads (f.cu:14)".
fn describe_waits(r: &BlockRun, waiting: &[usize]) -> String {
    let what = |t: usize| {
        let th = &r.threads[t];
        match th.state {
            State::Barrier => format!("__syncthreads ({})", th.site.text()),
            State::Warp => {
                let w = &r.warps[t / 32];
                let g = w.groups.iter().find(|g| g.0.mask & (1 << (t % 32)) != 0);
                g.map_or("a warp intrinsic".into(), |g| format!("{} ({})", g.0.kind.name(), th.site.text()))
            }
            _ => "nothing".into(),
        }
    };
    let mut parts: Vec<(usize, usize, String)> = Vec::new();
    for &t in waiting {
        let w = what(t);
        match parts.last_mut() {
            Some(last) if last.1 + 1 == t && last.2 == w => last.1 = t,
            _ => parts.push((t, t, w)),
        }
    }
    let ended = r.threads.len() - waiting.len();
    let mut s: Vec<String> = parts
        .iter()
        .map(
            |(a, b, w)| {
                if a == b {
                    format!("thread {a} waits at {w}")
                } else {
                    format!("threads {a}-{b} wait at {w}")
                }
            },
        )
        .collect();
    if ended > 0 {
        s.push(format!("{ended} threads have ended"));
    }
    s.join("; ")
}

impl BlockRun {
    /// The next thread to run: the current warp's ready lanes first, then the following warps'.
    fn next_ready(&mut self) -> Option<u32> {
        let (warps, mut w) = (self.ready.len(), self.ready_warp);
        for _ in 0..warps {
            if let Some(t) = self.ready[w].pop_front() {
                self.ready_warp = w;
                return Some(t);
            }
            w = if w + 1 == warps { 0 } else { w + 1 };
        }
        None
    }

    pub(crate) fn launch(&self) -> &Launch<'static> {
        // SAFETY: set for the whole execution of the block.
        unsafe { &*self.launch }
    }

    fn thread_idx(&self, t: usize) -> (u32, u32, u32) {
        self.threads[t].idx
    }

    /// "<kernel>, block (x,y,z): <msg>".
    fn prefix_block(&self, msg: &str) -> String {
        let (x, y, z) = self.block_idx;
        format!("{}, block ({x},{y},{z}): {msg}", self.launch().kernel.name)
    }

    /// "<check>: <kernel>, block (x,y,z), thread (x,y,z): <msg>".
    pub(crate) fn describe(&self, check: &str, msg: &str) -> String {
        let (x, y, z) = self.block_idx;
        let (tx, ty, tz) = self.thread_idx(self.cur);
        format!("{check}: {}, block ({x},{y},{z}), thread ({tx},{ty},{tz}): {msg}", self.launch().kernel.name)
    }
}

/// The current block (only called from inside a fiber of a launch).
///
/// # Safety
/// Must not be held across a fiber switch.
pub(crate) unsafe fn current<'a>() -> &'a mut BlockRun {
    &mut *CURRENT.get()
}

/// Records a failed check and leaves the running thread for good: the scheduler ends the launch with the error.
#[cold]
#[inline(never)]
pub(crate) fn fault(check: &str, msg: &str) -> ! {
    // SAFETY: called on a fiber of the current block.
    unsafe {
        let run = current();
        run.fault = Some(run.describe(check, msg));
        leave(run);
    }
    unreachable!("a faulted thread is never resumed")
}

/// Suspends the running thread until the scheduler resumes it.
fn suspend() {
    // SAFETY: called on a fiber of the current block; resumed by `schedule` only.
    unsafe { leave(current()) }
}

/// Switches from the running thread's fiber to the next ready thread, or to the scheduler when none is ready
/// (it then opens a barrier or ends the block) or a check has failed.
///
/// # Safety
/// On a fiber of the block `run` is; `run` must not be used after the call (re-fetch it with `current`).
unsafe fn leave(run: &mut BlockRun) {
    let t = run.cur;
    let save: *mut *mut u8 = &mut run.fibers[t].sp;
    let next = if run.fault.is_none() { run.next_ready() } else { None };
    let to = match next {
        Some(u) => {
            let u = u as usize;
            run.cur = u;
            run.threads[u].state = State::Runnable;
            run.fibers[u].sp
        }
        None => run.sched_sp,
    };
    fiber::switch(save, to);
}

/// The body of every fiber: one CUDA thread of the kernel.
extern "C" fn thread_main(_: *mut c_void) -> ! {
    // SAFETY: started by `schedule` on a fiber of the current block; the launch outlives it.
    unsafe {
        let l = current().launch();
        let (entry, args) = (l.entry, l.args);
        entry(args);
        let run = current();
        let t = run.cur;
        run.threads[t].state = State::Exited;
        run.warps[t / 32].exited |= 1 << (t % 32);
        check_lanes_waiting_for(run, t);
        leave(run);
    }
    unreachable!("an ended thread is never resumed")
}

/// A thread that ends or waits at a barrier must not be named by a warp intrinsic other lanes wait in.
fn check_lanes_waiting_for(run: &BlockRun, t: usize) {
    let (w, lane) = (t / 32, t % 32);
    let warp = &run.warps[w];
    if let Some((op, arrived)) = warp.groups.iter().find(|g| g.0.mask & (1 << lane) != 0) {
        let what = if run.threads[t].state == State::Exited {
            "ends".to_string()
        } else {
            format!("waits at __syncthreads ({})", run.threads[t].site.text())
        };
        fault(
            "synccheck",
            &format!(
                "lane {lane} of warp {w} {what} while lanes {} wait in {} ({}) with mask {:#010x}, which names it",
                lanes(*arrived),
                op.kind.name(),
                op.site.text(),
                op.mask
            ),
        );
    }
}

/// "0-15, 17" for a lane mask.
fn lanes(mask: u32) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut l = 0;
    while l < 32 {
        if mask & (1 << l) == 0 {
            l += 1;
            continue;
        }
        let start = l;
        while l < 32 && mask & (1 << l) != 0 {
            l += 1;
        }
        parts.push(if l - 1 == start { format!("{start}") } else { format!("{start}-{}", l - 1) });
    }
    parts.join(", ")
}

/// A lane arrives at a warp intrinsic; returns its result once every lane the mask names has arrived.
fn warp_collective(op: WarpOp) -> u32 {
    // SAFETY: on a fiber of the current block; the reference is dropped before `suspend`.
    let run = unsafe { current() };
    let t = run.cur;
    let (w, lane) = (t / 32, t % 32);
    let warp = &run.warps[w];
    let conflict = |(o, _): &(WarpOp, u32)| {
        o.mask & op.mask != 0 && !(o.mask == op.mask && o.kind == op.kind && o.site == op.site)
    };
    if op.mask & (1 << lane) == 0
        || op.mask & !warp.lanes != 0
        || op.mask & (warp.exited | warp.at_barrier) != 0
        || warp.groups.iter().any(conflict)
    {
        diagnose_warp(run, t, op);
    }
    let th = &mut run.threads[t];
    th.state = State::Warp;
    th.site = op.site;
    th.value = op.value;
    th.arg = op.arg;
    let warp = &mut run.warps[w];
    let g = match warp.groups.iter().position(|g| g.0.mask == op.mask) {
        Some(g) => g,
        None => {
            warp.groups.push((op, 0));
            warp.groups.len() - 1
        }
    };
    warp.groups[g].1 |= 1 << lane;
    if warp.groups[g].1 != op.mask {
        suspend();
        // SAFETY: resumed after the last lane completed the intrinsic.
        return unsafe { current() }.threads[t].result;
    }
    warp.groups.swap_remove(g);
    complete(run, w, op);
    run.threads[t].state = State::Runnable;
    run.threads[t].result
}

/// The synccheck error of a lane whose warp intrinsic cannot complete (see `warp_collective`).
#[cold]
#[inline(never)]
fn diagnose_warp(run: &BlockRun, t: usize, op: WarpOp) -> ! {
    let (w, lane) = (t / 32, t % 32);
    let warp = &run.warps[w];
    let here = format!("{} ({}) with mask {:#010x}", op.kind.name(), op.site.text(), op.mask);
    let msg = if op.mask & (1 << lane) == 0 {
        format!("lane {lane} calls {here}, which does not name it")
    } else if op.mask & !warp.lanes != 0 {
        format!(
            "{here} names lanes {} of warp {w}, which the block ({} threads) does not have",
            lanes(op.mask & !warp.lanes),
            run.threads.len()
        )
    } else if op.mask & warp.exited != 0 {
        format!("{here}: lanes {} of warp {w} have ended", lanes(op.mask & warp.exited))
    } else if op.mask & warp.at_barrier != 0 {
        format!(
            "{here}: lanes {} of warp {w} wait at __syncthreads instead (divergence)",
            lanes(op.mask & warp.at_barrier)
        )
    } else {
        let (other, arrived) = warp.groups.iter().find(|(o, _)| o.mask & op.mask != 0).map_or((op, 0), |g| *g);
        format!(
            "{here}: lanes {} of warp {w} wait in {} ({}) with mask {:#010x} instead (divergence)",
            lanes(arrived),
            other.kind.name(),
            other.site.text(),
            other.mask
        )
    };
    fault("synccheck", &msg)
}

/// Every lane the mask names has arrived: computes each one's result and queues the others to run again.
fn complete(run: &mut BlockRun, w: usize, op: WarpOp) {
    let base = w * 32;
    let value = |l: usize| run.threads[base + l].value;
    let mut results = [0u32; 32];
    for l in (0..32).filter(|l| op.mask & (1 << l) != 0) {
        results[l] = match op.kind {
            Collective::Shuffle(mode) => {
                // width is a power of two up to 32 (checked by snella_emu_shfl): segments by masking.
                let width = op.width as usize;
                let (seg, pos) = (l & !(width - 1), l & (width - 1));
                let a = run.threads[base + l].arg;
                let src = match mode {
                    0 => Some(seg + (a as usize & (width - 1))),
                    1 => (a >= 0 && pos >= a as usize).then(|| l - a as usize),
                    2 => (a >= 0 && pos + (a as usize) < width).then(|| l + a as usize),
                    _ => Some(l ^ (a as usize & 31)).filter(|&s| s & !(width - 1) == seg),
                };
                match src {
                    Some(s) if op.mask & (1 << s) != 0 => value(s) as u32,
                    Some(s) => fault(
                        "synccheck",
                        &format!(
                            "{} ({}): lane {l} reads lane {s}, which mask {:#010x} does not name",
                            op.kind.name(),
                            op.site.text(),
                            op.mask
                        ),
                    ),
                    None => value(l) as u32,
                }
            }
            Collective::Match => {
                (0..32).filter(|&m| op.mask & (1 << m) != 0 && value(m) == value(l)).fold(0, |acc, m| acc | 1 << m)
            }
            Collective::Vote(mode) => {
                let ballot =
                    (0..32).filter(|&m| op.mask & (1 << m) != 0 && value(m) != 0).fold(0u32, |acc, m| acc | 1 << m);
                match mode {
                    0 => ballot,
                    1 => (ballot != 0) as u32,
                    _ => (ballot == op.mask) as u32,
                }
            }
        };
    }
    let me = run.cur;
    for l in (0..32).filter(|l| op.mask & (1 << l) != 0) {
        run.threads[base + l].result = results[l];
        if base + l != me {
            run.ready[w].push_back((base + l) as u32);
        }
    }
}

// ---- the built-ins of cuda/emu/cuda_emu.h ----

/// CUDA's uint3 / dim3.
#[repr(C)]
pub(crate) struct Dim3 {
    x: u32,
    y: u32,
    z: u32,
}

fn dim3(v: (u32, u32, u32)) -> Dim3 {
    Dim3 { x: v.0, y: v.1, z: v.2 }
}

#[no_mangle]
extern "C" fn snella_emu_thread_idx() -> Dim3 {
    // SAFETY: called by a kernel, on a fiber of the current block.
    let run = unsafe { current() };
    dim3(run.thread_idx(run.cur))
}

#[no_mangle]
extern "C" fn snella_emu_block_idx() -> Dim3 {
    // SAFETY: as above.
    dim3(unsafe { current() }.block_idx)
}

#[no_mangle]
extern "C" fn snella_emu_block_dim() -> Dim3 {
    // SAFETY: as above.
    dim3(unsafe { current() }.launch().block)
}

#[no_mangle]
extern "C" fn snella_emu_grid_dim() -> Dim3 {
    // SAFETY: as above.
    dim3(unsafe { current() }.launch().grid)
}

#[no_mangle]
extern "C" fn snella_emu_syncthreads(site: *const c_char) {
    {
        // SAFETY: as above; the reference ends before `suspend`.
        let run = unsafe { current() };
        let t = run.cur;
        run.threads[t].state = State::Barrier;
        run.threads[t].site = Site(site);
        run.warps[t / 32].at_barrier |= 1 << (t % 32);
        check_lanes_waiting_for(run, t);
    }
    suspend();
}

#[no_mangle]
extern "C" fn snella_emu_shfl(mode: i32, mask: u32, value: u32, arg: i32, width: i32, site: *const c_char) -> u32 {
    if !(width > 0 && width <= 32 && (width & (width - 1)) == 0) {
        fault("synccheck", &format!("shuffle width {width} at {} is not a power of two up to 32", Site(site).text()));
    }
    warp_collective(WarpOp { kind: Collective::Shuffle(mode), site: Site(site), mask, value: value as u64, arg, width })
}

#[no_mangle]
extern "C" fn snella_emu_match_any(mask: u32, value: u64, site: *const c_char) -> u32 {
    warp_collective(WarpOp { kind: Collective::Match, site: Site(site), mask, value, arg: 0, width: 32 })
}

#[no_mangle]
extern "C" fn snella_emu_vote(mode: i32, mask: u32, predicate: i32, site: *const c_char) -> u32 {
    let value = (predicate != 0) as u64;
    warp_collective(WarpOp { kind: Collective::Vote(mode), site: Site(site), mask, value, arg: 0, width: 32 })
}

#[no_mangle]
extern "C" fn snella_emu_shared(bytes: usize, align: usize, name: *const c_char, site: *const c_char) -> *mut c_void {
    // SAFETY: as above.
    let run = unsafe { current() };
    let dynamic = run.launch().dynamic_shared;
    match run.shared.declare(Site(site), Site(name), bytes, align, dynamic) {
        Ok(p) => p as *mut c_void,
        Err(msg) => fault("launch check", &msg),
    }
}

#[no_mangle]
extern "C" fn snella_emu_dynamic_shared(_name: *const c_char, _site: *const c_char) -> *mut c_void {
    // SAFETY: as above.
    unsafe { current() }.shared.dynamic_base() as *mut c_void
}

#[no_mangle]
extern "C" fn snella_emu_atomic_u32(op: i32, addr: *mut c_void, value: u32, signed: i32, _site: *const c_char) -> u32 {
    super::sanitizer::check_atomic(addr as usize, 4);
    // SAFETY: checked to lie inside an argument's copy or a shared array, 4-byte aligned by the C type.
    let a = unsafe { AtomicU32::from_ptr(addr as *mut u32) };
    let (o, s) = (Ordering::Relaxed, signed != 0);
    match op {
        0 => a.fetch_add(value, o),
        1 => a.fetch_or(value, o),
        2 => a.fetch_and(value, o),
        3 if s => a.fetch_update(o, o, |x| Some((x as i32).max(value as i32) as u32)).unwrap_or(0),
        3 => a.fetch_max(value, o),
        4 if s => a.fetch_update(o, o, |x| Some((x as i32).min(value as i32) as u32)).unwrap_or(0),
        4 => a.fetch_min(value, o),
        _ => a.swap(value, o),
    }
}

#[no_mangle]
extern "C" fn snella_emu_atomic_cas_u32(addr: *mut c_void, compare: u32, value: u32, _site: *const c_char) -> u32 {
    super::sanitizer::check_atomic(addr as usize, 4);
    // SAFETY: as in snella_emu_atomic_u32.
    let a = unsafe { AtomicU32::from_ptr(addr as *mut u32) };
    match a.compare_exchange(compare, value, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(v) | Err(v) => v,
    }
}

#[no_mangle]
extern "C" fn snella_emu_atomic_add_f32(addr: *mut f32, value: f32, _site: *const c_char) -> f32 {
    super::sanitizer::check_atomic(addr as usize, 4);
    // SAFETY: as in snella_emu_atomic_u32.
    let a = unsafe { AtomicU32::from_ptr(addr as *mut u32) };
    let old = a
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some((f32::from_bits(x) + value).to_bits()))
        .unwrap_or(0);
    f32::from_bits(old)
}

/// Whether `addr` lies on the running thread's own stack (its locals).
pub(crate) fn on_own_stack(run: &BlockRun, addr: usize) -> bool {
    let (lo, hi) = run.fibers[run.cur].range();
    addr >= lo && addr < hi
}

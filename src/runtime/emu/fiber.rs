//! Fibers: the CUDA threads of one block, each with its own stack, switched cooperatively on one host thread
//! (x86-64 System V). A fiber runs until it reaches a barrier or a warp intrinsic, or ends; the block
//! scheduler (`block.rs`) then switches to the next one. A switch saves the callee-saved registers and the
//! floating-point control words on the current stack and loads the other stack: about ten instructions.
use std::ffi::c_void;

// snella_emu_switch(save: *mut *mut u8 [rdi], next: *mut u8 [rsi]): pushes the callee-saved registers, stores the
// stack pointer in *save, loads `next` and pops the same layout. The MXCSR and x87 control words are not
// switched: no kernel changes the rounding mode or the exception masks, so every fiber shares the thread's.
// snella_emu_fiber_start: the first "return" of a fresh fiber lands here, with the entry in r12 and its
// argument in r13 (see `Fiber::prepare`); the entry never returns.
std::arch::global_asm!(
    ".text",
    ".global snella_emu_switch",
    ".type snella_emu_switch,@function",
    ".p2align 4",
    "snella_emu_switch:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov rsp, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size snella_emu_switch, .-snella_emu_switch",
    ".global snella_emu_fiber_start",
    ".type snella_emu_fiber_start,@function",
    ".p2align 4",
    "snella_emu_fiber_start:",
    "mov rdi, r13",
    "call r12",
    "ud2",
    ".size snella_emu_fiber_start, .-snella_emu_fiber_start",
);

extern "C" {
    fn snella_emu_switch(save: *mut *mut u8, next: *mut u8);
    fn snella_emu_fiber_start();
}

/// Switches from the running context (its stack pointer saved into `*save`) to the one saved at `next`.
///
/// # Safety
/// `next` must be a stack pointer saved by this function or prepared by [`Fiber::prepare`], on a live stack.
#[inline]
pub(crate) unsafe fn switch(save: *mut *mut u8, next: *mut u8) {
    snella_emu_switch(save, next)
}

/// Bytes of each fiber's stack: the kernel's frames and the runtime's callbacks (which may format a message).
const STACK_BYTES: usize = 128 << 10;
const PAGE: usize = 4096;

/// One fiber stack: an anonymous mapping whose lowest page is a guard, so an overflow faults instead of
/// writing into a neighbour. Pages are only backed once touched.
pub(crate) struct Fiber {
    base: *mut u8,
    len: usize,
    /// The saved stack pointer while the fiber is switched out.
    pub(crate) sp: *mut u8,
}

impl Fiber {
    pub(crate) fn new() -> Fiber {
        let len = STACK_BYTES + PAGE;
        // SAFETY: a fresh private anonymous mapping; the guard page is made inaccessible before any use.
        let base = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            assert!(p != libc::MAP_FAILED, "emulated device: cannot map a fiber stack of {len} bytes");
            libc::mprotect(p, PAGE, libc::PROT_NONE);
            p as *mut u8
        };
        Fiber { base, len, sp: std::ptr::null_mut() }
    }

    /// The usable stack range [lo, hi): accesses of a kernel there are its own locals.
    pub(crate) fn range(&self) -> (usize, usize) {
        (self.base as usize + PAGE, self.base as usize + self.len)
    }

    /// Makes the next switch to this fiber call `entry(arg)` on a fresh stack. `entry` must never return (it
    /// ends by switching away for good).
    /// `color` staggers the stack tops: stacks a fixed 132 KiB apart would put every fiber's top in the same
    /// cache set, and a switch between 256 fibers would miss the L1 cache every time.
    pub(crate) fn prepare(&mut self, entry: extern "C" fn(*mut c_void) -> !, arg: *mut c_void, color: usize) {
        // The layout that snella_emu_switch pops: r15, r14, r13, r12, rbx, rbp, return address. After the `ret`
        // the stack pointer is `top`, 16-byte aligned, as snella_emu_fiber_start's call needs.
        let top = (self.base as usize + self.len - (color * 320) % PAGE) & !63;
        let frame = (top - 56) as *mut u64;
        // SAFETY: the 56 bytes below `top` lie inside this fiber's mapping.
        unsafe {
            frame.write(0); // r15
            frame.add(1).write(0); // r14
            frame.add(2).write(arg as u64); // r13: the entry's argument
            frame.add(3).write(entry as usize as u64); // r12: the entry
            frame.add(4).write(0); // rbx
            frame.add(5).write(0); // rbp
            frame.add(6).write(snella_emu_fiber_start as *const () as u64); // "return" address
        }
        self.sp = frame as *mut u8;
    }
}

impl Drop for Fiber {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used by anyone.
        unsafe {
            libc::munmap(self.base as *mut c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static MAIN_SP: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
        static FIBER: Cell<*mut Fiber> = const { Cell::new(std::ptr::null_mut()) };
        static LOG: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn yield_to_main() {
        let f = FIBER.get();
        // SAFETY: the fiber saves its own stack pointer and resumes the main context saved in MAIN_SP.
        unsafe { switch(&mut (*f).sp, MAIN_SP.get()) }
    }

    extern "C" fn body(arg: *mut c_void) -> ! {
        let n = arg as usize as u32;
        for i in 0..3 {
            // Floating point across switches: the callee-saved registers carry the loop state.
            let x = (i as f64 + 0.5).sqrt();
            LOG.with(|l| l.borrow_mut().push(n * 100 + i + (x * 0.0) as u32));
            yield_to_main();
        }
        LOG.with(|l| l.borrow_mut().push(n * 100 + 99));
        let f = FIBER.get();
        // SAFETY: leaves for good; the main context never switches back to an ended fiber.
        unsafe { switch(&mut (*f).sp, MAIN_SP.get()) };
        unreachable!()
    }

    #[test]
    fn two_fibers_interleave_and_end() {
        let mut fibers = [Fiber::new(), Fiber::new()];
        for (i, f) in fibers.iter_mut().enumerate() {
            f.prepare(body, (i + 1) as *mut c_void, i);
        }
        for _round in 0..4 {
            for f in fibers.iter_mut() {
                FIBER.set(f);
                // SAFETY: switches into a prepared or suspended fiber, which switches back to MAIN_SP.
                unsafe { switch(MAIN_SP.with(|m| m.as_ptr()), f.sp) };
            }
        }
        let log = LOG.with(|l| l.borrow().clone());
        assert_eq!(log, [100, 200, 101, 201, 102, 202, 199, 299]);
    }
}

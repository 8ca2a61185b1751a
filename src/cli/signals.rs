//! Signals, the same for every command (README, exit codes):
//! - SIGINT, SIGTERM, SIGHUP set a stop flag that long work polls (between prefill chunks,
//!   per generated token, per downloaded block, between benchmark phases); the command then
//!   ends its output with a newline and exits 128 + the signal (130, 143, 129). A second
//!   signal before the command stopped exits at once, the same way.
//! - SIGBUS inside a mapped model file (it shrank or was replaced while in use) is reported
//!   as one line naming the file, exit 1, instead of a silent crash.
//!
//! The handlers only touch the atomics below and call `write`, `unlink` and `_exit`, which
//! are async-signal-safe. This is process-wide state by nature (a signal has no receiver
//! but the process), kept to these few values.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// stdout holds a line without its newline (the forced exits end it).
static LINE_OPEN: AtomicBool = AtomicBool::new(false);
/// Nothing would be lost by exiting at the first signal (see `AtOnce`).
static AT_ONCE: AtomicBool = AtomicBool::new(false);

/// While alive, the first signal exits at once instead of setting the flag: for work that
/// has nothing to save and stops only at coarse boundaries (a one-shot prefill, whose chunk
/// can take seconds on the real model).
pub struct AtOnce(());

impl AtOnce {
    pub fn new() -> AtOnce {
        AT_ONCE.store(true, Ordering::SeqCst);
        // A signal that arrived just before: honour it now.
        if let Some(sig) = received() {
            exit_now(sig);
        }
        AtOnce(())
    }
}

impl Default for AtOnce {
    fn default() -> AtOnce {
        AtOnce::new()
    }
}

impl Drop for AtOnce {
    fn drop(&mut self) {
        AT_ONCE.store(false, Ordering::SeqCst);
    }
}

/// End an open line, remove half-written temp files, exit 128 + `sig` (async-signal-safe).
fn exit_now(sig: i32) -> ! {
    crate::fsutil::remove_pending_temps();
    end_open_line();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(exit_code(sig)) }
}

/// The exit code after signal `sig`, as shells report it.
pub fn exit_code(sig: i32) -> i32 {
    128 + sig
}

/// The flag set by SIGINT/SIGTERM/SIGHUP.
pub fn stop_flag() -> &'static AtomicBool {
    &STOP
}

/// The signal that set the flag, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Forget an interrupt that was handled (the chat goes on after Ctrl+C stops an answer).
pub fn clear() {
    RECEIVED.store(0, Ordering::SeqCst);
    STOP.store(false, Ordering::SeqCst);
}

/// Say whether stdout's last line is still open (written without its newline).
pub fn line_open(open: bool) {
    LINE_OPEN.store(open, Ordering::Relaxed);
}

/// The error a command returns when a signal stopped it; `main` turns it into the exit code.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by signal {0}")]
pub struct Interrupted(pub i32);

/// `Err(Interrupted)` if a signal asked to stop.
pub fn check() -> Result<(), Interrupted> {
    match received() {
        Some(s) => Err(Interrupted(s)),
        None => Ok(()),
    }
}

fn write_fd(fd: i32, bytes: &[u8]) {
    // SAFETY: write(2) from a valid buffer; async-signal-safe.
    unsafe {
        libc::write(fd, bytes.as_ptr().cast(), bytes.len());
    }
}

fn end_open_line() {
    if LINE_OPEN.load(Ordering::Relaxed) {
        write_fd(1, b"\n");
    }
}

extern "C" fn on_stop_signal(sig: libc::c_int) {
    let first = RECEIVED
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    STOP.store(true, Ordering::SeqCst);
    if !first || AT_ONCE.load(Ordering::SeqCst) {
        // Asked again (or nothing to save): stop now. What was written is on its way already
        // (stdout is flushed per piece).
        exit_now(sig);
    }
}

extern "C" fn on_bus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    match crate::model::mapped::file_at(addr) {
        Some(path) => {
            end_open_line();
            write_fd(2, b"error: ");
            // SAFETY: a registered, live NUL-terminated path.
            let len = unsafe { libc::strlen(path) };
            // SAFETY: `len` bytes at `path` are the path.
            write_fd(2, unsafe {
                std::slice::from_raw_parts(path.cast::<u8>(), len)
            });
            write_fd(
                2,
                b": the file shrank or was replaced while dsflash was using it; run again once it is complete\n",
            );
            crate::fsutil::remove_pending_temps();
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(1) };
        }
        None => {
            // Not ours: the default action (the fault repeats on return).
            // SAFETY: resetting a disposition; async-signal-safe.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Install the handlers (once, at start-up). Without them the defaults stay.
pub fn install() {
    // SAFETY: sigaction with handlers that only use async-signal-safe calls; the struct is
    // zeroed then filled.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            // No SA_RESTART: a blocking read (a stalled download) returns at once, and the
            // command sees the flag.
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction =
            on_bus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

//! A closed standard output ends the process quietly, as it ends `cat` or `grep`
//! (`softprompt tokenize ... | head -c 100`), instead of a panic from `println!`.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe returns an error that `println!` turns into
//! a panic. The commands that print restore the default action: the process ends at the first
//! write nobody reads. The server keeps SIGPIPE ignored (a client that hangs up is an error on
//! one socket, not the end of the server).

/// Restores SIGPIPE's default action (Unix with glibc; elsewhere nothing changes). Call it
/// first in `main`, before other threads exist.
pub fn end_quietly_on_closed_stdout() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: setting a signal's disposition to SIG_DFL before any other thread runs; no
    // handler code is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

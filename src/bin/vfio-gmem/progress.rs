//! A spinner on stderr for long operations, shown only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `f`; while it runs, stderr (if a terminal) shows `message`, a spinner and the
/// elapsed time. The line is cleared when `f` returns.
pub fn with_spinner<T>(message: &str, f: impl FnOnce() -> T) -> T {
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let msg = message.to_string();
    let spinner = std::thread::spawn(move || {
        let t0 = Instant::now();
        let frames = ['|', '/', '-', '\\'];
        let mut i = 0;
        // Quick operations never show anything.
        std::thread::sleep(Duration::from_millis(300));
        while !flag.load(Ordering::Acquire) {
            eprint!(
                "\r{} {msg} {:.1}s ",
                frames[i % frames.len()],
                t0.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        if i > 0 {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    });
    let out = f();
    done.store(true, Ordering::Release);
    let _ = spinner.join();
    out
}

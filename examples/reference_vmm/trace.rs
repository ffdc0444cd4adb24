//! Sees what reached the kernel: the library logs each successful map, unmap, attribute
//! and discard call at `debug` level (target `vfio_gmem::dma::exec`) in the order issued.
//! This logger prints those as story lines and keeps them so the VMM can check the order.
//! Warnings from anywhere go to stderr.

use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

const EXEC: &str = "vfio_gmem::dma::exec";

static CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Trace;

impl Log for Trace {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= Level::Warn || (m.level() <= Level::Debug && m.target() == EXEC)
    }
    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        if r.level() <= Level::Warn {
            eprintln!("{}: {}", r.level(), r.args());
        } else {
            let call = r.args().to_string();
            println!("{:<8} {call}", "kernel");
            CALLS.lock().unwrap().push(call);
        }
    }
    fn flush(&self) {}
}

static TRACE: Trace = Trace;

/// Installs the logger (once).
pub fn install() {
    if log::set_logger(&TRACE).is_ok() {
        log::set_max_level(LevelFilter::Debug);
    }
}

/// The kernel calls since the last `take`, in order.
pub fn take() -> Vec<String> {
    std::mem::take(&mut *CALLS.lock().unwrap())
}

/// Records a call the VMM itself made (a listener's), in order with the kernel's.
pub fn note(call: String) {
    println!("{:<8} {call}", "listener");
    CALLS.lock().unwrap().push(call);
}

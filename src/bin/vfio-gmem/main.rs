//! `vfio-gmem`: the command line. Uses only the library's public API.

fn main() {
    println!("vfio-gmem {}", env!("CARGO_PKG_VERSION"));
}

//! Embeds the eBPF object that `cargo xtask build` produced (see xtask). The BPF
//! crate needs Debian's rustc and bpf-linker, so it is not built from here; a
//! build without it embeds an empty object and the daemon says how to fix that.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=OBSERVER_EBPF_OBJ");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let src = env::var_os("OBSERVER_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/bpfel-unknown-none/release/observer-ebpf"));
    let dst = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("observer-ebpf.o");
    println!("cargo::rerun-if-changed={}", src.display());
    match fs::read(&src) {
        Ok(obj) => fs::write(&dst, obj).expect("writing OUT_DIR/observer-ebpf.o"),
        Err(_) => {
            println!(
                "cargo::warning=no eBPF object at {}: run `cargo xtask build`",
                src.display()
            );
            fs::write(&dst, []).expect("writing OUT_DIR/observer-ebpf.o");
        }
    }
}

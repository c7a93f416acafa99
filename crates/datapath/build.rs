//! Compiles the eBPF C programs in bpf/ into OUT_DIR so src/bpf embeds them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest_dir.join("../../bpf");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    println!("cargo:rerun-if-env-changed=FERRUM_CLANG");

    let clang = std::env::var("FERRUM_CLANG").unwrap_or_else(|_| "clang".to_string());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&bpf_dir)
        .unwrap_or_else(|e| {
            panic!(
                "cannot read the eBPF source directory {}: {e}",
                bpf_dir.display()
            )
        })
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "c"))
        .collect();
    sources.sort();
    for entry in std::fs::read_dir(&bpf_dir).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    for source in &sources {
        compile(&clang, &bpf_dir, source, &out_dir);
    }
}

fn compile(clang: &str, include_dir: &Path, source: &Path, out_dir: &Path) {
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("C source names are UTF-8");
    let object = out_dir.join(format!("{stem}.o"));
    let output = Command::new(clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-I{}", include_dir.display()))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&object)
        .output();
    match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "clang not found (tried `{clang}`): the eBPF programs need clang >= 14 and libbpf-dev \
             (Debian: apt-get install clang libbpf-dev), or set FERRUM_CLANG to a clang binary"
        ),
        Err(e) => panic!("cannot run `{clang}` to compile {}: {e}", source.display()),
        Ok(out) if !out.status.success() => panic!(
            "clang failed to compile {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
}

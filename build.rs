//! Compiles `cuda/*.cu` to PTX with nvcc when the `cuda` feature is on (honouring
//! `CUDA_COMPUTE_CAP`, default 90) and writes `$OUT_DIR/ptx.rs` with one `&str` constant per
//! file. A CPU build never runs nvcc.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let mut entries: Vec<PathBuf> = std::fs::read_dir("cuda")
        .expect("cuda/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    entries.sort();
    let mut consts = String::new();
    for src in entries {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = std::process::Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-Icuda")
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} (source scripts/cuda-toolchain.sh's env first): {e}")
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
        consts.push_str(&format!(
            "pub const {}: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\"));\n",
            stem.to_uppercase()
        ));
    }
    std::fs::write(out.join("ptx.rs"), consts).expect("write ptx.rs");
}

//! The `kiln-scheduler` binary: it takes the farm's config and refuses a bad one by name.

use std::process::Command;

#[test]
fn the_scheduler_binary_prints_its_config_and_names_a_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-scheduler"))
        .args(["--print-config", "--workers", "3", "--data-dir"])
        .arg(dir.path())
        .env_remove("KILN_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[scheduler]") && text.contains("workers = 3"), "{text}");
    let bad = Command::new(env!("CARGO_BIN_EXE_kiln-scheduler"))
        .args(["--data-dir"])
        .arg(dir.path())
        .env("KILN_LISTEN", "nowhere")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("KILN_LISTEN"));
}

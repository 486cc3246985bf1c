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

#[test]
fn print_config_shows_the_database_and_broker_without_their_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-scheduler"))
        .args(["--print-config", "--data-dir"])
        .arg(dir.path())
        .env_remove("KILN_CONFIG")
        .env("KILN_DATABASE_URL", "postgres://kiln:hunter2@db.lan/kiln")
        .env("KILN_AMQP_URL", "amqp://worker:hunter2@mq.lan:5672/%2f")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("postgres://kiln:***@db.lan/kiln"), "{text}");
    assert!(text.contains("amqp://worker:***@mq.lan:5672/%2f"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

//! The `kiln-edge` binary's front door: a bad config fails before anything connects, naming the
//! key; `--print-config` shows what will be used, secrets hidden.

use std::process::Command;

fn edge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln-edge"));
    c.env_remove("KILN_EDGE_TOKEN").env_remove("KILN_EDGE_MQTT_URL").env_remove("KILN_EDGE_CONFIG");
    c
}

#[test]
fn a_bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        "data_dir = \"/tmp/x\"\n[scheduler]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\n\
         [[device]]\nid = \"p1\"\nkind = \"printer\"\nfolder = \"/tmp/spool\"\n",
    )
    .unwrap();
    let out = edge().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("device[0] (p1): modbus"), "{err}");
    let out = edge().arg("--config").arg(dir.path().join("missing.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn print_config_shows_the_environment_and_hides_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        "data_dir = \"/tmp/x\"\n[scheduler]\nurl = \"http://127.0.0.1:1\"\ntoken = \"kiln_secret\"\n\
         [[device]]\nid = \"d1\"\nkind = \"display\"\nfolder = \"/tmp/show\"\n",
    )
    .unwrap();
    let out = edge()
        .arg("--config")
        .arg(&path)
        .arg("--print-config")
        .env("KILN_EDGE_MQTT_URL", "mqtt://10.1.2.3:1884")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mqtt://10.1.2.3:1884") && !text.contains("kiln_secret"), "{text}");
}

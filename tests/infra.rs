//! The operator's files in `infra/`, kept true to the code: each example config in `infra/config`
//! loads in its binary (`--print-config`), with its commented-out keys set too, and names every key
//! the binary knows, so a new setting fails here until the example documents it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::tool_runs;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A binary built next to `kiln` by `cargo test --workspace`.
fn binary(name: &str) -> Command {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_kiln")).with_file_name(name);
    assert!(exe.is_file(), "{} is not built (cargo test --workspace builds it)", exe.display());
    let mut c = Command::new(exe);
    // Only the file speaks: no variable of the machine running the tests.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KILN_")) {
        c.env_remove(k);
    }
    c.env("KILN_LOG", "warn");
    c
}

/// The example with its commented-out settings set: each line `# key = …`, `# [table]` or
/// `# [[array]]` loses its `# `. Prose stays a comment (a line such as `#   or serial = …`
/// names an alternative, not a setting).
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.starts_with('[') || is_setting(rest) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_setting(line: &str) -> bool {
    let Some((key, _)) = line.split_once('=') else { return false };
    let key = key.trim_end();
    !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Every key of a TOML document as a dotted path: a table's keys under its name, an array of
/// tables' under its name (whatever the index), a value (an empty table too) as a leaf.
fn keys(doc: &toml::Table) -> BTreeSet<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
        match v {
            toml::Value::Table(t) if !t.is_empty() => {
                for (k, v) in t {
                    walk(&format!("{prefix}.{k}"), v, out);
                }
            }
            toml::Value::Array(a) if !a.is_empty() && a.iter().all(toml::Value::is_table) => {
                for v in a {
                    walk(prefix, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    for (k, v) in doc {
        walk(k, v, &mut out);
    }
    out
}

/// What `cmd` prints for `--print-config` of `file` (it must succeed), parsed.
fn printed(mut cmd: Command, file: &Path) -> toml::Table {
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} does not load: {stderr}", file.display());
    stdout.parse().unwrap_or_else(|e| panic!("{}: --print-config printed no TOML: {e}\n{stdout}", file.display()))
}

/// Checks one example: it loads as it is and with its commented settings set, and every key the
/// binary prints for the latter is in it. `cmd` makes the binary's command for a config file.
fn check_example(name: &str, cmd: impl Fn(&Path) -> Command) {
    let path = root().join("infra/config").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    printed(cmd(&path), &path);
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join(name);
    let all_text = uncommented(&text);
    std::fs::write(&all, &all_text).unwrap();
    let known = keys(&printed(cmd(&all), &all));
    let written = keys(&all_text.parse().unwrap_or_else(|e| panic!("{name} uncommented is not TOML: {e}")));
    let missing: Vec<&String> = known.difference(&written).collect();
    assert!(missing.is_empty(), "infra/config/{name} does not name these keys its binary knows: {missing:?}");
    // Sanity of the check itself: the example names its binary's well-known keys.
    assert!(known.len() > 10 && written.contains("data_dir"), "{known:?}");
}

#[test]
fn the_scheduler_example_config_loads_and_names_every_key() {
    check_example("scheduler.toml", |file| {
        let mut c = binary("kiln-scheduler");
        c.arg("--config").arg(file).arg("--print-config");
        c
    });
}

#[test]
fn the_worker_example_config_loads_and_names_every_key() {
    check_example("worker.toml", |file| {
        let mut c = binary("kiln-worker");
        // The example leaves the token to the environment, as a service's EnvironmentFile would.
        c.env("KILN_WORKER_TOKEN", "kiln_example").arg("--config").arg(file).args(["run", "--print-config"]);
        c
    });
}

#[test]
fn the_edge_example_config_loads_and_names_every_key() {
    check_example("edge.toml", |file| {
        let mut c = binary("kiln-edge");
        c.arg("--config").arg(file).arg("--print-config");
        c
    });
}

#[test]
fn the_key_check_finds_a_key_an_example_leaves_out() {
    let written: toml::Table = "a = 1\n[t]\nb = 2\n".parse().unwrap();
    let known: toml::Table = "a = 1\n[t]\nb = 2\nc = 3\n[[d]]\ne = 1\n[[d]]\ne = 2\n".parse().unwrap();
    let missing: Vec<String> = keys(&known).difference(&keys(&written)).cloned().collect();
    assert_eq!(missing, ["d.e", "t.c"]);
    assert_eq!(uncommented("# a = 1\n#   or b = 2\n# [t]\n# prose here"), "a = 1\n#   or b = 2\n[t]\n# prose here");
}

fn promtool() -> bool {
    tool_runs("promtool", "prometheus")
}

/// The string constants in the Rust sources under `dirs` (a metric's name, an environment
/// variable's: `"kiln_…"`, `"KILN_…"`).
fn source_strings(dirs: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in dirs {
        let mut files = vec![root().join(dir)];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.extend(text.split('"').skip(1).step_by(2).map(str::to_owned));
            }
        }
    }
    out
}

/// Runs `promtool ARGS` in `infra/prometheus`; it must succeed.
fn run_promtool(args: &[&str]) {
    let out = Command::new("promtool").args(args).current_dir(root().join("infra/prometheus")).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
}

#[test]
fn the_alert_rules_and_the_scrape_config_pass_promtool() {
    if !promtool() {
        return;
    }
    run_promtool(&["check", "rules", "alerts.yml"]);
    run_promtool(&["test", "rules", "alerts_test.yml"]);
    run_promtool(&["check", "config", "prometheus.yml"]);
}

/// The `kiln_…` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kiln_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn every_metric_an_alert_or_a_dashboard_names_is_one_kiln_exports() {
    let exported: BTreeSet<String> = source_strings(&["scheduler/src", "worker/src", "edge-agent/src"])
        .into_iter()
        .filter(|piece| piece.starts_with("kiln_") && metric_names(piece).contains(piece))
        .collect();
    assert!(exported.contains("kiln_workers") && exported.contains("kiln_job_queue_wait_seconds"), "{exported:?}");
    let mut files = vec![root().join("infra/prometheus/alerts.yml")];
    let dashboards = root().join("infra/grafana/dashboards");
    files.extend(std::fs::read_dir(dashboards).unwrap().map(|e| e.unwrap().path()));
    for file in files {
        let named = metric_names(&std::fs::read_to_string(&file).unwrap());
        assert!(named.len() >= 5, "{}: {named:?}", file.display());
        let unknown: Vec<&String> = named
            .iter()
            .filter(|n| {
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| n.strip_suffix(s)).unwrap_or(n);
                !exported.contains(*n) && !exported.contains(base)
            })
            .collect();
        assert!(unknown.is_empty(), "{} names metrics Kiln does not export: {unknown:?}", file.display());
    }
}

#[test]
fn every_alert_has_a_runbook_in_the_readme() {
    let alerts = std::fs::read_to_string(root().join("infra/prometheus/alerts.yml")).unwrap();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let headings: BTreeSet<String> =
        readme.lines().filter_map(|l| l.strip_prefix("#### ")).map(|h| h.trim().to_lowercase()).collect();
    let mut names = Vec::new();
    for line in alerts.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            names.push(name.to_owned());
        } else if let Some(link) = line.strip_prefix("runbook: ") {
            let name = names.last().expect("a runbook follows its alert");
            assert_eq!(link.trim_matches('"'), format!("README.md#{}", name.to_lowercase()), "{name}'s runbook link");
        }
    }
    assert!(names.len() >= 5, "{names:?}");
    let missing: Vec<&String> = names.iter().filter(|n| !headings.contains(&n.to_lowercase())).collect();
    assert!(missing.is_empty(), "alerts without a `#### NAME` runbook in the README: {missing:?}");
}

/// Each unit in `infra/systemd` passes `systemd-analyze verify`, runs a binary Kiln builds with
/// a config in `/etc/kiln`, and is hardened as the README promises. `verify` checks that the
/// command exists, so each unit is verified with its `/usr/local/bin/…` pointed at the binary
/// this build made (everything else as shipped).
#[test]
fn the_systemd_units_verify_and_are_hardened() {
    if !tool_runs("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut units = 0;
    for entry in std::fs::read_dir(root().join("infra/systemd")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(bin) = name.strip_suffix(".service") else { continue };
        units += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart");
        assert!(exec.starts_with(&format!("/usr/local/bin/{bin} ")), "{name}: {exec}");
        assert!(
            exec.contains(&format!("--config /etc/kiln/{}.toml", bin.trim_start_matches("kiln-"))),
            "{name}: {exec}"
        );
        for setting in [
            "NoNewPrivileges=true",
            "ProtectSystem=strict",
            "ProtectHome=true",
            "PrivateTmp=true",
            "CapabilityBoundingSet=",
            &format!("StateDirectory={}", if bin == "kiln-scheduler" { "kiln" } else { bin }),
        ] {
            assert!(text.lines().any(|l| l == setting), "{name} lacks {setting}");
        }
        let user = text.lines().find_map(|l| l.strip_prefix("User=")).expect("its own user");
        assert!(user != "root" && !user.is_empty(), "{name}: User={user}");
        let built = PathBuf::from(env!("CARGO_BIN_EXE_kiln")).with_file_name(bin);
        assert!(built.is_file(), "{} is not built", built.display());
        let unit = dir.path().join(&name);
        std::fs::write(&unit, text.replace(&format!("/usr/local/bin/{bin}"), &built.to_string_lossy())).unwrap();
        let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {name}:\n{said}");
    }
    assert_eq!(units, 3, "kiln-scheduler, kiln-worker and kiln-edge");
}

/// `infra/install/*.sh --root DIR` lays a box out as its unit and config say: the binary, the
/// unit as shipped, the config with the box's settings (it loads in its binary, the secrets from
/// the env file beside it), the secrets readable by root only, the state folder. A second run
/// without secrets keeps the config and the secrets.
#[test]
fn the_install_scripts_lay_out_a_box_whose_config_loads() {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |p: &Path| std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777;
    let env_of = |file: &Path| -> Vec<(String, String)> {
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };
    let install = |script: &str, args: &[&str]| {
        let out = Command::new("bash").arg(root().join("infra/install").join(script)).args(args).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{script} {args:?}:\n{said}");
        said
    };
    let built =
        |name: &str| PathBuf::from(env!("CARGO_BIN_EXE_kiln")).with_file_name(name).to_string_lossy().into_owned();

    // A GPU box.
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().to_str().unwrap();
    let bin = built("kiln-worker");
    let args = [
        "--root",
        r,
        "--binary",
        &bin,
        "--name",
        "gpu-box-7",
        "--scheduler-url",
        "http://sched.lan:7878",
        "--amqp-url",
        "amqp://gpu-box-7:s3cret@broker.lan:5672/%2f",
        "--token",
        "kiln_box7",
        "--tiers",
        "preview,final",
        "--metrics-listen",
        "0.0.0.0:9464",
    ];
    let said = install("worker.sh", &args);
    assert!(said.contains("GPU and Vulkan"), "{said}");
    let at = |p: &str| dir.path().join(p);
    assert_eq!(mode(&at("usr/local/bin/kiln-worker")), 0o755);
    assert_eq!(
        std::fs::read(at("etc/systemd/system/kiln-worker.service")).unwrap(),
        std::fs::read(root().join("infra/systemd/kiln-worker.service")).unwrap()
    );
    assert_eq!(mode(&at("etc/kiln/worker.env")), 0o600);
    assert_eq!(mode(&at("var/lib/kiln-worker")), 0o750);
    let env = env_of(&at("etc/kiln/worker.env"));
    assert!(env.contains(&("KILN_WORKER_TOKEN".into(), "kiln_box7".into())), "{env:?}");
    let config = std::fs::read_to_string(at("etc/kiln/worker.toml")).unwrap();
    assert!(!config.contains("s3cret"), "the broker's password stays in worker.env: {config}");
    let mut cmd = binary("kiln-worker");
    cmd.envs(env).arg("--config").arg(at("etc/kiln/worker.toml")).args(["run", "--print-config"]);
    let worker = printed(cmd, &at("etc/kiln/worker.toml"));
    let run = worker["run"].as_table().unwrap();
    assert_eq!(run["worker_id"].as_str(), Some("gpu-box-7"));
    assert_eq!(run["scheduler_url"].as_str(), Some("http://sched.lan:7878"));
    assert_eq!(run["metrics_listen"].as_str(), Some("0.0.0.0:9464"));
    let tiers: Vec<&str> = run["tiers"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tiers, ["preview", "final"]);
    assert_eq!(run["amqp_url"].as_str(), Some("amqp://gpu-box-7:***@broker.lan:5672/%2f"));
    assert_eq!(worker["data_dir"].as_str(), Some("/var/lib/kiln-worker"), "the unit's StateDirectory");
    // Again, to upgrade: the config (edited meanwhile) and the secrets are kept.
    std::fs::write(at("etc/kiln/worker.toml"), config.replace("# concurrency = 1", "concurrency = 3")).unwrap();
    let said = install("worker.sh", &["--root", r, "--binary", &bin]);
    assert!(said.contains("keeping"), "{said}");
    assert!(std::fs::read_to_string(at("etc/kiln/worker.toml")).unwrap().contains("concurrency = 3"));
    assert_eq!(env_of(&at("etc/kiln/worker.env")).len(), 2);
    // A mistake is named.
    let out = Command::new("bash")
        .arg(root().join("infra/install/worker.sh"))
        .args(["--root", r, "--binary", "/nonexistent/kiln-worker"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--binary /nonexistent/kiln-worker"));

    // A Pi.
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().to_str().unwrap();
    let bin = built("kiln-edge");
    let args = [
        "--root",
        r,
        "--binary",
        &bin,
        "--name",
        "studio-pi",
        "--mqtt-url",
        "mqtt://10.0.0.2:1883",
        "--scheduler-url",
        "http://10.0.0.2:7878",
        "--token",
        "kiln_pi",
        "--mqtt-password",
        "pw-pi",
    ];
    install("pi.sh", &args);
    let at = |p: &str| dir.path().join(p);
    assert_eq!(mode(&at("usr/local/bin/kiln-edge")), 0o755);
    assert_eq!(mode(&at("etc/kiln/edge.env")), 0o600);
    assert_eq!(mode(&at("var/lib/kiln-edge")), 0o750);
    assert_eq!(
        std::fs::read(at("etc/systemd/system/kiln-edge.service")).unwrap(),
        std::fs::read(root().join("infra/systemd/kiln-edge.service")).unwrap()
    );
    let mut cmd = binary("kiln-edge");
    cmd.envs(env_of(&at("etc/kiln/edge.env"))).arg("--config").arg(at("etc/kiln/edge.toml")).arg("--print-config");
    let edge = printed(cmd, &at("etc/kiln/edge.toml"));
    assert_eq!(edge["mqtt"]["url"].as_str(), Some("mqtt://10.0.0.2:1883"));
    assert_eq!(edge["mqtt"]["username"].as_str(), Some("studio-pi"));
    assert_eq!(edge["scheduler"]["url"].as_str(), Some("http://10.0.0.2:7878"));
    assert_eq!(edge["data_dir"].as_str(), Some("/var/lib/kiln-edge"), "the unit's StateDirectory");
    let text = std::fs::read_to_string(at("etc/kiln/edge.toml")).unwrap();
    assert!(!text.contains("kiln_pi") && !text.contains("pw-pi"), "the secrets stay in edge.env");
}

/// `kiln-worker doctor` with nothing to reach: the render passes, the scheduler and the broker
/// fail on lines of their own that say what to set, and it exits non-zero.
#[test]
fn the_doctor_names_what_it_cannot_reach() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let data = tempfile::tempdir().unwrap();
    let out = binary("kiln-worker")
        .arg("doctor")
        .env("KILN_DATA_DIR", data.path())
        .env("KILN_BACKEND", "cpu")
        .env("KILN_THREADS", "1")
        .env("KILN_SCHEDULER_URL", format!("http://127.0.0.1:{closed}"))
        .env("KILN_AMQP_URL", format!("amqp://box:hush@127.0.0.1:{closed}/%2f"))
        .env("KILN_WORKER_TOKEN", "kiln_not_checked_here")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    let line = |check: &str| said.lines().find(|l| l.split_whitespace().nth(1) == Some(check)).unwrap_or_default();
    assert!(line("render").starts_with("ok") && line("render").contains("Mpx/s"), "{said}");
    assert!(line("backend").starts_with("warn") && line("backend").contains("cpu"), "{said}");
    assert!(line("scheduler").starts_with("FAIL") && line("scheduler").contains("KILN_SCHEDULER_URL"), "{said}");
    assert!(line("broker").starts_with("FAIL") && line("broker").contains("KILN_AMQP_URL"), "{said}");
    assert!(line("token").starts_with("ok"), "{said}");
    assert!(!said.contains("hush"), "the password is not shown: {said}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 check(s) failed"));
    assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 0, "the doctor's render lands nowhere of the worker's");
}

/// The `KILN_*` names Kiln's binaries read: each is a string constant in their sources (the
/// config loaders' `env("KILN_…")`, clap's `env = "KILN_…"`).
fn kiln_env_names() -> BTreeSet<String> {
    source_strings(&["scheduler/src", "worker/src", "edge-agent/src", "common/src", "src"])
        .into_iter()
        .filter(|p| p.starts_with("KILN_") && p.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect()
}

/// `infra/compose.yaml`, read by its shape: the services, each with its `environment` keys, its
/// mounted repository paths and its published ports.
#[derive(Debug, Default)]
struct ComposeService {
    env: BTreeMap<String, String>,
    mounts: Vec<String>,
    ports: Vec<String>,
}

fn compose_services(text: &str) -> BTreeMap<String, ComposeService> {
    let mut services: BTreeMap<String, ComposeService> = BTreeMap::new();
    let (mut section, mut service, mut key) = (String::new(), String::new(), String::new());
    let mut anchored: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()) {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        match indent {
            0 => (section, service, key) = (t.trim_end_matches(':').to_owned(), String::new(), String::new()),
            2 if section == "services" => {
                service = t.trim_end_matches(':').to_owned();
                services.entry(service.clone()).or_default();
            }
            2 if section.starts_with("x-kiln-env") => {
                if let Some((k, v)) = t.split_once(": ") {
                    anchored.insert(k.to_owned(), v.to_owned());
                }
            }
            4 if !service.is_empty() => key = t.split(':').next().unwrap().to_owned(),
            6 if !service.is_empty() => {
                let s = services.get_mut(&service).unwrap();
                match key.as_str() {
                    "environment" if t == "<<: *kiln-env" => s.env.extend(anchored.clone()),
                    "environment" => {
                        let (k, v) = t.split_once(": ").unwrap_or_else(|| panic!("{service}: {t}"));
                        s.env.insert(k.to_owned(), v.to_owned());
                    }
                    "volumes" => s.mounts.push(t.trim_start_matches("- ").to_owned()),
                    "ports" => s.ports.push(t.trim_start_matches("- ").trim_matches('"').to_owned()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    services
}

/// The compose stack and its Dockerfile point at what exists: every file it mounts, the
/// Dockerfile's profile and binaries; the Kiln services use only names the binaries read, and the
/// ports agree from end to end (the scheduler's listen address, what it publishes, what Prometheus
/// scrapes, what Grafana asks). No Docker engine runs here, so the stack itself is not started.
#[test]
fn the_compose_stack_names_only_what_exists() {
    let infra = root().join("infra");
    let text = std::fs::read_to_string(infra.join("compose.yaml")).unwrap();
    let services = compose_services(&text);
    let names: Vec<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(names, ["grafana", "mosquitto", "postgres", "prometheus", "rabbitmq", "scheduler", "worker"]);
    for (name, s) in &services {
        for mount in &s.mounts {
            let Some(rel) = mount.strip_prefix("./") else { continue };
            let path = infra.join(rel.split(':').next().unwrap());
            assert!(path.exists(), "{name} mounts {mount}: {} is not there", path.display());
        }
    }
    let known = kiln_env_names();
    assert!(known.contains("KILN_DATABASE_URL") && known.contains("KILN_WORKER_TOKEN"), "{known:?}");
    for name in ["scheduler", "worker"] {
        let env = &services[name].env;
        assert!(env.len() >= 4, "{name}: {env:?}");
        for k in env.keys() {
            assert!(known.contains(k), "{name} sets {k}, which no Kiln binary reads");
        }
    }
    let port_of = |addr: &str| addr.rsplit(':').next().unwrap().to_owned();
    let sched = &services["scheduler"];
    let listen = port_of(&sched.env["KILN_LISTEN"]);
    assert_eq!(sched.ports, [format!("{listen}:{listen}")]);
    assert!(sched.env["KILN_MQTT_URL"].contains("@mosquitto:1883"));
    assert!(services["mosquitto"].ports.contains(&"1883:1883".to_owned()));
    let worker = &services["worker"];
    assert_eq!(worker.env["KILN_SCHEDULER_URL"], format!("http://scheduler:{listen}"));
    let metrics = port_of(&worker.env["KILN_METRICS_LISTEN"]);
    let scrape = std::fs::read_to_string(infra.join("compose/prometheus.yml")).unwrap();
    assert!(scrape.contains(&format!("\"scheduler:{listen}\"")) && scrape.contains(&format!("\"worker:{metrics}\"")));
    let datasource = std::fs::read_to_string(infra.join("grafana/provisioning/datasources/kiln.yml")).unwrap();
    assert!(datasource.contains("url: http://prometheus:9090") && services["prometheus"].ports == ["9090:9090"]);
    // The worker's start script is sound shell.
    let out = Command::new("sh").arg("-n").arg(infra.join("compose/worker.sh")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The Dockerfile builds the dist profile's binaries, which Cargo.toml has.
    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let cargo: toml::Table = std::fs::read_to_string(root().join("Cargo.toml")).unwrap().parse().unwrap();
    assert!(cargo["profile"]["dist"]["strip"].as_str() == Some("debuginfo"), "{:?}", cargo["profile"]);
    let rust = cargo["workspace"]["package"]["rust-version"].as_str().unwrap();
    assert!(docker.contains(&format!("FROM rust:{rust}-")), "the Dockerfile's Rust is the workspace's {rust}");
    for bin in ["kiln", "kiln-scheduler", "kiln-worker"] {
        assert!(docker.contains(&format!("--bin {bin} ")) || docker.contains(&format!("--bin {bin}\n")), "{bin}");
        assert!(docker.contains(&format!("/src/target/dist/{bin} ")), "{bin} is copied from the dist build");
        assert!(PathBuf::from(env!("CARGO_BIN_EXE_kiln")).with_file_name(bin).is_file(), "{bin} is a binary");
    }
    assert!(docker.contains("--profile dist"));

    // Its Prometheus config passes promtool, with the alerts mounted beside it.
    if promtool() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(infra.join("compose/prometheus.yml"), dir.path().join("prometheus.yml")).unwrap();
        std::fs::copy(infra.join("prometheus/alerts.yml"), dir.path().join("alerts.yml")).unwrap();
        let out =
            Command::new("promtool").args(["check", "config"]).arg(dir.path().join("prometheus.yml")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

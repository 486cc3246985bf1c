//! The operator's dashboards and alerts against the real thing: a Prometheus (Debian's
//! `prometheus`) scrapes a `kiln up` that has rendered, answered from its cache, run device tasks
//! and holds an order waiting for approval, with the alert rules loaded; then **every** PromQL
//! expression in every Grafana panel (`infra/grafana/dashboards`) and alert rule
//! (`infra/prometheus/alerts.yml`) is evaluated through Prometheus's HTTP API and must parse and
//! return at least one series. An alert's comparison is evaluated with `bool`, so a rule that is
//! quiet (as it should be on a healthy farm) still shows that its series exist. `promtool check
//! metrics` lints the farm's `/metrics`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use kiln_common::client::Client;
use kiln_scheduler::auth::Secret;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether Debian's `prometheus` (server and `promtool`) is here; under
/// `KILN_TEST_REQUIRE_SERVICES=1` it must be.
fn prometheus_here() -> bool {
    tool_runs("prometheus", "prometheus") && tool_runs("promtool", "prometheus")
}

/// Every PromQL expression in the dashboards, by where it is (file, panel title, refId).
fn dashboard_exprs() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let dir = root().join("infra/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "json")) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        for p in d["panels"].as_array().unwrap_or_else(|| panic!("{name} has no panels")) {
            let title = p["title"].as_str().unwrap_or_else(|| panic!("{name}: a panel without a title"));
            assert_eq!(p["datasource"]["uid"], "kiln-prometheus", "{name}: {title}'s data source");
            let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{name}: {title} has no targets"));
            assert!(!targets.is_empty(), "{name}: {title} has no targets");
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{name}: {title} has a target without expr"));
                let at = format!("{name}: {} ({})", title, t["refId"].as_str().unwrap_or("?"));
                assert!(out.insert(at.clone(), expr.to_owned()).is_none(), "{at} twice");
            }
        }
    }
    out
}

/// Every alert rule's expression, by alert name.
fn alert_exprs() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("infra/prometheus/alerts.yml")).unwrap();
    let rules: Value = serde_yaml_lite(&text);
    let mut out = BTreeMap::new();
    for group in rules["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            out.insert(r["alert"].as_str().unwrap().to_owned(), r["expr"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// The alert rules as JSON. The rules file is plain YAML of a fixed shape (`- alert:`, then
/// `expr:` on one line or folded with `>-`), read here line by line: no YAML parser for one file
/// (the test above checks every alert is read, and Prometheus itself reads the file below).
fn serde_yaml_lite(text: &str) -> Value {
    let mut rules = Vec::new();
    let mut lines = text.lines().peekable();
    let mut current: Option<(String, String)> = None;
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("- alert: ") {
            if let Some((a, e)) = current.take() {
                rules.push(json!({ "alert": a, "expr": e }));
            }
            current = Some((name.to_owned(), String::new()));
        } else if let Some(expr) = t.strip_prefix("expr: ") {
            let cur = current.as_mut().expect("expr after its alert");
            if expr == ">-" {
                let indent = |l: &str| l.len() - l.trim_start().len();
                let base = indent(line);
                let mut folded = Vec::new();
                while let Some(next) = lines.peek() {
                    if next.trim().is_empty() || indent(next) <= base {
                        break;
                    }
                    folded.push(lines.next().unwrap().trim().to_owned());
                }
                cur.1 = folded.join(" ");
            } else {
                cur.1 = expr.to_owned();
            }
        }
    }
    if let Some((a, e)) = current.take() {
        rules.push(json!({ "alert": a, "expr": e }));
    }
    json!({ "groups": [{ "rules": rules }] })
}

/// `expr` with `bool` after each comparison outside braces and quotes: the comparison then
/// answers 0 or 1 for every series instead of dropping those that do not match.
fn with_bool(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let (mut out, mut depth, mut quoted, mut i) = (String::new(), 0i32, false, 0);
    while i < chars.len() {
        let c = chars[i];
        out.push(c);
        if quoted {
            quoted = c != '"' || chars[i - 1] == '\\';
        } else if c == '"' {
            quoted = true;
        } else if c == '{' {
            depth += 1;
        } else if c == '}' {
            depth -= 1;
        } else if depth == 0 && matches!(c, '>' | '<' | '=' | '!') {
            let next = chars.get(i + 1).copied();
            let two = next == Some('=');
            let is_cmp = matches!(c, '>' | '<') || two;
            if is_cmp {
                if two {
                    out.push('=');
                    i += 1;
                }
                out.push_str(" bool");
            }
        }
        i += 1;
    }
    out
}

/// Series only a worker on an NVIDIA GPU reports (NVML): on the test machine, a panel over
/// them must parse but has nothing to show.
const NVIDIA_ONLY: [&str; 3] = [
    "kiln_worker_heartbeat_gpu_memory_bytes",
    "kiln_worker_heartbeat_gpu_memory_used_bytes",
    "kiln_worker_heartbeat_gpu_utilization_ratio",
];

/// Whether every metric `expr` names is one of [`NVIDIA_ONLY`].
fn nvidia_only(expr: &str) -> bool {
    let named: Vec<&str> =
        expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("kiln_")).collect();
    !named.is_empty() && named.iter().all(|w| NVIDIA_ONLY.contains(w))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus child process with its own data dir; killed when dropped.
struct Prometheus {
    _child: Killed,
    api: Client,
}

impl Prometheus {
    /// Starts one scraping each (job, target) every second, with the alert rules loaded.
    async fn start(dir: &Path, targets: &[(&str, &str)]) -> Prometheus {
        let alerts = root().join("infra/prometheus/alerts.yml");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
            alerts.display()
        );
        for (job, target) in targets {
            config += &format!("  - job_name: {job}\n    static_configs:\n      - targets: [\"{target}\"]\n");
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let out = Command::new("promtool").arg("check").arg("config").arg(&file).output().unwrap();
        assert!(out.status.success(), "promtool check config: {}", String::from_utf8_lossy(&out.stdout));
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus starts");
        let api = Client::new(&format!("http://127.0.0.1:{port}"), None);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if api.send(Method::GET, "/-/ready", None).await.is_ok_and(|r| r.status == 200) {
                break;
            }
            let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
            assert!(Instant::now() < until, "prometheus did not become ready:\n{log}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Prometheus { _child: Killed(vec![child]), api }
    }

    /// Evaluates `expr` now: `Ok(series)` or the error Prometheus gave.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let r = self.api.send(Method::GET, &path, None).await.map_err(|e| e.to_string())?;
        let v: Value =
            serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&r.body)))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

#[test]
fn comparisons_gain_bool_outside_label_matchers() {
    assert_eq!(with_bool(r#"kiln_workers{state="lost"} > 0"#), r#"kiln_workers{state="lost"} > bool 0"#);
    assert_eq!(with_bool(r#"a{x!="1",y=~"b|c"} != 2"#), r#"a{x!="1",y=~"b|c"} != bool 2"#);
    assert_eq!(with_bool("sum by (t) (a) > 0 and on (t) b == 0"), "sum by (t) (a) > bool 0 and on (t) b == bool 0");
    assert_eq!(with_bool("a > on (t) group_left() b"), "a > bool on (t) group_left() b");
    assert_eq!(with_bool("a / b < 0.1"), "a / b < bool 0.1");
}

#[test]
fn only_the_gpu_panels_may_be_empty_without_an_nvidia_gpu() {
    assert!(nvidia_only("max by (worker) (kiln_worker_heartbeat_gpu_memory_used_bytes)"));
    assert!(!nvidia_only("kiln_worker_heartbeat_gpu_memory_used_bytes / kiln_workers"));
    assert!(!nvidia_only("sum(kiln_workers)"));
    let gpu_panels = dashboard_exprs().into_values().filter(|e| nvidia_only(e)).count();
    assert_eq!(gpu_panels, 3, "the workers dashboard's GPU memory (used, size) and load");
}

#[test]
fn the_rules_file_is_read_whole() {
    let alerts = alert_exprs();
    let text = std::fs::read_to_string(root().join("infra/prometheus/alerts.yml")).unwrap();
    assert_eq!(alerts.len(), text.matches("- alert: ").count());
    assert!(alerts.values().all(|e| !e.is_empty() && !e.contains(">-")), "{alerts:#?}");
    assert!(alerts["KilnQueueWaitHigh"].contains("histogram_quantile") && alerts["KilnQueueWaitHigh"].contains("1800"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_and_alert_rule_returns_series_from_a_live_prometheus() {
    if !prometheus_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config_file = dir.path().join("kiln.toml");
    std::fs::write(&config_file, small_tiers()).unwrap();
    // The studio's agent serves its own /metrics, as a kiln-edge on a Pi does.
    let agent = format!("127.0.0.1:{}", free_port());
    let (child, url) =
        spawn_up(&data, &["--config", config_file.to_str().unwrap(), "--studio-metrics-listen", agent.as_str()]);
    let _up = Killed(vec![child]);
    let token = operator_token(&data);
    let c = Client::new(&url, Some(Secret::new(token.clone())));
    let targets = [("kiln-scheduler", url.trim_start_matches("http://")), ("kiln-edge", agent.as_str())];
    let prom = Prometheus::start(dir.path(), &targets).await;

    // Work: a render at each tier, a repeat the cache answers, a client with a budget, device
    // tasks, and an order left waiting for its approval.
    let mut asset = String::new();
    for tier in ["preview", "final", "print"] {
        let j = c.call(Method::POST, "/v1/jobs", Some(&job("a live dashboard", 1, tier))).await.unwrap();
        let done = c.call(Method::GET, &format!("/v1/jobs/{}?wait=60", j["id"].as_str().unwrap()), None).await.unwrap();
        asset = done["asset"].as_str().expect("an asset").to_owned();
    }
    let again = c.call(Method::POST, "/v1/jobs", Some(&job("a live dashboard", 1, "preview"))).await.unwrap();
    assert_eq!(again["state"], "cached", "{again:#}");
    let budgeted = json!({ "name": "studio-a", "role": "client", "budget_seconds": 3600, "budget_period": "day" });
    let made = c.call(Method::POST, "/v1/tokens", Some(&budgeted)).await.unwrap();
    let client = Client::new(&url, Some(Secret::new(made["token"].as_str().unwrap().to_owned())));
    // Large enough that its render takes more than the ledger's millisecond: a 48 px preview
    // may take less, cost nothing, and leave the budget's gauge at 0.
    let mut piece = job("a client's piece", 2, "preview");
    piece["width"] = 640.into();
    let j = client.call(Method::POST, "/v1/jobs", Some(&piece)).await.unwrap();
    client.call(Method::GET, &format!("/v1/jobs/{}?wait=60", j["id"].as_str().unwrap()), None).await.unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while c.call(Method::GET, "/v1/devices", None).await.unwrap()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "online")
        .count()
        < 4
    {
        assert!(Instant::now() < until, "the studio's devices did not come online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A photograph of an empty printer tray fails: a task that fails raises an incident.
    let out =
        kiln().args(["task", "camera", "capture", "--wait", "--server", &url, "--token", &token]).output().unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    for args in [
        vec!["task", "lights", "lights", "--param", "scene=2", "--wait"],
        vec!["task", "printer", "print", "--asset", &asset, "--wait"],
        vec!["task", "camera", "capture", "--wait"],
    ] {
        let out = kiln().args(&args).args(["--server", &url, "--token", &token]).output().unwrap();
        assert!(out.status.success(), "kiln {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let order = json!({ "plan": "gallery-print", "prompt": "a kiln at dusk", "seeds": [3, 4] });
    let o = c.call(Method::POST, "/v1/orders", Some(&order)).await.unwrap();
    let id = o["id"].as_str().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let o = c.call(Method::GET, &format!("/v1/orders/{id}"), None).await.unwrap();
        if o["state"] == "awaiting_approval" {
            break;
        }
        assert!(Instant::now() < until && o["state"] == "running", "{o:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The farm's and the agent's expositions pass promtool's lint.
    let text = c.send(Method::GET, "/metrics", None).await.unwrap().body;
    promtool_check_metrics(&text);
    let text = Client::new(&format!("http://{agent}"), None).send(Method::GET, "/metrics", None).await.unwrap().body;
    promtool_check_metrics(&text);

    // Enough scrapes that every rate has two samples after the work: wait until the latest
    // scrape shows the order waiting, then a few more.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let got = prom.query("kiln_approvals_waiting").await.unwrap();
        if got.iter().any(|s| s["value"][1] == "1") {
            break;
        }
        assert!(Instant::now() < until, "prometheus never saw the approval waiting: {got:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;

    // The studio's gauges say what happened.
    let value = |expr: &'static str| {
        let prom = &prom;
        async move {
            let got = prom.query(expr).await.unwrap();
            assert_eq!(got.len(), 1, "{expr}: {got:?}");
            got[0]["value"][1].as_str().unwrap().parse::<f64>().unwrap()
        }
    };
    assert_eq!(value(r#"sum(kiln_orders{state="awaiting_approval"})"#).await, 1.0);
    assert_eq!(value(r#"sum(kiln_incidents_open{kind="task_failed"})"#).await, 1.0);
    assert_eq!(value(r#"sum(kiln_incidents_open)"#).await, 1.0);
    assert!(value("max(kiln_approval_oldest_wait_seconds)").await > 0.0);
    assert_eq!(value(r#"max(kiln_client_budget_seconds{client="studio-a",period="day"})"#).await, 3600.0);
    assert!(value(r#"max(kiln_client_budget_used_seconds{client="studio-a",period="day"})"#).await > 0.0);
    assert!(value("max(kiln_store_writes_total)").await >= value("max(kiln_store_commits_total)").await);
    assert!(value("max(kiln_store_commits_total)").await > 0.0);
    assert!(value("max(kiln_data_dir_free_bytes)").await > 0.0);
    assert!(value("max(kiln_data_dir_size_bytes)").await >= value("max(kiln_data_dir_free_bytes)").await);
    assert_eq!(value(r#"count(kiln_worker_info{state="active",backend="cpu"})"#).await, 2.0);
    assert_eq!(value(r#"sum(kiln_edge_broker_connected{job="kiln-edge"})"#).await, 4.0);
    assert_eq!(value(r#"sum(kiln_edge_tasks_total{outcome="succeeded"})"#).await, 3.0);
    assert_eq!(value(r#"sum(kiln_edge_tasks_total{device="camera",outcome="failed"})"#).await, 1.0);

    let mut failures = Vec::new();
    let panels = dashboard_exprs();
    assert!(panels.len() >= 40, "{} dashboard expressions", panels.len());
    let alerts = alert_exprs();
    assert!(alerts.len() >= 13, "{alerts:?}");
    let all = panels.into_iter().chain(alerts.into_iter().map(|(name, e)| (format!("alert {name}"), with_bool(&e))));
    let mut n = 0;
    for (at, expr) in all {
        n += 1;
        match prom.query(&expr).await {
            Ok(series) if series.is_empty() && !nvidia_only(&expr) => {
                failures.push(format!("{at}: no series from {expr}"))
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{at}: {e} in {expr}")),
        }
    }
    assert!(failures.is_empty(), "{} of {n} expressions failed:\n{}", failures.len(), failures.join("\n"));

    // Prometheus evaluated every alert rule itself, without an error.
    let r = prom.api.send(Method::GET, "/api/v1/rules", None).await.unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let rules: Vec<&Value> =
        v["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(rules.len(), alert_exprs().len());
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule:#}");
    }
}

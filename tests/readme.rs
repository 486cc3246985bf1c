//! Every command the README shows, run as a reader would type it: each line of its `sh` blocks
//! and each command in its prose (an inline code span that starts with a program Kiln's users
//! run). They run in `bash`, with the built binaries first on `PATH` and `HOME` in a temp dir, so
//! `~/.local/share/kiln` is a fresh farm's data dir; the environment only moves ports to free ones
//! and makes the tiers small. Placeholders (`<ID>`, `HASH`, `…`) are filled with what the farm
//! made; where a command needs more to run here (a bench's size, a private path), the change is
//! written beside it.
//!
//! A command the README gains fails `every_command_the_readme_shows_is_run_or_accounted_for`
//! until it is run here, or listed with the test or CI step that runs it, or with why it cannot
//! run on a test machine.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Killed, small_tiers};
use hyper::Method;
use kiln_common::client::Client;
use kiln_protocol::Secret;
use kiln_testenv as testenv;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

/// The programs whose invocations in the prose count as commands.
const PROGRAMS: [&str; 11] = [
    "kiln",
    "kiln-worker",
    "kiln-scheduler",
    "kiln-edge",
    "cargo",
    "curl",
    "promtool",
    "docker",
    "mosquitto_passwd",
    "systemctl",
    "rabbitmqctl",
];

/// Whether an inline code span is a command: a program above (or an install script), after any
/// `sudo`, `VAR=value` or `VAR=$(`, with at least one argument.
fn is_command(span: &str) -> bool {
    let mut words = span.split_whitespace();
    let mut first = "";
    for w in words.by_ref() {
        let assignment = w.contains('=') && w.chars().next().is_some_and(|c| c.is_ascii_uppercase());
        match w.split_once("$(") {
            Some((_, program)) if assignment => first = program,
            _ if w == "sudo" || assignment => continue,
            _ => first = w,
        }
        break;
    }
    let program = PROGRAMS.contains(&first) || (first.starts_with("infra/install/") && first.ends_with(".sh"));
    program && words.next().is_some()
}

/// `line` without a trailing `# comment` (outside quotes), split at `;` (outside quotes).
fn shell_parts(line: &str) -> Vec<String> {
    let (mut parts, mut cur, mut quote) = (Vec::new(), String::new(), None);
    let mut prev = ' ';
    for c in line.chars() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') if prev.is_whitespace() => break,
            (None, ';') => {
                parts.push(std::mem::take(&mut cur));
                prev = c;
                continue;
            }
            _ => {}
        }
        cur.push(c);
        prev = c;
    }
    parts.push(cur);
    parts.into_iter().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect()
}

/// Every command the README shows, once each, in the order they first appear.
fn readme_commands() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |c: String| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    let mut fence: Option<String> = None;
    let mut prose = String::new();
    for line in readme().lines() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            fence = match fence {
                None => Some(info.trim().to_owned()),
                Some(_) => None,
            };
            prose.push('\n');
            continue;
        }
        match fence.as_deref() {
            Some("sh") => shell_parts(line).into_iter().for_each(&mut add),
            Some(_) => {}
            None => {
                // A code span may run over a line break; a blank line ends a paragraph.
                prose.push_str(if line.trim().is_empty() { "\n" } else { line });
                prose.push(' ');
            }
        }
    }
    for paragraph in prose.split('\n') {
        let spans: Vec<&str> = paragraph.split('`').collect();
        for span in spans.iter().skip(1).step_by(2) {
            let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
            if is_command(&span) {
                add(span);
            }
        }
    }
    out
}

/// README commands not run here, each with the file that runs it and the text there that does.
const ELSEWHERE: [(&str, &str, &str); 9] = [
    ("cargo test --release --workspace", ".ci/run", "cargo test --release --workspace"),
    ("cargo build --release -p kiln-edge", ".ci/run", "cargo build --locked -q --profile edge -p kiln-edge"),
    ("cargo build --profile edge -p kiln-edge --target", ".ci/run", "--profile edge -p kiln-edge --target"),
    (
        "promtool test rules infra/prometheus/alerts_test.yml",
        "tests/infra.rs",
        r#"["test", "rules", "alerts_test.yml"]"#,
    ),
    ("sudo infra/install/worker.sh", "tests/infra.rs", r#"install("worker.sh", &args)"#),
    ("sudo infra/install/pi.sh", "tests/infra.rs", r#"install("pi.sh", &args)"#),
    ("rabbitmqctl stop_app", "tests/faults.rs", r#"rabbitmqctl("stop_app")"#),
    ("kiln-worker doctor", "tests/distributed.rs", r#".arg("doctor")"#),
    ("kiln submit --wait", "tests/tiles.rs", r#""--wait""#),
];

/// README commands that cannot run on a test machine, and why.
const NOT_HERE: [(&str, &str); 2] = [
    (
        "docker compose -f infra/compose.yaml up",
        "no Docker engine runs where Kiln is tested; tests/infra.rs checks every file, port and variable the compose file names",
    ),
    ("systemctl status kiln-", "a look at an installed box; tests/infra.rs runs systemd-analyze verify on every unit"),
];

/// README commands that are another's other spelling: they run as it does.
const SAME_AS: [(&str, &str); 1] = [("cargo run --release -- up", "kiln up")];

/// Whether README command `shown` is covered by one of `ran` (the commands run, as the README
/// shows them): word for word, where a placeholder (`NAME`, `ID`, `<HASH>`) stands for any one
/// word and a last `…` for the rest; or it names the start of one (`kiln device add` in the prose
/// is `kiln device add studio-pi …` run). Leading `VAR=value` words of a run command are not
/// compared.
fn covered(shown: &str, ran: &[String]) -> bool {
    let placeholder = |w: &str| {
        (w.len() > 1 || w == "N") && w.chars().all(|c| c.is_ascii_uppercase() || "<>_".contains(c))
            || (w.starts_with('<') && w.ends_with('>'))
    };
    let words = |c: &'_ str| -> Vec<String> {
        let assignment =
            |w: &&str| w.contains('=') && !w.contains("$(") && w.starts_with(|c: char| c.is_ascii_uppercase());
        c.split_whitespace().skip_while(assignment).map(str::to_owned).collect()
    };
    let want = words(shown);
    ran.iter().any(|r| {
        let got = words(r);
        for (i, w) in want.iter().enumerate() {
            if w == "…" && i == want.len() - 1 {
                return got.len() > i;
            }
            match got.get(i) {
                Some(g) if g == w || placeholder(w) => {}
                _ => return false,
            }
        }
        true
    })
}

/// A shell as the README's reader has it: `HOME` and the working dir in a temp dir, the built
/// binaries first on `PATH`, nothing else from the test's environment but `env`.
struct Shell {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
    readme: Vec<String>,
    ran: Mutex<Vec<String>>,
}

impl Shell {
    fn new() -> Shell {
        let dir = tempfile::tempdir().unwrap();
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_kiln")).parent().unwrap().to_owned();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut env = BTreeMap::new();
        for (k, v) in [("PATH", path.as_str()), ("HOME", dir.path().to_str().unwrap()), ("KILN_LOG", "warn")] {
            env.insert(k.to_owned(), v.to_owned());
        }
        Shell { dir, env, readme: readme_commands(), ran: Mutex::new(Vec::new()) }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    /// `bash -c` of README command `shown` with `subs` replaced; records it as run.
    fn command(&self, shown: &str, subs: &[(&str, &str)]) -> (String, Command) {
        assert!(self.readme.iter().any(|c| c == shown), "the README no longer shows {shown:?}");
        let mut line = shown.to_owned();
        for (from, to) in subs {
            assert!(line.contains(from), "{shown:?} has no {from:?}");
            line = line.replace(from, to);
        }
        self.ran.lock().unwrap().push(shown.to_owned());
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &line]).env_clear().envs(&self.env).current_dir(self.dir.path());
        (line, cmd)
    }

    /// Runs README command `shown` (with `subs`) to its end; it must succeed. Its stdout.
    fn run(&self, shown: &str, subs: &[(&str, &str)]) -> String {
        let (line, mut cmd) = self.command(shown, subs);
        let out = cmd.output().unwrap();
        Shell::succeeded(&line, &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a line that is not the README's (one a command printed); it must succeed.
    fn run_printed(&self, line: &str) {
        self.ran.lock().unwrap().push(line.to_owned());
        let out = Command::new("bash").args(["-c", line]).env_clear().envs(&self.env).output().unwrap();
        Shell::succeeded(line, &out);
    }

    fn succeeded(line: &str, out: &Output) {
        assert!(
            out.status.success(),
            "`{line}` exited {}:\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts README command `shown` (with `subs`) and leaves it running; its stdout goes to the
    /// file `log`.
    fn start(&self, shown: &str, subs: &[(&str, &str)], log: &str) -> Child {
        let (_, mut cmd) = self.command(shown, subs);
        let out = std::fs::File::create(self.path(log)).unwrap();
        cmd.stdout(out).spawn().unwrap()
    }
}

/// Waits up to `within` for `f` to give something.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The farm `kiln up` left in `data`: its API and an operator client.
async fn farm_in(data: &Path) -> (String, Client) {
    let url = until("kiln up writes its api.url", Duration::from_secs(60), || async {
        std::fs::read_to_string(data.join("api.url")).ok().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty())
    })
    .await;
    let token = std::fs::read_to_string(data.join("operator.token")).unwrap().trim().to_owned();
    let c = Client::new(&url, Some(Secret::new(token)));
    until("the farm answers", Duration::from_secs(30), || async {
        c.send(Method::GET, "/healthz", None).await.ok().filter(|r| r.status == 200)
    })
    .await;
    (url, c)
}

/// Places an order of `plan` and waits until it is `state`; its id.
async fn order(c: &Client, plan: &str, seeds: &[u64], state: &str) -> String {
    let body = json!({ "plan": plan, "prompt": "a kiln at dusk", "seeds": seeds });
    let o = c.call(Method::POST, "/v1/orders", Some(&body)).await.unwrap();
    let id = o["id"].as_str().unwrap().to_owned();
    until(&format!("order {id} {state}"), Duration::from_secs(60), || async {
        let o = c.call(Method::GET, &format!("/v1/orders/{id}"), None).await.unwrap();
        (o["state"] == state).then_some(())
    })
    .await;
    id
}

/// The open incidents about order `id`.
async fn incident_of(c: &Client, id: &str) -> String {
    until(&format!("an incident about order {id}"), Duration::from_secs(60), || async {
        let v = c.call(Method::GET, "/v1/incidents?state=open", None).await.unwrap();
        v["incidents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i.to_string().contains(id))
            .map(|i| i["id"].as_str().unwrap().to_owned())
    })
    .await
}

/// The README's fenced block of `lang` that holds `marker`.
fn readme_block(lang: &str, marker: &str) -> String {
    let text = readme();
    let open = format!("```{lang}\n");
    text.split(&open)
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("no ```{lang} block with {marker:?} in the README"))
        .to_owned()
}

#[test]
fn commands_are_found_in_blocks_and_prose() {
    assert_eq!(shell_parts(r#"kiln jobs; kiln job <ID>   # one; two"#), ["kiln jobs", "kiln job <ID>"]);
    assert_eq!(shell_parts(r#"kiln approve X --reason "a; b # c""#), [r#"kiln approve X --reason "a; b # c""#]);
    assert!(is_command("kiln up"));
    assert!(is_command("TOKEN=$(kiln token create --name alice --role client)"));
    assert!(is_command("sudo infra/install/pi.sh --binary ./kiln-edge"));
    assert!(is_command("KILN_WORKER_TOKEN=kiln_… kiln-worker run"));
    assert!(!is_command("kiln-worker"), "a name alone is not a command");
    assert!(!is_command("kiln.db"));
    assert!(!is_command("KILN_LOG"));
    let all = readme_commands();
    for c in [
        "kiln up",
        "cargo test --release --workspace",
        "kiln job <ID>",
        "kiln device add studio-pi --devices printer-1,camera-1",
    ] {
        assert!(all.iter().any(|a| a == c), "{c:?} not found in {all:#?}");
    }
    assert!(all.iter().any(|c| c.starts_with("sudo infra/install/worker.sh --binary ./kiln-worker --name gpu-box-1")));
    let ran = |c: &str| vec![c.to_owned()];
    assert!(covered("kiln bench …", &ran("kiln bench engine --runs 1")));
    assert!(covered("kiln device add", &ran("kiln device add studio-pi")));
    assert!(!covered("kiln device", &ran("kiln devices")));
    assert!(covered("kiln worker add NAME", &ran("kiln worker add gpu-box-1")));
    assert!(covered("kiln-worker run", &ran("KILN_WORKER_TOKEN=kiln_… kiln-worker run --tiers preview")));
    assert!(covered("kiln approve ID --option N", &ran("kiln approve ID --option N")));
    assert!(!covered("kiln approve ID --option N", &ran("kiln approve ID --reason x")));
    assert!(!covered("kiln incident resolve ID --note …", &ran("kiln incident resolve ID")));
}

/// The README's commands, on a `kiln up` of their own and (where the services are) a
/// distributed farm on PostgreSQL and RabbitMQ; then every command it shows must have run, or be
/// listed with where it runs or why it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_the_readme_shows_is_run_or_accounted_for() {
    let mut sh = Shell::new();
    let data = sh.path(".local/share/kiln");
    // Small tiers, a step tried once, the README's own plan, and a plan whose photo of an empty
    // tray fails (an incident to retry and resolve).
    let plan = readme_block("toml", "[[plans]]");
    let config = format!(
        "{}[scheduler.orders]\nstep_attempts = 1\nretry_base_seconds = 1\n{plan}\n\
         [[plans]]\nname = \"snap\"\n[[plans.steps]]\nname = \"preview\"\nkind = \"render\"\ntier = \"preview\"\n\
         [[plans.steps]]\nname = \"photo\"\nkind = \"device\"\ntask = \"capture\"\n",
        small_tiers()
    );
    std::fs::write(sh.path("kiln.toml"), config).unwrap();
    let config = sh.path("kiln.toml");
    sh.set("KILN_CONFIG", config.to_str().unwrap());
    sh.set("KILN_LISTEN", "127.0.0.1:0");
    sh.set("KILN_MQTT_LISTEN", "127.0.0.1:0");
    sh.set("KILN_BACKEND", "cpu");

    // The tour.
    let up = sh.start("kiln up", &[], "up.log");
    let procs = Killed(vec![up]);
    let (url, c) = farm_in(&data).await;
    let api = url.trim_start_matches("http://").to_owned();
    sh.run(r#"kiln submit "ember kaleidoscope" --wait --out a.png"#, &[]);
    let png = std::fs::read(sh.path("a.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a.png is a PNG");
    let hash = blake3::hash(&png).to_hex().to_string();
    sh.run(r#"kiln submit "ember kaleidoscope" --seed 7 --tier final --wait"#, &[]);
    let listed = sh.run("kiln jobs --state succeeded", &[]);
    let jobs = c.call(Method::GET, "/v1/jobs?state=succeeded", None).await.unwrap();
    let job = jobs["jobs"][0]["id"].as_str().unwrap().to_owned();
    assert!(listed.contains(&job), "{listed}");
    assert!(sh.run("kiln job <ID>", &[("<ID>", &job)]).contains(&job));
    let curl = r#"curl -H "Authorization: Bearer $(cat ~/.local/share/kiln/operator.token)" localhost:7878/v1/jobs"#;
    let got: Value = serde_json::from_str(&sh.run(curl, &[("localhost:7878", &api)])).unwrap();
    assert!(got["jobs"].as_array().is_some_and(|j| !j.is_empty()), "{got}");
    sh.run(r#"kiln submit "ember kaleidoscope" --seed 1 --count 50 --out run/"#, &[]);
    let written = std::fs::read_dir(sh.path("run")).unwrap().count();
    assert_eq!(written, 50, "run/SEED.png for each of the 50 seeds");
    let secret = sh.run("kiln token create --name alice --role client", &[]);
    assert!(secret.trim().starts_with("kiln_") && secret.trim().lines().count() == 1, "the secret alone: {secret:?}");
    sh.run("TOKEN=$(kiln token create --name alice --role client)", &[("alice", "alice-2")]);
    sh.run(r#"kiln render --prompt "calm ocean" --seed 3 --tier final --out final.png"#, &[]);
    assert!(std::fs::read(sh.path("final.png")).unwrap().starts_with(b"\x89PNG"));
    sh.run("kiln token create --name bob --expires-in 30d --budget 1h --period day", &[]);
    assert!(sh.run("kiln token list", &[]).contains("bob"));
    sh.run("kiln token revoke NAME", &[("NAME", "alice")]);
    sh.run("kiln token create --name ana --budget 3600 --period day", &[]);
    sh.run("kiln token create --name NAME --role client --budget …", &[("NAME", "cara"), ("…", "7200")]);
    sh.run("kiln usage", &[]);
    sh.run("kiln --print-config", &[]);

    // Incidents: orders whose photo of an empty tray fails.
    let mut incidents = Vec::new();
    for seed in 1..=3 {
        let snap = order(&c, "snap", &[seed], "failed").await;
        incidents.push(incident_of(&c, &snap).await);
    }
    let [retried, again, resolved] = <[String; 3]>::try_from(incidents).unwrap();
    assert!(sh.run("kiln incidents", &[]).contains(&retried));
    sh.run("kiln incident retry <ID>", &[("<ID>", &retried)]);
    sh.run("kiln incident retry ID", &[("ID", &again)]);
    sh.run("kiln incident resolve ID --note …", &[("ID", &resolved), ("…", "\"the tray was empty\"")]);

    // An order from its approval to the gallery.
    let placed = sh.start(r#"kiln order create "ember kaleidoscope" --seeds 3,4,5 --wait"#, &[], "order.log");
    let awaiting = until("the order awaits its approval", Duration::from_secs(60), || async {
        let v = c.call(Method::GET, "/v1/orders?state=awaiting_approval", None).await.unwrap();
        v["orders"].as_array().unwrap().first().map(|o| o["id"].as_str().unwrap().to_owned())
    })
    .await;
    assert!(sh.run("kiln approvals", &[]).contains(&awaiting));
    let approve = r#"kiln approve <ORDER>.approve --option 2 --reason "the warmest""#;
    sh.run(approve, &[("<ORDER>", &awaiting)]);
    let ended = tokio::task::spawn_blocking(move || {
        let mut placed = placed;
        placed.wait().unwrap()
    });
    let status = tokio::time::timeout(Duration::from_secs(120), ended).await.expect("the order ends").unwrap();
    let log = std::fs::read_to_string(sh.path("order.log")).unwrap();
    assert!(status.success(), "kiln order create --wait: {status}\n{log}");
    let o = c.call(Method::GET, &format!("/v1/orders/{awaiting}"), None).await.unwrap();
    assert_eq!(o["state"], "succeeded", "{o:#}");
    assert!(sh.run("kiln orders", &[]).contains(&awaiting));
    sh.run("kiln order <ID>", &[("<ID>", &awaiting)]);
    let to_cancel = order(&c, "gallery-print", &[6], "awaiting_approval").await;
    sh.run("kiln order cancel <ID>", &[("<ID>", &to_cancel)]);
    let to_approve = order(&c, "pick-and-show", &[7, 8], "awaiting_approval").await;
    sh.run("kiln approve ID --option N", &[("ID", &format!("{to_approve}.pick")), ("N", "1")]);
    let to_reject = order(&c, "gallery-print", &[9], "awaiting_approval").await;
    sh.run("kiln reject ID --reason …", &[("ID", &format!("{to_reject}.approve")), ("…", "\"too dark\"")]);
    sh.run("kiln reproduce <HASH>", &[("<HASH>", &hash)]);
    sh.run("kiln reproduce HASH", &[("HASH", &hash)]);

    // The fleet: devices, a Pi added, the broker's password file, the agent's config.
    sh.run("kiln devices", &[]);
    let pi = sh.run("kiln device add studio-pi --devices printer-1,camera-1", &[]);
    assert!(pi.contains("mosquitto_passwd") && pi.contains("studio-pi"), "{pi}");
    sh.run("kiln device add NAME --devices ID", &[("NAME", "gallery-pi"), ("ID", "gallery-1")]);
    let passwd = sh.path("kiln.passwd");
    let line = "mosquitto_passwd -c -b /etc/mosquitto/kiln.passwd kiln-scheduler PASSWORD";
    sh.run(line, &[("/etc/mosquitto/kiln.passwd", passwd.to_str().unwrap())]);
    assert!(std::fs::read_to_string(&passwd).unwrap().starts_with("kiln-scheduler:"));
    std::fs::write(sh.path("edge.toml"), readme_block("toml", "[[device]]")).unwrap();
    // The agent itself would run until stopped: its config, as it would use it, is the check.
    sh.run("kiln-edge --config edge.toml", &[("edge.toml", "edge.toml --print-config")]);
    assert!(sh.run("kiln-edge --help", &[]).contains("--config"));

    // The benchmarks, each at its smallest.
    for (bench, small) in [
        ("kiln bench engine", "kiln bench engine --runs 1 --backend cpu --print-side 256 --final-side 128"),
        (
            "kiln bench farm",
            "kiln bench farm --runs 1 --hits 200 --hit-clients 2 --jobs 100 --concurrency 8 --batch 0 --workers 2",
        ),
        ("kiln bench store", "kiln bench store --runs 1 --jobs 300 --concurrency 8"),
        ("kiln bench console", "kiln bench console --jobs 300 --assets 20 --requests 2"),
        ("kiln bench print", "kiln bench print --runs 1 --side 256 --workers 1,2"),
    ] {
        sh.run(bench, &[(bench, small)]);
    }
    drop(procs);

    // The simulated studio's agent with its own /metrics, as a Pi's kiln-edge has.
    let agent = format!("127.0.0.1:{}", common::free_port());
    let up = Killed(vec![sh.start("kiln up --studio-metrics-listen ADDR", &[("ADDR", &agent)], "up2.log")]);
    let metrics = Client::new(&format!("http://{agent}"), None);
    until("the studio agent's /metrics shows its four devices connected", Duration::from_secs(60), || async {
        let r = metrics.send(Method::GET, "/metrics", None).await.ok()?;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        (common::metric_in(&text, "kiln_edge_broker_connected", "device=") == 4.0).then_some(())
    })
    .await;
    drop(up);

    // The distributed mode, on the test machine's PostgreSQL and RabbitMQ.
    let fleet = fleet_bench(&sh).await;
    if !(distributed(&mut sh).await && fleet) {
        eprintln!("skipping the check that every README command ran: some services are missing");
        return;
    }

    let mut ran = sh.ran.lock().unwrap().clone();
    for (alias, of) in SAME_AS {
        if covered(of, &ran) {
            ran.push(alias.to_owned());
        }
    }
    let mut missing = Vec::new();
    for shown in &sh.readme {
        if covered(shown, &ran) {
            continue;
        }
        if let Some((_, file, text)) = ELSEWHERE.iter().find(|(c, ..)| shown.starts_with(c)) {
            let body = std::fs::read_to_string(root().join(file)).unwrap();
            assert!(body.contains(text), "{shown:?} is said to run in {file}, which has no {text:?}");
            continue;
        }
        if NOT_HERE.iter().any(|(c, _)| shown.starts_with(c)) {
            continue;
        }
        missing.push(shown.clone());
    }
    assert!(missing.is_empty(), "README commands neither run here nor accounted for:\n{}", missing.join("\n"));
}

/// The distributed section: a scheduler on PostgreSQL and RabbitMQ, a worker box added with its
/// own broker user, and that worker rendering; then `kiln bench dispatch` and `kiln bench store`
/// on PostgreSQL. False when the services are not here (and not required).
async fn distributed(sh: &mut Shell) -> bool {
    let Some(database) = testenv::fresh_database().await else { return false };
    let Some((amqp, prefix)) = testenv::amqp().await else { return false };
    let probe = Command::new("rabbitmqctl").arg("list_users").output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        assert!(!testenv::services_required(), "rabbitmqctl does not run here (it needs root): {probe:?}");
        eprintln!("skipping the distributed commands: rabbitmqctl does not run here (it needs root)");
        return false;
    }
    let data = sh.path("scheduler");
    sh.set("KILN_DATA_DIR", data.to_str().unwrap());
    sh.set("KILN_DATABASE_URL", &database);
    sh.set("KILN_AMQP_URL", &amqp);
    sh.set("KILN_AMQP_PREFIX", &prefix);
    let scheduler = sh.start("kiln-scheduler --backend cpu", &[], "scheduler.log");
    let mut procs = Killed(vec![scheduler]);
    let (url, c) = farm_in(&data).await;
    let user = format!("{prefix}-box");
    let added = sh.run("kiln worker add gpu-box-1", &[("gpu-box-1", &format!("{user} --prefix {prefix}"))]);
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("rabbitmqctl").args(["delete_user", &self.0]).output();
        }
    }
    let _user = Gone(user.clone());
    let value = |key: &str| {
        let line = added.lines().find_map(|l| l.strip_prefix(&format!("{key}=")));
        line.unwrap_or_else(|| panic!("kiln worker add printed no {key}:\n{added}")).to_owned()
    };
    let (token, amqp_url) = (value("KILN_WORKER_TOKEN"), value("KILN_AMQP_URL"));
    for line in added.lines().filter(|l| l.starts_with("rabbitmqctl ")) {
        sh.run_printed(line);
    }
    let password = amqp_url.split(&format!("{user}:")).nth(1).and_then(|r| r.split('@').next()).unwrap().to_owned();
    let broker = testenv::amqp_addr(&amqp);
    // The worker box has its own config, not the scheduler's file (whose plans it would refuse).
    sh.env.remove("KILN_CONFIG");
    sh.set("KILN_DATA_DIR", sh.path("worker").to_str().unwrap());
    sh.set("KILN_THREADS", "1");
    let run = "KILN_WORKER_TOKEN=kiln_… kiln-worker run --amqp-url amqp://gpu-box-1:…@broker/%2f --scheduler-url http://sched:7878 --tiers preview,final";
    let at = format!("{user}:{password}@{broker}");
    let worker =
        sh.start(run, &[("kiln_…", &token), ("gpu-box-1:…@broker", &at), ("http://sched:7878", &url)], "worker.log");
    procs.0.push(worker);
    let j = c.call(Method::POST, "/v1/jobs", Some(&common::job("a box of its own", 5, "preview"))).await.unwrap();
    let id = j["id"].as_str().unwrap();
    let done = until("the worker renders the job", Duration::from_secs(60), || async {
        let j = c.call(Method::GET, &format!("/v1/jobs/{id}?wait=5"), None).await.unwrap();
        (j["state"] == "succeeded" || j["state"] == "failed").then_some(j)
    })
    .await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    drop(procs);
    sh.env.remove("KILN_DATA_DIR");
    let dispatch = format!(
        "kiln bench dispatch --runs 1 --jobs 100 --workers 1 --concurrency 8 --batch 0 --raw-messages 200 \
         --database-url {database} --amqp-url {amqp}"
    );
    sh.run("kiln bench dispatch", &[("kiln bench dispatch", &dispatch)]);
    let store = "kiln bench store --database-url postgres://…";
    sh.run(store, &[("postgres://…", &format!("{database} --runs 1 --jobs 300 --concurrency 8"))]);
    true
}

/// `kiln bench fleet` on the test machine's MQTT broker. False when it is not here (and not
/// required).
async fn fleet_bench(sh: &Shell) -> bool {
    let Some((mqtt, _)) = testenv::mqtt().await else { return false };
    sh.run(
        "kiln bench fleet",
        &[(
            "kiln bench fleet",
            &format!("kiln bench fleet --mqtt-url {mqtt} --agents 2 --tasks 4 --rate 10 --idle-seconds 1 --runs 1"),
        )],
    );
    true
}

//! The `kiln` command line: `kiln up` runs the whole farm in one process; `submit`, `jobs`,
//! `job`, `cancel` and `token` talk to a farm over its API; `render` and `bench` run the engine
//! directly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use kiln_common::GlobalArgs;
use kiln_common::client::Client;
use kiln_protocol::api::{self, Role};
use kiln_protocol::fleet::TaskState;
use kiln_protocol::{JobRequest, JobState, Secret, Tier};
use kiln_scheduler::config::FarmConfig;
use kiln_scheduler::farm::url_file;
use serde::Deserialize;
use serde_json::Value;

/// Kiln, a render farm for generative-art studios: renders (prompt, seed, tier) to the same PNG
/// every time, answers repeats from its cache, and runs on one laptop with `kiln up`.
#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln, a render farm for generative-art studios. `kiln up` runs the whole farm on this machine; \
             the other commands talk to it, or render directly.",
    long_about = None
)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole farm in this process: API, SQLite state, cache, in-process workers, an MQTT
    /// broker and a simulated studio (printer, lights, camera, display). Ctrl-C drains and stops.
    Up(crate::up::UpArgs),
    /// Submit a render job; with --wait, show its progress and fetch the PNG.
    Submit(SubmitArgs),
    /// List jobs, newest first.
    Jobs(JobsArgs),
    /// Show one job and its events.
    Job(JobArgs),
    /// Cancel a job.
    Cancel(JobArgs),
    /// List the edge devices (printers, lights, cameras, displays) and their state.
    Devices(DevicesArgs),
    /// Give a device a physical task (operator): print, capture, display or lights.
    Task(TaskArgs),
    /// List device tasks, newest first.
    Tasks(TasksArgs),
    /// Add a Pi to the fleet: its device token and MQTT login, and what the broker needs.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Add a worker box: its worker token and RabbitMQ user, and what the broker needs.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Place, show or cancel a studio order: `kiln order create PROMPT --seeds 3,4,5 --wait`,
    /// `kiln order ID`, `kiln order cancel ID`.
    Order(OrderArgs),
    /// List studio orders, newest first.
    Orders(OrdersArgs),
    /// List the approvals waiting for a decision, with each option's seed and preview.
    Approvals(RemoteOnly),
    /// Approve one option of an approval (operator): the order goes on to render it final.
    Approve(ApproveArgs),
    /// Reject every option of an approval (operator): the order ends, nothing rendered final.
    Reject(RejectArgs),
    /// List what needs the operator, open first.
    Incidents(IncidentsArgs),
    /// Act on an incident (operator): `retry` its order's failed step, or `resolve` it.
    Incident(IncidentArgs),
    /// What renders cost per token, tier and day, and each budget's state (a client sees its own).
    Usage(UsageArgs),
    /// Render an asset again from its provenance alone and say whether it matches: the same
    /// bytes on the backend that made it, or within the stated tolerance on another (at most 2
    /// levels in any channel, PSNR at least 45 dB). Exits 0 only if it is verified.
    Reproduce(ReproduceArgs),
    /// Render one image locally, without a farm (the worker's command).
    Render(kiln_worker::cli::RenderArgs),
    /// Benchmarks: the engine, or the farm end to end through HTTP.
    #[command(subcommand)]
    Bench(kiln_bench::BenchCommand),
}

/// Where the farm is and how to talk to it.
#[derive(Debug, Args, Clone)]
pub struct Remote {
    /// The farm's URL [default: the local `kiln up`'s, from DATA/api.url].
    #[arg(long, env = "KILN_SERVER")]
    pub server: Option<String>,
    /// API token [default: DATA/operator.token].
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kiln submit`'s arguments.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The prompt; its words steer palette, symmetry, frequency and contrast.
    pub prompt: String,
    /// The seed [default: chosen by the farm and recorded].
    #[arg(long)]
    pub seed: Option<u64>,
    /// preview, final or print.
    #[arg(long, default_value = "preview")]
    pub tier: Tier,
    /// Width in pixels [default: the tier's].
    #[arg(long)]
    pub width: Option<u32>,
    /// Height in pixels [default: the tier's].
    #[arg(long)]
    pub height: Option<u32>,
    /// Supersampling per axis [default: the tier's].
    #[arg(long)]
    pub samples: Option<u32>,
    /// Idempotency key: submitting again with it returns the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Submit this many jobs in one request: seeds SEED, SEED+1, … (with no --seed, the farm
    /// chooses each). With --wait, each job is shown as it ends.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Wait for the job to end, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Write the PNG here (implies --wait); with --count, a directory that gets SEED.png for
    /// each job (made if missing).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln jobs`' arguments.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in this state.
    #[arg(long)]
    pub state: Option<JobState>,
    /// Only jobs of this tier.
    #[arg(long)]
    pub tier: Option<Tier>,
    /// How many.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln devices`' arguments.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln task`'s arguments.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The device's id (see `kiln devices`).
    pub device: String,
    /// print, capture, display or lights.
    pub kind: kiln_protocol::fleet::TaskKind,
    /// The asset to print or display (its hash, as `kiln submit` shows it).
    #[arg(long)]
    pub asset: Option<String>,
    /// A parameter, KEY=VALUE (lights: scene=3, brightness=800); repeatable. Numbers stay numbers.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, Value)>,
    /// Seconds until the task is past its deadline [default: the farm's, an hour].
    #[arg(long)]
    pub deadline: Option<u64>,
    /// Wait for the task to end, showing each state.
    #[arg(long)]
    pub wait: bool,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

fn parse_param(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    let value = v.parse::<u64>().map(Value::from).unwrap_or_else(|_| Value::from(v));
    Ok((k.to_owned(), value))
}

/// `kiln tasks`' arguments.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only this device's tasks.
    #[arg(long)]
    pub device: Option<String>,
    /// Only tasks in this state (queued, sent, accepted, running, succeeded, failed, timed_out, expired).
    #[arg(long)]
    pub state: Option<String>,
    /// How many.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// Only the farm to talk to.
#[derive(Debug, Args)]
pub struct RemoteOnly {
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln order ...`: one order by id, or a subcommand.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct OrderArgs {
    /// What to do with orders.
    #[command(subcommand)]
    pub command: Option<OrderCommand>,
    /// The order to show, with its steps and events.
    pub id: Option<String>,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln order create|cancel`.
#[derive(Debug, Subcommand)]
pub enum OrderCommand {
    /// Place an order: preview each seed, wait for the operator's approval, then render the
    /// chosen seed final and print size, print it, photograph it and show it on the gallery.
    Create(OrderCreateArgs),
    /// Cancel an order at whatever step it is; the steps after it are skipped.
    Cancel {
        /// The order's id.
        id: String,
        /// Talking to the farm.
        #[command(flatten)]
        remote: Remote,
    },
}

/// `kiln order create`'s arguments.
#[derive(Debug, Args)]
pub struct OrderCreateArgs {
    /// The prompt every render of the order shares.
    pub prompt: String,
    /// The seeds to preview (comma-separated, 1 to 16): the approval chooses one.
    #[arg(long, value_delimiter = ',', required = true)]
    pub seeds: Vec<u64>,
    /// The plan.
    #[arg(long, default_value = "gallery-print")]
    pub plan: String,
    /// The model [default: the farm's].
    #[arg(long)]
    pub model: Option<String>,
    /// Raise an incident if the approval waits longer than this: seconds, or 30m, 12h, 2d.
    #[arg(long, value_parser = parse_duration_s)]
    pub approval_timeout: Option<u64>,
    /// Say what it would cost (its renders and their estimated device-seconds), placing nothing.
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    /// Show each step as it goes, until the order ends.
    #[arg(long)]
    pub wait: bool,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln orders`' arguments.
#[derive(Debug, Args)]
pub struct OrdersArgs {
    /// Only orders in this state (running, awaiting_approval, succeeded, failed, cancelled).
    #[arg(long)]
    pub state: Option<String>,
    /// How many.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln approve`'s arguments.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The approval's id (`kiln approvals` lists them).
    pub id: String,
    /// The option approved, from 1.
    #[arg(long)]
    pub option: u32,
    /// Why, kept with the order.
    #[arg(long)]
    pub reason: Option<String>,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln reject`'s arguments.
#[derive(Debug, Args)]
pub struct RejectArgs {
    /// The approval's id.
    pub id: String,
    /// Why, kept with the order.
    #[arg(long, required = true)]
    pub reason: String,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln incidents`' arguments.
#[derive(Debug, Args)]
pub struct IncidentsArgs {
    /// Only `open` or `resolved` ones.
    #[arg(long)]
    pub state: Option<String>,
    /// How many.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln reproduce`'s arguments.
#[derive(Debug, Args)]
pub struct ReproduceArgs {
    /// The asset's BLAKE3 (64 hex digits).
    pub hash: String,
    /// The backend to render on: cpu, wgpu or auto [default: the one that made the asset].
    #[arg(long, value_enum)]
    pub backend: Option<kiln_worker::config::BackendChoice>,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln usage`'s arguments.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this token's (an operator's choice; a client sees its own).
    #[arg(long)]
    pub client: Option<String>,
    /// From: RFC 3339 or unix seconds (default: 30 days back).
    #[arg(long)]
    pub since: Option<String>,
    /// Until, not included (default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln incident`'s arguments.
#[derive(Debug, Args)]
pub struct IncidentArgs {
    /// `retry` (the order's failed step runs again) or `resolve`.
    #[arg(value_parser = ["retry", "resolve"])]
    pub action: String,
    /// The incident's id.
    pub id: String,
    /// A note kept with it.
    #[arg(long)]
    pub note: Option<String>,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// Arguments naming one job.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job's id.
    pub id: String,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// `kiln device ...`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Add a Pi (needs an operator token): makes a device token that serves the named devices
    /// (the scheduler signs their tasks with it, and the agent runs only tasks so signed) and an
    /// MQTT password for the user NAME, and prints them with the Mosquitto lines that let NAME
    /// use only those devices' topics. Secrets are shown only this once.
    Add(DeviceAddArgs),
}

/// `kiln device add`'s arguments.
#[derive(Debug, Args)]
pub struct DeviceAddArgs {
    /// The Pi's name: its token's name and its MQTT user (1 to 64 of A-Z a-z 0-9 - _ .).
    pub name: String,
    /// The device ids its agent serves, as in its edge.toml (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub devices: Vec<String>,
    /// The fleet's topic prefix [default: scheduler.fleet.prefix].
    #[arg(long)]
    pub prefix: Option<String>,
    /// The broker's password file, for the printed mosquitto_passwd line.
    #[arg(long, default_value = "/etc/mosquitto/kiln.passwd")]
    pub passwd_file: PathBuf,
    /// The broker's ACL file, for the printed lines that append to it.
    #[arg(long, default_value = "/etc/mosquitto/conf.d/kiln.acl")]
    pub acl_file: PathBuf,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// What `kiln device add` made, as `--json` prints it.
#[derive(Debug, serde::Serialize)]
struct DeviceAdded {
    name: String,
    devices: Vec<String>,
    /// The agent's `scheduler.token`.
    token: String,
    /// The agent's `mqtt.username` and `mqtt.password`.
    mqtt_username: String,
    mqtt_password: String,
    /// The ACL block for the broker.
    acl: Vec<String>,
    /// Shell commands for the broker host: add the password, append the ACL, reload.
    broker_commands: Vec<String>,
}

/// `kiln worker ...`.
#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Add a worker box (needs an operator token): makes a worker token (it signs the box's
    /// results and heartbeats) and a RabbitMQ password for the user NAME, and prints them with
    /// the rabbitmqctl lines that give NAME only what a worker needs: consume the job queues,
    /// publish results, heartbeats and dead letters, and a private control queue. Secrets are
    /// shown only this once.
    Add(WorkerAddArgs),
}

/// `kiln worker add`'s arguments.
#[derive(Debug, Args)]
pub struct WorkerAddArgs {
    /// The box's name: its token's name and its RabbitMQ user (1 to 64 of A-Z a-z 0-9 - _ .).
    pub name: String,
    /// The broker's name prefix [default: scheduler.broker.prefix].
    #[arg(long)]
    pub prefix: Option<String>,
    /// The RabbitMQ virtual host.
    #[arg(long, default_value = "/")]
    pub vhost: String,
    /// Talking to the farm.
    #[command(flatten)]
    pub remote: Remote,
}

/// What `kiln worker add` made, as `--json` prints it.
#[derive(Debug, serde::Serialize)]
struct WorkerAdded {
    name: String,
    /// The worker's `run.token` (`KILN_WORKER_TOKEN`).
    token: String,
    /// Its RabbitMQ login, for `run.amqp_url`.
    amqp_username: String,
    amqp_password: String,
    vhost: String,
    /// `configure`, `write` and `read`, as `rabbitmqctl set_permissions` takes them.
    permissions: [String; 3],
    /// Shell commands for the broker host.
    broker_commands: Vec<String>,
}

/// `kiln token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token (needs an operator token); prints the secret once.
    Create {
        /// Who holds it (unique).
        #[arg(long)]
        name: String,
        /// operator, client, worker (a kiln-worker daemon) or device (a kiln-edge agent).
        #[arg(long, default_value = "client")]
        role: Role,
        /// It stops working after this long: seconds, or a number with s, m, h or d (30d).
        #[arg(long, value_parser = parse_duration_s)]
        expires_in: Option<u64>,
        /// What a client token may spend per --period, in device-seconds weighed by tier
        /// (`[scheduler.costs]`): seconds, or a number with s, m, h or d. A submit or order past it
        /// is refused with 429 and nothing of it starts. No limit when absent.
        #[arg(long, value_parser = parse_duration_s)]
        budget: Option<u64>,
        /// The budget's period, in UTC: day, week or month.
        #[arg(long, default_value = "day", requires = "budget", value_parser = ["day", "week", "month"])]
        period: String,
        /// Talking to the farm.
        #[command(flatten)]
        remote: Remote,
    },
    /// List the tokens not revoked (needs an operator token): name, role, devices, expiry.
    List {
        /// Talking to the farm.
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke a token (needs an operator token): refused at once on this scheduler and within
    /// a second on every other node of the farm; its name is free again.
    Revoke {
        /// The token's name.
        name: String,
        /// Talking to the farm.
        #[command(flatten)]
        remote: Remote,
    },
}

/// `30`, `30s`, `15m`, `12h`, `30d` as seconds.
fn parse_duration_s(s: &str) -> Result<u64, String> {
    let (n, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a number of seconds, or of s, m, h or d (30d)"))?;
    let unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?}; use s, m, h or d")),
    };
    n.checked_mul(unit).ok_or_else(|| format!("{s:?} is too long"))
}

/// The config with the command line's overrides on top.
pub fn load_config(cli: &Cli) -> anyhow::Result<FarmConfig> {
    let mut cfg = FarmConfig::load_for(&cli.global)?;
    match &cli.command {
        Some(Command::Up(a)) => a.serve.apply(&mut cfg)?,
        Some(Command::Render(r)) => {
            cfg.worker.backend = r.backend.unwrap_or(cfg.worker.backend);
            cfg.worker.engine = r.engine.unwrap_or(cfg.worker.engine);
        }
        _ => {}
    }
    Ok(cfg)
}

/// A client from `--server`/`--token`, else the local farm's data dir.
pub fn client(cfg: &FarmConfig, r: &Remote) -> anyhow::Result<Client> {
    let server = match &r.server {
        Some(s) => s.clone(),
        None => {
            let f = url_file(cfg.data_dir());
            std::fs::read_to_string(&f)
                .map(|s| s.trim().to_owned())
                .with_context(|| format!("no --server given and no local farm found ({} is missing); start one with `kiln up` or pass --server / KILN_SERVER", f.display()))?
        }
    };
    let token = match &r.token {
        Some(t) => t.clone(),
        None => {
            let f = cfg.token_path();
            std::fs::read_to_string(&f).map(|s| s.trim().to_owned()).with_context(|| {
                format!("no --token given and cannot read {}; pass --token / KILN_TOKEN", f.display())
            })?
        }
    };
    Ok(Client::new(&server, Some(Secret::new(token))))
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = load_config(&cli)?;
    if cli.global.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    match cli.command {
        None => bail!("no command given; try `kiln up`, `kiln submit --help` or `kiln --help`"),
        Some(Command::Render(args)) => kiln_worker::cli::render(&cfg.worker, &args),
        Some(Command::Bench(bench)) => kiln_bench::run(bench, &cfg),
        Some(Command::Up(args)) => kiln_common::runtime()?.block_on(crate::up::up(cfg, &args)),
        Some(Command::Submit(args)) => kiln_common::runtime()?.block_on(submit(&cfg, &args)),
        Some(Command::Jobs(args)) => kiln_common::runtime()?.block_on(jobs(&cfg, &args)),
        Some(Command::Job(args)) => kiln_common::runtime()?.block_on(job(&cfg, &args)),
        Some(Command::Cancel(args)) => kiln_common::runtime()?.block_on(cancel(&cfg, &args)),
        Some(Command::Devices(args)) => kiln_common::runtime()?.block_on(devices(&cfg, &args)),
        Some(Command::Task(args)) => kiln_common::runtime()?.block_on(task(&cfg, &args)),
        Some(Command::Tasks(args)) => kiln_common::runtime()?.block_on(tasks(&cfg, &args)),
        Some(Command::Device(DeviceCommand::Add(args))) => kiln_common::runtime()?.block_on(device_add(&cfg, &args)),
        Some(Command::Worker(WorkerCommand::Add(args))) => kiln_common::runtime()?.block_on(worker_add(&cfg, &args)),
        Some(Command::Order(args)) => kiln_common::runtime()?.block_on(order(&cfg, args)),
        Some(Command::Orders(a)) => kiln_common::runtime()?.block_on(async {
            let c = client(&cfg, &a.remote)?;
            let page: api::OrderPage = c.get(&list_path("/v1/orders", a.limit, &[("state", a.state.clone())])).await?;
            print_list(a.remote.json, &page, &page.orders, "no orders", print_order_line)
        }),
        Some(Command::Approvals(a)) => kiln_common::runtime()?.block_on(async {
            let c = client(&cfg, &a.remote)?;
            let list: api::Approvals = c.get("/v1/approvals?state=pending").await?;
            print_list(a.remote.json, &list, &list.approvals, "no approvals waiting", |ap| {
                println!("{}  order {}  {:?}  opened {}", ap.id, ap.order, ap.prompt, ap.created_at);
                for o in &ap.options {
                    println!("  option {}  seed {:<8} {}  (job {})", o.option, o.seed, o.asset, o.job);
                }
            })
        }),
        Some(Command::Approve(a)) => kiln_common::runtime()?.block_on(async {
            let d = api::Decision { decision: "approve".into(), option: Some(a.option), reason: a.reason.clone() };
            decide(&cfg, &a.id, &d, &a.remote).await
        }),
        Some(Command::Reject(a)) => kiln_common::runtime()?.block_on(async {
            let d = api::Decision { decision: "reject".into(), option: None, reason: Some(a.reason.clone()) };
            decide(&cfg, &a.id, &d, &a.remote).await
        }),
        Some(Command::Incidents(a)) => kiln_common::runtime()?.block_on(async {
            let c = client(&cfg, &a.remote)?;
            let list: api::Incidents =
                c.get(&list_path("/v1/incidents", a.limit, &[("state", a.state.clone())])).await?;
            print_list(a.remote.json, &list, &list.incidents, "no incidents", |i| {
                println!("{}  {:<8} {:<18} {}  {}", i.id, i.state, i.kind, i.created_at, i.summary);
                if !i.actions.is_empty() {
                    println!("  can: {}", i.actions.join(", "));
                }
            })
        }),
        Some(Command::Reproduce(a)) => kiln_common::runtime()?.block_on(reproduce(&cfg, &a)),
        Some(Command::Usage(a)) => kiln_common::runtime()?.block_on(async {
            let c = client(&cfg, &a.remote)?;
            let query: Vec<String> = [("client", &a.client), ("since", &a.since), ("until", &a.until)]
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", kiln_protocol::url_component(v))))
                .collect();
            let u: api::Usage = c.get(&format!("/v1/usage?{}", query.join("&"))).await?;
            if a.remote.json {
                return print_json(&u);
            }
            println!("from {} until {}", u.since, u.until);
            for d in &u.days {
                println!(
                    "{}  {:<24} {:<8} {:>6} renders  {:>10.1} device-s  {:>10.1} cost-s",
                    d.day, d.client, d.tier, d.renders, d.device_seconds, d.cost_seconds
                );
            }
            if u.days.is_empty() {
                println!("no renders charged");
            }
            for b in &u.budgets {
                println!(
                    "budget {:<24} {:.1} of {} s a {} used, {:.1} in flight; resets at {}",
                    b.client, b.used_seconds, b.budget_seconds, b.period, b.in_flight_seconds, b.resets_at
                );
            }
            Ok(())
        }),
        Some(Command::Incident(a)) => kiln_common::runtime()?.block_on(async {
            let c = client(&cfg, &a.remote)?;
            let body = api::IncidentAction { action: a.action.clone(), note: a.note.clone() };
            let path = format!("/v1/incidents/{}", kiln_protocol::url_component(&a.id));
            let done: api::Incident = c.send_json(Method::POST, &path, Some(&body)).await?;
            if a.remote.json {
                return print_json(&done);
            }
            eprintln!("incident {} {} by {}", done.id, done.state, done.resolved_by.as_deref().unwrap_or("?"));
            Ok(())
        }),
        Some(Command::Token(TokenCommand::List { remote })) => kiln_common::runtime()?.block_on(async {
            let c = client(&cfg, &remote)?;
            let list: api::Tokens = c.get("/v1/tokens").await?;
            print_list(remote.json, &list, &list.tokens, "no tokens", |t| {
                let expiry = match (t.expires_ms, t.expired) {
                    (None, _) => "never expires".to_owned(),
                    (Some(_), true) => "expired".to_owned(),
                    (Some(e), false) => format!("expires in {}", human_ms(e - kiln_protocol::now_ms())),
                };
                let devices =
                    if t.devices.is_empty() { String::new() } else { format!("  serves {}", t.devices.join(",")) };
                let budget = match (t.budget_seconds, &t.budget_period) {
                    (Some(s), Some(p)) => format!("  budget {s} s a {p}"),
                    _ => String::new(),
                };
                println!("{:<24} {:<9} {expiry}{devices}{budget}", t.name, t.role.as_str());
            })
        }),
        Some(Command::Token(TokenCommand::Revoke { name, remote })) => kiln_common::runtime()?.block_on(async {
            let c = client(&cfg, &remote)?;
            c.delete(&format!("/v1/tokens/{}", kiln_protocol::url_component(&name))).await?;
            eprintln!("token {name:?} revoked");
            Ok(())
        }),
        Some(Command::Token(TokenCommand::Create { name, role, expires_in, budget, period, remote })) => {
            kiln_common::runtime()?.block_on(async {
                let c = client(&cfg, &remote)?;
                let new = api::NewToken {
                    name,
                    role,
                    devices: vec![],
                    expires_in_seconds: expires_in,
                    budget_period: budget.map(|_| period),
                    budget_seconds: budget,
                };
                let made: api::TokenCreated = c.send_json(Method::POST, "/v1/tokens", Some(&new)).await?;
                if remote.json {
                    print_json(&made)?;
                } else {
                    println!("{}", made.token);
                    eprintln!("token {:?} ({}) created; it is shown only this once", made.name, made.role);
                }
                Ok(())
            })
        }
    }
}

/// Prints an answer as `--json` does: pretty JSON.
fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints a job: a line and its asset or error.
fn print_job(j: &api::Job) {
    println!("{}  {:<10} {:<8} {}×{} seed {}  {:?}", j.id, j.state, j.tier, j.width, j.height, j.seed, j.prompt);
    if let Some(a) = &j.asset {
        println!("  asset  {a}");
    }
    if let Some(e) = &j.error {
        println!("  error  {e}");
    }
}

/// Prints an answer as `--json` asks: JSON, or its lines (`print`).
fn show<T: serde::Serialize>(v: &T, json: bool, print: fn(&T)) -> anyhow::Result<()> {
    if json {
        return print_json(v);
    }
    print(v);
    Ok(())
}

/// A list call's path: `base?limit=N`, then `&key=value` for each filter that is set.
fn list_path(base: &str, limit: u32, filters: &[(&str, Option<String>)]) -> String {
    let mut path = format!("{base}?limit={limit}");
    for (key, value) in filters {
        if let Some(v) = value {
            path.push_str(&format!("&{key}={v}"));
        }
    }
    path
}

/// A span of milliseconds as a person reads it: `45 s`, `12 min`, `5 h`, `30 d`.
fn human_ms(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// Prints a list answer: the whole of it as JSON with `--json`; else `none` when it is empty, or
/// each item.
fn print_list<T: serde::Serialize, I>(
    json: bool,
    answer: &T,
    items: &[I],
    none: &str,
    each: fn(&I),
) -> anyhow::Result<()> {
    if json {
        return print_json(answer);
    }
    if items.is_empty() {
        println!("{none}");
    }
    items.iter().for_each(each);
    Ok(())
}

/// Whether a job ended well: succeeded, or answered from the cache.
fn ended_well(state: JobState) -> bool {
    matches!(state, JobState::Succeeded | JobState::Cached)
}

async fn submit(cfg: &FarmConfig, a: &SubmitArgs) -> anyhow::Result<()> {
    let c = client(cfg, &a.remote)?;
    let req = JobRequest {
        prompt: a.prompt.clone(),
        seed: a.seed,
        tier: a.tier,
        width: a.width,
        height: a.height,
        samples: a.samples,
        model: None,
        idempotency_key: a.idempotency_key.clone(),
    };
    if a.count > 1 {
        return submit_many(&c, a, req).await;
    }
    if let Some(out) = &a.out {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!("--out {}: the directory {} does not exist", out.display(), parent.display());
        }
    }
    let job: api::Job = c.send_json(Method::POST, "/v1/jobs", Some(&req)).await?;
    let id = job.id.clone();
    if !a.remote.json {
        eprintln!("job {id}: {}", job.state);
    }
    if !(a.wait || a.out.is_some()) {
        return show(&job, a.remote.json, print_job);
    }
    let bar = kiln_common::progress::rows_bar("  rendering", 1, a.remote.json);
    c.follow(&id, |kind, data| {
        match kind {
            "progress" => {
                if let Ok(p) = api::JobProgress::deserialize(data) {
                    match (p.tiles_done, p.tiles) {
                        // A job cut into tiles across the farm counts its tiles.
                        (Some(done), Some(tiles)) => {
                            if bar.is_hidden() {
                                if !a.remote.json {
                                    eprintln!("  tiles: {done}/{tiles} done");
                                }
                            } else {
                                kiln_common::progress::count(&bar, "tiles");
                                bar.set_length(u64::from(tiles.max(1)));
                                bar.set_position(u64::from(done));
                            }
                        }
                        _ => {
                            bar.set_length(u64::from(p.rows.max(1)));
                            bar.set_position(u64::from(p.rows_done));
                        }
                    }
                }
            }
            "state" => {
                let Ok(e) = api::JobEvent::deserialize(data) else { return true };
                if !a.remote.json {
                    // Above the bar while it is drawn; alone otherwise.
                    let line = format!("  {}: {}", e.state, e.detail);
                    if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) }
                }
                return !e.state.is_terminal();
            }
            _ => {}
        }
        true
    })
    .await?;
    bar.finish_and_clear();
    let job: api::Job = c.get(&format!("/v1/jobs/{id}")).await?;
    if let Some(out) = &a.out {
        let asset = job.asset.as_ref().with_context(|| format!("job {id} ended {} without an asset", job.state))?;
        let n = c
            .download(&format!("/v1/assets/{asset}"), out)
            .await
            .with_context(|| format!("failed to fetch the PNG to --out {}", out.display()))?;
        if !a.remote.json {
            eprintln!("  wrote {} ({n} bytes)", out.display());
        }
    }
    show(&job, a.remote.json, print_job)?;
    if !ended_well(job.state) {
        bail!("job {id} ended {}: {}", job.state, job.error.as_deref().unwrap_or("no error recorded"));
    }
    Ok(())
}

/// `kiln submit --count N`: the jobs go in one request; with --wait (or --out DIR) each is shown,
/// and its PNG fetched, as it ends, in order.
async fn submit_many(c: &Client, a: &SubmitArgs, req: JobRequest) -> anyhow::Result<()> {
    if req.idempotency_key.is_some() {
        bail!("--idempotency-key names one job; it cannot go with --count {}", a.count);
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("--out {}: cannot make the directory", dir.display()))?;
    }
    let items: Vec<JobRequest> =
        (0..a.count).map(|i| JobRequest { seed: a.seed.map(|s| s.wrapping_add(i)), ..req.clone() }).collect();
    let made: api::JobBatch = c.send_json(Method::POST, "/v1/jobs", Some(&items)).await?;
    if !(a.wait || a.out.is_some()) {
        if a.remote.json {
            return print_json(&made);
        }
        made.jobs.iter().for_each(print_job);
        return Ok(());
    }
    let (mut ended, mut failed, n) = (Vec::with_capacity(made.jobs.len()), 0, made.jobs.len());
    for (i, job) in made.jobs.into_iter().enumerate() {
        let id = job.id;
        let job = loop {
            let job: api::Job = c.get(&format!("/v1/jobs/{id}?wait=60")).await?;
            if job.state.is_terminal() {
                break job;
            }
        };
        if let (Some(dir), Some(asset)) = (&a.out, &job.asset) {
            let out = dir.join(format!("{}.png", job.seed));
            c.download(&format!("/v1/assets/{asset}"), &out)
                .await
                .with_context(|| format!("failed to fetch job {id}'s PNG to {}", out.display()))?;
        }
        if !ended_well(job.state) {
            failed += 1;
        }
        if !a.remote.json {
            eprintln!("[{}/{n}] seed {}: {}", i + 1, job.seed, job.state);
            print_job(&job);
        }
        ended.push(job);
    }
    if a.remote.json {
        print_json(&api::JobBatch { jobs: ended })?;
    }
    if failed > 0 {
        bail!("{failed} of {n} jobs did not succeed");
    }
    Ok(())
}

async fn jobs(cfg: &FarmConfig, a: &JobsArgs) -> anyhow::Result<()> {
    let c = client(cfg, &a.remote)?;
    let filters = [("state", a.state.map(|s| s.to_string())), ("tier", a.tier.map(|t| t.to_string()))];
    let page: api::JobPage = c.get(&list_path("/v1/jobs", a.limit, &filters)).await?;
    print_list(a.remote.json, &page, &page.jobs, "no jobs", print_job)
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A fresh random password: 32 hex digits.
fn new_password() -> anyhow::Result<String> {
    kiln_scheduler::auth::random_hex().context("no random source for a password")
}

/// Checks a name that becomes a broker user.
fn broker_user(name: &str, whose: &str) -> anyhow::Result<()> {
    if !kiln_protocol::fleet::valid_id(name) {
        bail!("NAME: {name:?} is not 1 to 64 of A-Z a-z 0-9 - _ . (it is the {whose})");
    }
    Ok(())
}

async fn worker_add(cfg: &FarmConfig, a: &WorkerAddArgs) -> anyhow::Result<()> {
    broker_user(&a.name, "box's RabbitMQ user")?;
    let c = client(cfg, &a.remote)?;
    let new = api::NewToken {
        name: a.name.clone(),
        role: Role::Worker,
        devices: vec![],
        expires_in_seconds: None,
        budget_seconds: None,
        budget_period: None,
    };
    let made: api::TokenCreated = c.send_json(Method::POST, "/v1/tokens", Some(&new)).await?;
    let password = new_password()?;
    let names = kiln_protocol::wire::Names::new(a.prefix.as_deref().unwrap_or(&cfg.scheduler.broker.prefix));
    let permissions = names.worker_permissions();
    let quoted: Vec<String> = permissions.iter().map(|p| shell_quote(p)).collect();
    let broker_commands = vec![
        format!("rabbitmqctl add_user {} {}", shell_quote(&a.name), shell_quote(&password)),
        format!(
            "rabbitmqctl set_permissions -p {} {} {}",
            shell_quote(&a.vhost),
            shell_quote(&a.name),
            quoted.join(" ")
        ),
    ];
    let added = WorkerAdded {
        name: made.name,
        token: made.token,
        amqp_username: a.name.clone(),
        amqp_password: password,
        vhost: a.vhost.clone(),
        permissions,
        broker_commands,
    };
    if a.remote.json {
        return print_json(&added);
    }
    let vhost = added.vhost.replace('%', "%25").replace('/', "%2f");
    println!("# {}: the secrets below are shown only this once.", added.name);
    println!();
    println!("# On the worker box (kiln-worker run), with BROKER the RabbitMQ host:");
    println!("KILN_WORKER_TOKEN={}", added.token);
    println!("KILN_AMQP_URL=amqp://{}:{}@BROKER:5672/{vhost}", added.amqp_username, added.amqp_password);
    println!();
    println!("# On the broker host, as root:");
    for line in &added.broker_commands {
        println!("{line}");
    }
    eprintln!("worker token {:?} created", added.name);
    Ok(())
}

async fn device_add(cfg: &FarmConfig, a: &DeviceAddArgs) -> anyhow::Result<()> {
    use kiln_protocol::fleet::{Topics, valid_id};
    broker_user(&a.name, "Pi's MQTT user")?;
    if let Some((i, d)) = a.devices.iter().enumerate().find(|(_, d)| !valid_id(d)) {
        bail!("--devices[{i}]: {d:?} is not a device id (1 to 64 of A-Z a-z 0-9 - _ .)");
    }
    let c = client(cfg, &a.remote)?;
    let new = api::NewToken {
        name: a.name.clone(),
        role: Role::Device,
        devices: a.devices.clone(),
        expires_in_seconds: None,
        budget_seconds: None,
        budget_period: None,
    };
    let made: api::TokenCreated = c.send_json(Method::POST, "/v1/tokens", Some(&new)).await?;
    let password = new_password()?;
    let topics = Topics::new(a.prefix.as_deref().unwrap_or(&cfg.scheduler.fleet.prefix));
    let acl = topics.agent_acl(&a.name, &a.devices);
    let (passwd, acl_file) = (a.passwd_file.display().to_string(), a.acl_file.display().to_string());
    let broker_commands = vec![
        format!("mosquitto_passwd -b {} {} {}", shell_quote(&passwd), shell_quote(&a.name), shell_quote(&password)),
        format!(
            "printf '%s\\n' '' {} >> {}",
            acl.iter().map(|l| shell_quote(l)).collect::<Vec<_>>().join(" "),
            shell_quote(&acl_file)
        ),
        "pkill -HUP -x mosquitto   # Mosquitto reads its password and ACL files again".to_owned(),
    ];
    let added = DeviceAdded {
        name: made.name,
        devices: made.devices,
        token: made.token,
        mqtt_username: a.name.clone(),
        mqtt_password: password,
        acl,
        broker_commands,
    };
    if a.remote.json {
        return print_json(&added);
    }
    println!("# {} serves {}. The secrets below are shown only this once.", added.name, added.devices.join(", "));
    println!();
    println!("# On the Pi, in edge.toml (its [[device]] ids must be these):");
    println!("[mqtt]\nusername = \"{}\"\npassword = \"{}\"", added.mqtt_username, added.mqtt_password);
    println!("[scheduler]\ntoken = \"{}\"", added.token);
    println!();
    println!("# On the broker host (Mosquitto with infra/mosquitto/kiln.conf), as root:");
    for line in &added.broker_commands {
        println!("{line}");
    }
    eprintln!("device token {:?} created; it serves {}", added.name, added.devices.join(", "));
    Ok(())
}

async fn devices(cfg: &FarmConfig, a: &DevicesArgs) -> anyhow::Result<()> {
    let c = client(cfg, &a.remote)?;
    let list: api::Devices = c.get("/v1/devices").await?;
    print_list(a.remote.json, &list, &list.devices, "no devices have announced themselves", print_device)
}

fn print_device(d: &api::Device) {
    let age = d.seconds_since_telemetry.map_or("-".to_owned(), |a| format!("{a:.0} s ago"));
    let detail = d.detail.as_deref().unwrap_or("");
    println!("{:<16} {:<8} {:<9} telemetry {age:<10} {detail}", d.id, d.kind, d.state);
}

fn print_task(t: &api::Task) {
    let detail = t.detail.as_deref().unwrap_or("");
    println!("{}  {:<9} {:<8} on {:<12} {detail}", t.id, t.state, t.kind, t.device_id);
    if let Some(a) = &t.output_asset {
        println!("  output asset  {a}");
    }
}

async fn task(cfg: &FarmConfig, a: &TaskArgs) -> anyhow::Result<()> {
    let c = client(cfg, &a.remote)?;
    let body = api::NewTask {
        kind: a.kind,
        asset: a.asset.clone(),
        params: a.params.iter().cloned().collect(),
        deadline_seconds: a.deadline,
    };
    let t: api::Task = c.send_json(Method::POST, &format!("/v1/devices/{}/tasks", a.device), Some(&body)).await?;
    let id = t.id.clone();
    if !a.wait {
        return show(&t, a.remote.json, print_task);
    }
    let mut shown = 0;
    loop {
        let t: api::Task = c.get(&format!("/v1/tasks/{id}")).await?;
        let events = t.events.as_deref().unwrap_or_default();
        if !a.remote.json {
            for e in events.iter().skip(shown) {
                let detail = e.detail.as_deref().map(|d| format!("  {d}")).unwrap_or_default();
                eprintln!("{id}  {}{detail}", e.state);
            }
        }
        shown = events.len();
        if t.state.is_terminal() {
            show(&t, a.remote.json, print_task)?;
            if t.state != TaskState::Succeeded {
                bail!("task {id} ended {}", t.state);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn tasks(cfg: &FarmConfig, a: &TasksArgs) -> anyhow::Result<()> {
    let c = client(cfg, &a.remote)?;
    let filters = [("device", a.device.clone()), ("state", a.state.clone())];
    let list: api::Tasks = c.get(&list_path("/v1/tasks", a.limit, &filters)).await?;
    print_list(a.remote.json, &list, &list.tasks, "no tasks", print_task)
}

async fn job(cfg: &FarmConfig, a: &JobArgs) -> anyhow::Result<()> {
    let c = client(cfg, &a.remote)?;
    let job: api::Job = c.get(&format!("/v1/jobs/{}", a.id)).await?;
    if a.remote.json {
        return print_json(&job);
    }
    print_job(&job);
    // The stored events, read from the stream until it has nothing more to say at once.
    let mut events = Vec::new();
    let follow = c.follow(&a.id, |kind, data| {
        let Ok(e) = api::JobEvent::deserialize(data) else { return true };
        let more = !e.state.is_terminal();
        if kind == "state" {
            events.push(e);
        }
        more
    });
    let _ = tokio::time::timeout(Duration::from_millis(300), follow).await;
    for e in &events {
        println!("  {}  {:<10} {}", kiln_scheduler::time::rfc3339(e.at_ms), e.state, e.detail);
    }
    Ok(())
}

async fn cancel(cfg: &FarmConfig, a: &JobArgs) -> anyhow::Result<()> {
    let c = client(cfg, &a.remote)?;
    let job: api::Job = c.call_as(Method::POST, &format!("/v1/jobs/{}/cancel", a.id), None).await?;
    show(&job, a.remote.json, print_job)
}

fn print_order_line(o: &api::Order) {
    let at = o.steps.iter().find(|s| !["succeeded", "skipped"].contains(&s.state.as_str()));
    let step = at.map(|s| format!("at {} ({})", s.name, s.state)).unwrap_or_default();
    println!("{}  {:<17} {:<13} {step}  {:?}", o.id, o.state, o.plan, o.prompt);
}

/// An order's steps, one line each, and its approval and outputs.
fn print_order(o: &api::Order) {
    print_order_line(o);
    for s in &o.steps {
        let made = if s.assets.is_empty() { String::new() } else { format!("  {}", s.assets.join(" ")) };
        let detail = s.detail.as_deref().map(|d| format!("  {d}")).unwrap_or_default();
        println!("  {:<13} {:<10} {made}{detail}", s.name, s.state);
    }
    if let Some(a) = &o.approval {
        let by = a.decided_by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
        println!("  approval {} {}{by}", a.id, a.state);
    }
    for (k, v) in &o.outputs {
        println!("  output {k:<6} {v}");
    }
    if let Some(ms) = o.estimated_cost_ms {
        println!("  estimated cost {:.1} device-seconds", ms as f64 / 1000.0);
    }
    if let Some(e) = &o.error {
        println!("  error  {e}");
    }
}

async fn order(cfg: &FarmConfig, a: OrderArgs) -> anyhow::Result<()> {
    match (a.command, a.id) {
        (Some(OrderCommand::Create(a)), _) => {
            let c = client(cfg, &a.remote)?;
            let new = api::NewOrder {
                plan: a.plan.clone(),
                prompt: a.prompt.clone(),
                seeds: a.seeds.clone(),
                model: a.model.clone(),
                approval_timeout_seconds: a.approval_timeout,
                expires_in_seconds: None,
            };
            if a.dry_run {
                let e: api::OrderEstimate = c.send_json(Method::POST, "/v1/orders?dry_run=true", Some(&new)).await?;
                if a.remote.json {
                    return print_json(&e);
                }
                println!(
                    "plan {}: {} renders, estimated {:.1} device-seconds; nothing placed",
                    e.plan,
                    e.renders,
                    e.estimated_cost_ms as f64 / 1000.0
                );
                return Ok(());
            }
            let placed: api::Order = c.send_json(Method::POST, "/v1/orders", Some(&new)).await?;
            if !a.wait {
                return show(&placed, a.remote.json, print_order);
            }
            let estimate =
                placed.estimated_cost_ms.map(|ms| format!(", estimated {:.1} device-seconds", ms as f64 / 1000.0));
            eprintln!("order {} placed ({}{})", placed.id, placed.plan, estimate.unwrap_or_default());
            let done = follow_order(&c, &placed.id).await?;
            show(&done, a.remote.json, print_order)?;
            if done.state != "succeeded" {
                bail!("order {} {}: {}", done.id, done.state, done.error.unwrap_or_default());
            }
            Ok(())
        }
        (Some(OrderCommand::Cancel { id, remote }), _) => {
            let c = client(cfg, &remote)?;
            let path = format!("/v1/orders/{}/cancel", kiln_protocol::url_component(&id));
            let o: api::Order = c.send_json::<_, ()>(Method::POST, &path, None).await?;
            show(&o, remote.json, print_order)
        }
        (None, Some(id)) => {
            let c = client(cfg, &a.remote)?;
            let o: api::Order = c.get(&format!("/v1/orders/{}", kiln_protocol::url_component(&id))).await?;
            if a.remote.json {
                return print_json(&o);
            }
            print_order(&o);
            for e in o.events.iter().flatten() {
                println!("  {}  {:<13} {:<17} {}", e.at, e.step.as_deref().unwrap_or("order"), e.state, e.detail);
            }
            Ok(())
        }
        (None, None) => bail!("name an order (`kiln order ID`), or `kiln order create PROMPT --seeds 3,4,5`"),
    }
}

/// Shows an order's steps as they change (on stderr) until it ends; returns it ended.
async fn follow_order(c: &Client, id: &str) -> anyhow::Result<api::Order> {
    let path = format!("/v1/orders/{}", kiln_protocol::url_component(id));
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut said_approval = false;
    loop {
        let o: api::Order = c.get(&path).await?;
        for s in &o.steps {
            let now = (s.name.clone(), s.state.clone());
            if s.state != "pending" && !seen.contains(&now) {
                eprintln!("  {:<13} {:<10} {}", s.name, s.state, s.detail.as_deref().unwrap_or(""));
                seen.push(now);
            }
        }
        if o.state == "awaiting_approval" && !said_approval {
            if let Some(ap) = &o.approval {
                eprintln!("  awaiting approval {}: `kiln approvals`, then `kiln approve {} --option N`", ap.id, ap.id);
            }
            said_approval = true;
        }
        if !["running", "awaiting_approval"].contains(&o.state.as_str()) {
            return Ok(o);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn decide(cfg: &FarmConfig, id: &str, d: &api::Decision, remote: &Remote) -> anyhow::Result<()> {
    let c = client(cfg, remote)?;
    let path = format!("/v1/approvals/{}", kiln_protocol::url_component(id));
    let o: api::Order = c.send_json(Method::POST, &path, Some(d)).await?;
    if remote.json {
        return print_json(&o);
    }
    let a = o.approval.as_ref();
    eprintln!(
        "approval {id} {} by {}",
        a.map_or("?", |a| a.state.as_str()),
        a.and_then(|a| a.decided_by.as_deref()).unwrap_or("?")
    );
    Ok(())
}

/// `kiln reproduce HASH`: the provenance and bytes from the farm, the render here.
async fn reproduce(cfg: &FarmConfig, a: &ReproduceArgs) -> anyhow::Result<()> {
    use kiln_worker::config::BackendChoice;
    use kiln_worker::reproduce::{read_record, reproduce};
    if a.hash.len() != 64 || !a.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("HASH: {:?} is not an asset's BLAKE3 (64 hex digits)", a.hash);
    }
    let c = client(cfg, &a.remote)?;
    let record: serde_json::Value = c.get(&format!("/v1/assets/{}/provenance", a.hash)).await?;
    let record = read_record(&record)?;
    let original = c.bytes(&format!("/v1/assets/{}", a.hash)).await?;
    let choice = a.backend.unwrap_or(if record.backend == "wgpu" { BackendChoice::Wgpu } else { BackendChoice::Cpu });
    let w = cfg.worker.clone();
    let verdict = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let backend = kiln_worker::worker::open_backend(choice, w.threads())
            .with_context(|| format!("--backend {choice:?}: cannot open it here"))?;
        let engine = kiln_worker::render::Engine { backend, path: w.engine, band_samples: w.band_samples };
        let r = &record.request;
        let label = format!("rendering {}×{} {} on {} again", r.width, r.height, r.tier, engine.backend.name());
        Ok(reproduce(&record, &original, &engine, &mut kiln_worker::cli::progress_reporter(label))?)
    })
    .await??;
    if a.remote.json {
        print_json(&verdict)?;
    } else {
        println!("{}", verdict.summary);
    }
    if !verdict.verified {
        bail!("asset {} is not reproduced", verdict.asset);
    }
    Ok(())
}

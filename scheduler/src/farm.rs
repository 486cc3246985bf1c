//! The embedded farm: SQLite state, the API, the dispatcher and N in-process workers in one
//! process. [`Farm::build`] does everything that can fail before a port is bound;
//! [`Farm::run_until_stopped`] serves until its shutdown token is cancelled, then drains.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_worker::config::{BackendChoice, ConfigError};
use kiln_worker::render::Backend;
use kiln_worker::worker::{Worker, open_backend};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Role;
use crate::config::FarmConfig;
use crate::dispatch::local::{self, LocalQueue};
use crate::dispatch::run_outbox;
use crate::scheduler::{Scheduler, TokenRefusal};
use crate::store::{BoxFut, PgStore, SqliteStore, Store};

/// The database file in the data dir.
pub const DB_FILE: &str = "kiln.db";

/// A farm ready to run.
pub struct Farm {
    sched: Arc<Scheduler>,
    listener: TcpListener,
    token_path: PathBuf,
    token_created: bool,
    /// The API's TLS settings, when it serves HTTPS.
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Writes a secret readable by its owner only.
pub fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The token kept in `path` while it still authenticates with `role`; else a new one, created under
/// `name` (or `name-2`, `name-3`, … if taken) and written to `path` (mode 0600). The secret, and
/// whether it was created now.
pub async fn ensure_token(
    sched: &Scheduler,
    path: &Path,
    name: &str,
    role: Role,
    devices: &[String],
) -> anyhow::Result<(String, bool)> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_owned();
        if sched.authenticate(&t).is_some_and(|c| c.role == role && c.devices == devices) {
            return Ok((t, false));
        }
    }
    // First start, or the file was lost: a fresh token, under a free name.
    let mut n = 1;
    let secret = loop {
        let free = if n == 1 { name.to_owned() } else { format!("{name}-{n}") };
        match sched.create_token(&free, role, devices, None, None).await {
            Ok(s) => break s,
            Err(TokenRefusal::Store(crate::store::StoreError::Conflict(_))) if n < 1000 => n += 1,
            Err(e) => return Err(e).with_context(|| format!("failed to create the {role} token")),
        }
    };
    write_private(path, secret.expose())
        .with_context(|| format!("failed to write the {role} token to {}", path.display()))?;
    Ok((secret.expose().to_owned(), true))
}

/// Opens the store the config names: SQLite in the data dir unless `scheduler.database_url`
/// says `sqlite://PATH` or `postgres://…`.
pub async fn open_store(cfg: &FarmConfig) -> anyhow::Result<Arc<dyn Store>> {
    match cfg.scheduler.database_url.as_ref().map(|u| (u.expose(), u)) {
        Some((url, shown)) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PgStore::open(url).await.with_context(|| format!("failed to open the database at {shown}"))?;
            Ok(Arc::new(store))
        }
        other => {
            let db = match other.and_then(|(u, _)| u.strip_prefix("sqlite://").or_else(|| u.strip_prefix("sqlite:"))) {
                Some(path) => PathBuf::from(path),
                None => cfg.data_dir().join(DB_FILE),
            };
            let store = SqliteStore::open(&db)
                .await
                .with_context(|| format!("failed to open the database {}", db.display()))?;
            Ok(Arc::new(store))
        }
    }
}

impl Farm {
    /// Opens the data dir and database, loads the engine, makes sure an operator token exists
    /// (creating `DATA/operator.token`, mode 0600, on first start) and binds the listener.
    /// Boxed, as [`serve`] is, so that its body is compiled here once (an async body is compiled
    /// again in every crate that polls it); not `Send`, as sqlx's connect cannot promise it
    /// through a trait object.
    pub fn build(
        cfg: &FarmConfig,
        backend: Backend,
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<Farm>> + '_>> {
        Box::pin(async move {
            let data = cfg.data_dir();
            std::fs::create_dir_all(data)
                .with_context(|| format!("failed to create the data dir {}", data.display()))?;
            let t = &cfg.scheduler.tls;
            if let Some(ca) = &t.ca_file {
                kiln_common::tls::trust_ca_file(ca).context("scheduler.tls.ca_file")?;
            }
            let tls = match (&t.cert_file, &t.key_file) {
                (Some(cert), Some(key)) => {
                    Some(kiln_common::tls::server_config(cert, key).context("scheduler.tls.cert_file/key_file")?)
                }
                _ => None,
            };
            let store = open_store(cfg).await?;
            // The database keeps the provenance of what the farm renders, and answers its repeats.
            let worker =
                Worker::new(&cfg.worker, backend).context("failed to set up the worker")?.records_kept_by_caller();
            let sched = Scheduler::new(store, Arc::new(worker), cfg.scheduler.clone(), cfg.worker.tiers.clone())
                .await
                .context("failed to load the scheduler's state")?;
            let token_path = cfg.token_path();
            let (_, token_created) = ensure_token(&sched, &token_path, "operator", Role::Operator, &[]).await?;
            let addr = cfg.scheduler.listen;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to listen on {addr} (scheduler.listen)"))?;
            Ok(Farm { sched, listener, token_path, token_created, tls })
        })
    }

    /// Where the API listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The API's base URL: `https://` when it serves TLS.
    pub fn url(&self) -> std::io::Result<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}", self.local_addr()?))
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.sched
    }

    /// Where the operator token is, and whether this start created it.
    pub fn token_file(&self) -> (&Path, bool) {
        (&self.token_path, self.token_created)
    }

    /// [`Self::run_until_stopped`] on a task of its own, as the tests and benchmarks run a farm.
    pub fn spawn(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        tokio::spawn(self.run_until_stopped(shutdown))
    }

    /// Serves until `shutdown` is cancelled; then stops taking work, lets renders in hand finish
    /// for up to `scheduler.shutdown_grace_seconds`, and returns. Whatever did not finish is still
    /// in the database and runs again at the next start. Not generic over what stops it, so the
    /// farm's whole run (the API's server, dispatch, workers) is compiled here once and not again
    /// in each binary, test and benchmark that runs a farm.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Farm { sched, listener, tls, .. } = self;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        sched.registry.set_drained(sched.store.drained().await.context("failed to read the drained workers")?);
        if sched.cfg.broker.amqp_url.is_some() {
            // Distributed: the outbox goes to RabbitMQ; jobs in hand are the broker's and the
            // workers', so there is nothing to resume.
            tracker.spawn(crate::broker::run(sched.clone(), sched.cfg.broker.clone(), stop.clone()));
        } else {
            let resumed = sched.resume().await.context("failed to resume the jobs of the last run")?;
            if resumed > 0 {
                tracing::info!(jobs = resumed, "resumed jobs that were in hand when the farm last stopped");
            }
            let queue = Arc::new(LocalQueue::default());
            let (s, q, st) = (sched.clone(), queue.clone(), stop.clone());
            // The in-process queue cannot fail as a transport: the loop ends only on `stop`.
            tracker.spawn(async move { run_outbox(&s, &*q, &st).await });
            for n in 0..sched.cfg.workers {
                let tiers = sched.cfg.worker_tiers.clone();
                local::join(&sched, n, &tiers);
                tracker.spawn(local::run_worker(sched.clone(), queue.clone(), n, tiers, stop.clone()));
            }
        }
        if sched.cfg.fleet.mqtt_url.is_some() {
            tracker.spawn(crate::fleet::run(sched.clone(), sched.cfg.fleet.clone(), stop.clone()));
        }
        // Tokens revoked or made on another node of the farm (one database, several schedulers).
        tracker.spawn(sched.clone().watch_tokens(Duration::from_secs(1), stop.clone()));
        tracker.spawn(crate::retention::run(sched.clone(), stop.clone()));
        // The conductor: resumes the live orders from their checkpoints, then follows events.
        tracker.spawn(crate::orders::run(sched.clone(), stop.clone()));
        tracker.close();
        let http_stop = stop.clone();
        let app = crate::api::router(sched.clone());
        let limits = sched.cfg.limits.clone();
        let server =
            tokio::spawn(async move { crate::api::serve::serve(listener, app, &limits, tls, http_stop).await });
        shutdown.cancelled().await;
        tracing::info!("shutting down: no new work; finishing renders in hand");
        stop.cancel();
        let grace = Duration::from_secs(sched.cfg.shutdown_grace_seconds);
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                "renders still in hand after the grace period; they run again at the next start"
            );
        }
        // Open event streams and long polls end with the process.
        if tokio::time::timeout(Duration::from_secs(1), server).await.is_err() {
            tracing::info!("closed connections still open after shutdown");
        }
        Ok(())
    }
}

/// The file where a running farm leaves its API's URL, for the CLI on the same machine.
pub fn url_file(data_dir: &Path) -> PathBuf {
    data_dir.join("api.url")
}

/// What `kiln up` and `kiln-scheduler` both take on their command line; each overrides the
/// config file and the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address for the API [default: 127.0.0.1:7878; env KILN_LISTEN].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// In-process workers [default: 2; env KILN_WORKERS].
    #[arg(long)]
    pub workers: Option<usize>,
    /// auto, cpu or wgpu [default: auto; env KILN_BACKEND].
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
}

impl ServeArgs {
    /// Puts these flags over `cfg` and checks the result.
    pub fn apply(&self, cfg: &mut FarmConfig) -> Result<(), ConfigError> {
        cfg.scheduler.listen = self.listen.unwrap_or(cfg.scheduler.listen);
        cfg.scheduler.workers = self.workers.unwrap_or(cfg.scheduler.workers);
        cfg.worker.backend = self.backend.unwrap_or(cfg.worker.backend);
        cfg.validate()
    }
}

/// Opens the backend the config asks for; with the words that say which device it renders on.
pub fn open_farm_backend(cfg: &FarmConfig) -> anyhow::Result<(Backend, String)> {
    let backend = open_backend(cfg.worker.backend, cfg.worker.threads()).context("failed to open the backend")?;
    let device = format!("{} ({})", backend.name(), backend.device_name());
    Ok((backend, device))
}

/// `kiln-scheduler`'s command: the farm the config and `serve`'s flags describe, served until
/// SIGINT or SIGTERM (or the config printed, with `--print-config`). A plain function, so the
/// binary stays a thin `main` and the farm is compiled here once.
pub fn run_scheduler(global: &kiln_common::GlobalArgs, flags: &ServeArgs) -> anyhow::Result<()> {
    let mut cfg = FarmConfig::load_for(global)?;
    flags.apply(&mut cfg)?;
    if global.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    kiln_common::runtime()?.block_on(async {
        let (backend, device) = open_farm_backend(&cfg)?;
        let farm = Farm::build(&cfg, backend).await?;
        let fleet = match &cfg.scheduler.fleet.mqtt_url {
            Some(mqtt) => format!("  fleet    bridged over {mqtt}"),
            None => "  fleet    none (scheduler.fleet.mqtt_url bridges to the edge agents' broker)".to_owned(),
        };
        serve(farm, &cfg, "kiln-scheduler", &device, &[fleet]).await?;
        println!("kiln-scheduler: stopped");
        Ok(())
    })
}

/// Serves `farm` as a binary does until SIGINT or SIGTERM: leaves its URL in `DATA/api.url`
/// while it runs, prints where everything is (headed by `name`, with `extra` lines of the
/// caller's), and removes the URL file once it has stopped. Boxed and not generic, so the farm's
/// whole run is compiled here once and not again in each binary that serves it (an async body is
/// compiled again in every crate that polls it).
pub fn serve<'a>(
    farm: Farm,
    cfg: &'a FarmConfig,
    name: &'a str,
    device: &'a str,
    extra: &'a [String],
) -> BoxFut<'a, anyhow::Result<()>> {
    Box::pin(async move {
        let url = farm.url()?;
        let url_path = url_file(cfg.data_dir());
        std::fs::write(&url_path, format!("{url}\n"))
            .with_context(|| format!("failed to write {}", url_path.display()))?;
        let (token, created) = farm.token_file();
        println!("{name}: the farm is running");
        println!("  API      {url}/v1   (OpenAPI: {url}/v1/openapi.json)");
        println!("  console  {url}/   (sign in with a token)");
        println!("  metrics  {url}/metrics");
        println!("  token    {}{}", token.display(), if created { " (created now)" } else { "" });
        println!("  data     {}", cfg.data_dir().display());
        if let Some(db) = &cfg.scheduler.database_url {
            println!("  database {db}");
        }
        if let Some(amqp) = &cfg.scheduler.broker.amqp_url {
            println!("  broker   {amqp} (prefix {})", cfg.scheduler.broker.prefix);
            println!(
                "  workers  none heard yet: kiln-worker daemons render (GET /v1/workers lists them; /healthz warns of a tier with jobs and none to take them)"
            );
        } else {
            let tiers: Vec<&str> = cfg.scheduler.worker_tiers.iter().map(|t| t.as_str()).collect();
            println!("  workers  {} on {device}, serving {}", cfg.scheduler.workers, tiers.join(", "));
        }
        for line in extra {
            println!("{line}");
        }
        let _ = std::io::stdout().flush();
        let served = farm.run_until_stopped(kiln_common::cancel_on_signal()).await;
        let _ = std::fs::remove_file(&url_path);
        served
    })
}

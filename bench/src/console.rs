//! `kiln bench console`: the console's first paint on an embedded farm whose store holds
//! `--jobs` jobs (100,000) and `--assets` assets (1,000): for the overview and the other views,
//! the time to the response's first byte and the page's weight (its HTML, and the stylesheet and
//! script it loads; thumbnails are lazy and not counted). Each figure is the median of
//! `--requests` requests, over one signed-in session, on a plain HTTP/1.1 connection.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use kiln_protocol::{RenderRequest, Tier};
use kiln_scheduler::store::{Cost, NewJob, Outcome, SqliteStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::farm::{BenchFarm, Cleanup};
use crate::stats::{drive, median};

/// `kiln bench console`'s arguments.
#[derive(Debug, Args)]
pub struct ConsoleBenchArgs {
    /// Jobs in the store, all ended (succeeded), spread over the last week.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Distinct assets the jobs made (each job has one of them).
    #[arg(long, default_value_t = 1_000)]
    pub assets: usize,
    /// Requests per view; the figures are their medians.
    #[arg(long, default_value_t = 20)]
    pub requests: usize,
}

/// The aims: time to first byte and page weight of the overview.
const AIM_TTFB_MS: f64 = 100.0;
const AIM_PAGE_BYTES: usize = 200 * 1024;

/// Fills the store at `db` with `a.jobs` succeeded jobs over `a.assets` assets.
async fn fill(db: &std::path::Path, a: &ConsoleBenchArgs) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db).await?);
    let limits = kiln_protocol::TierLimits::default();
    let now = kiln_protocol::now_ms();
    let week = 7 * 86_400_000_i64;
    let n = a.jobs;
    let assets = a.assets.max(1);
    let words = ["kiln", "dusk", "ember", "glaze", "ash", "copper", "tide", "moss"];
    {
        let store = store.clone();
        drive(n, 64, move |i| {
            let (store, limits) = (store.clone(), limits.clone());
            async move {
                let k = i % assets;
                let prompt = format!("{} {} study {k}", words[k % words.len()], words[(k / 8) % words.len()]);
                let tier = [Tier::Preview, Tier::Final][k % 2];
                let request = RenderRequest::resolve("cppn", &prompt, k as u64, tier, Some(64), None, None, &limits)?;
                let job = NewJob {
                    id: format!("j{i:010}"),
                    request,
                    cache_key: format!("console-bench-key-{i}"),
                    client: "operator".into(),
                    idempotency_key: None,
                    now_ms: now - week + (i as i64 * week / n as i64),
                };
                let t = Instant::now();
                store.submit(job).await?;
                Ok(t.elapsed().as_secs_f64())
            }
        })
        .await?;
    }
    let due = Arc::new(crate::store::take_all(store.as_ref(), now).await?);
    drive(due.len(), 64, move |i| {
        let (store, due) = (store.clone(), due.clone());
        async move {
            let d = &due[i];
            let asset = format!("{:064x}", d.request.seed as usize % assets);
            let provenance = serde_json::json!({
                "asset": asset, "request": d.request, "cache_key": d.cache_key,
                "model": { "id": "cppn", "version": "bench", "path": "fused" }, "backend": "cpu",
                "device": "bench", "post_chain_version": "bench",
            });
            let ok = Outcome::Succeeded {
                asset,
                bytes: 800,
                provenance: Some(provenance.to_string()),
                png: None,
                cost: Some(Cost { device_ms: 5, cost_ms: 5 }),
            };
            let t = Instant::now();
            store.start(d, now).await?.context("a dispatched job would not start")?;
            if store.finish(d, ok, now).await?.is_empty() {
                bail!("the result of job {} was not recorded", d.job_id);
            }
            Ok(t.elapsed().as_secs_f64())
        }
    })
    .await?;
    Ok(())
}

/// One GET of `path` with the session cookie on its own connection: time to the first byte of
/// the response, the whole time, the status and the body's length.
async fn get(addr: std::net::SocketAddr, path: &str, cookie: &str) -> anyhow::Result<(f64, f64, u16, usize)> {
    let t = Instant::now();
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await?;
    let mut first = [0u8; 1];
    conn.read_exact(&mut first).await?;
    let ttfb = t.elapsed().as_secs_f64() * 1000.0;
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await?;
    let whole = t.elapsed().as_secs_f64() * 1000.0;
    let text = [&first[..], &rest[..]].concat();
    let head_end = text.windows(4).position(|w| w == b"\r\n\r\n").context("no end of the response's head")? + 4;
    let head = String::from_utf8_lossy(&text[..head_end]);
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status")?;
    // The body as sent (chunked or not), less the chunks' framing: near enough for a weight.
    Ok((ttfb, whole, status, text.len() - head_end))
}

/// Runs `kiln bench console` and prints its figures.
pub async fn run(cfg: &kiln_scheduler::config::FarmConfig, a: &ConsoleBenchArgs) -> anyhow::Result<()> {
    let _cleanup = Cleanup;
    println!(
        "kiln bench console: the console's first paint with {} jobs and {} assets in the store, {} requests a view (medians)",
        a.jobs, a.assets, a.requests
    );
    let dir = crate::farm::bench_dir("console");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    fill(&dir.join(kiln_scheduler::farm::DB_FILE), a).await?;
    println!("  store filled in {:.1} s", t.elapsed().as_secs_f64());
    let farm = BenchFarm::start_in(cfg, dir, |_| {}).await?;
    let addr = farm.addr;
    let token = farm.token.clone();
    let login = farm
        .client
        .send_with(
            hyper::Method::POST,
            "/login",
            Some(format!("token={token}").into()),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await?;
    let cookie = login
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("signing in gave no session cookie")?
        .to_owned();
    let statics: usize = {
        let mut n = 0;
        for p in ["/console/console.css", "/console/console.js"] {
            n += get(addr, p, &cookie).await?.3;
        }
        n
    };
    let mut overview_ok = true;
    // With the filters that match nothing, the worst case: every job, or every asset, is read.
    let views = [
        ("overview", "/"),
        ("jobs", "/jobs"),
        ("jobs, a tier none has", "/jobs?tier=print"),
        ("gallery", "/gallery"),
        ("gallery, words none has", "/gallery?q=nowhere+at+all"),
        ("orders", "/orders"),
        ("fleet", "/fleet"),
    ];
    for (view, path) in views {
        let (mut ttfb, mut whole, mut bytes) = (Vec::new(), Vec::new(), 0);
        for _ in 0..a.requests.max(1) {
            let (first, all, status, len) = get(addr, path, &cookie).await?;
            if status != 200 {
                bail!("GET {path} answered {status}");
            }
            ttfb.push(first);
            whole.push(all);
            bytes = len;
        }
        let (ttfb, whole) = (median(ttfb), median(whole));
        println!(
            "{view:>24}: first byte {ttfb:.1} ms, whole {whole:.1} ms, {:.1} KB of HTML + {:.1} KB of style and script",
            bytes as f64 / 1024.0,
            statics as f64 / 1024.0
        );
        if view == "overview" {
            overview_ok = ttfb < AIM_TTFB_MS && bytes + statics < AIM_PAGE_BYTES;
        }
    }
    println!(
        "aim (overview): first byte under {AIM_TTFB_MS} ms and under {} KB: {}",
        AIM_PAGE_BYTES / 1024,
        if overview_ok { "met" } else { "NOT met" }
    );
    farm.stop(None).await
}

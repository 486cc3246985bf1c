//! What renders cost ([`crate::costs`]): the `render_costs` ledger, written with each success
//! (in `sqlite.rs` and `postgres.rs`, in the transaction that records it), and read here for
//! budgets, estimates and `GET /v1/usage`; and who asked for an asset, for its provenance. Same SQL for SQLite and PostgreSQL, stamped out by
//! [`costs_impl`].

use kiln_protocol::{RenderRequest, Tier};
use serde::Serialize;

use super::StoreError;
use super::rows::{Cols, corrupt};

/// A render as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charged {
    /// Its tier.
    pub tier: Tier,
    /// Width, height and samples per axis.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Samples per axis.
    pub samples: u32,
    /// Device time, ms.
    pub device_ms: i64,
}

/// One line of `GET /v1/usage`: a client's renders of one tier on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageLine {
    /// The token.
    pub client: String,
    /// The tier.
    pub tier: String,
    /// The day's first millisecond (UTC), unix ms.
    pub day_ms: i64,
    /// Renders charged.
    pub renders: i64,
    /// Their device time, ms.
    pub device_ms: i64,
    /// Weighed by tier, ms.
    pub cost_ms: i64,
}

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// The ledger's reads.
pub trait CostStore {
    /// What `client` was charged since `since_ms`, weighted ms.
    fn spent(&self, client: &str, since_ms: i64) -> super::BoxFut<'_, Result<i64, StoreError>>;
    /// The requests of `client`'s live jobs that lead their renders (what it has in flight).
    fn live_requests(&self, client: &str) -> super::BoxFut<'_, Result<Vec<RenderRequest>, StoreError>>;
    /// The `limit` latest renders charged, newest first.
    fn recent_charges(&self, limit: u32) -> super::BoxFut<'_, Result<Vec<Charged>, StoreError>>;
    /// Use per client, tier and UTC day within `[since_ms, until_ms)`, of one client or all;
    /// newest day first.
    fn usage(
        &self,
        client: Option<String>,
        since_ms: i64,
        until_ms: i64,
    ) -> super::BoxFut<'_, Result<Vec<UsageLine>, StoreError>>;
    /// Which of `keys` the cache answers (an asset was rendered for it).
    fn cached(&self, keys: Vec<String>) -> super::BoxFut<'_, Result<Vec<String>, StoreError>>;
    /// The first `limit` jobs that have asset `hash`, oldest first: who asked for it.
    fn asset_jobs(&self, hash: &str, limit: u32) -> super::BoxFut<'_, Result<Vec<AssetJob>, StoreError>>;
    /// The rendered assets, newest first, each with the first job that had it (of `q.client`'s,
    /// when given), whose request holds each of `q.words` (a coarse match: the caller checks
    /// the prompt itself). Tiles of a job cut up across the farm are left out: their image is
    /// the job's.
    fn gallery(&self, q: GalleryQuery) -> super::BoxFut<'_, Result<Vec<GalleryItem>, StoreError>>;
}

/// The most words a gallery search matches in SQL.
pub const GALLERY_WORDS: usize = 4;

/// What [`CostStore::gallery`] reads.
#[derive(Debug, Clone, Default)]
pub struct GalleryQuery {
    /// Only the assets of this client's jobs.
    pub client: Option<String>,
    /// Words the request must hold, lower case; the first [`GALLERY_WORDS`] are matched.
    pub words: Vec<String>,
    /// After this asset, by (`created_ms`, hash): the previous page's last.
    pub before: Option<(i64, String)>,
    /// How many.
    pub limit: u32,
}

/// An asset in the gallery ([`CostStore::gallery`]).
#[derive(Debug, Clone)]
pub struct GalleryItem {
    /// Its hash.
    pub asset: String,
    /// When it was stored, unix ms.
    pub created_ms: i64,
    /// The first job that had it.
    pub job: super::Job,
}

/// `word` as a `LIKE … ESCAPE '\'` pattern that finds it anywhere.
pub fn like_anywhere(word: &str) -> String {
    let mut p = String::from("%");
    for c in word.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// A job that has an asset ([`CostStore::asset_jobs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetJob {
    /// Its id.
    pub id: String,
    /// The token that submitted it.
    pub client: String,
    /// Its idempotency key: an order's render has `order-{order}-{step}-{attempt}-{n}`.
    pub idempotency_key: Option<String>,
    /// When it was submitted, unix ms.
    pub created_ms: i64,
}

pub(super) fn charged_from_row(r: &impl Cols) -> Result<Charged, StoreError> {
    let tier: String = r.col("tier")?;
    let n = |c: &'static str| -> Result<u32, StoreError> {
        u32::try_from(r.col::<i64>(c)?).map_err(|e| corrupt("render cost", e))
    };
    Ok(Charged {
        tier: tier.parse().map_err(|e| corrupt("render cost tier", e))?,
        width: n("width")?,
        height: n("height")?,
        samples: n("samples")?,
        device_ms: r.col("device_ms")?,
    })
}

/// `impl CostStore` for a store with a `read` pool.
macro_rules! costs_impl {
    ($store:ty) => {
        impl $crate::store::costs::CostStore for $store {
            fn spent(&self, client: &str, since_ms: i64) -> BoxFut<'_, Result<i64, StoreError>> {
                let client = client.to_owned();
                Box::pin(async move {
                    let sum: Option<i64> = sqlx::query_scalar(
                        "SELECT CAST(SUM(cost_ms) AS BIGINT) FROM render_costs WHERE client = $1 AND at_ms >= $2",
                    )
                    .bind(client)
                    .bind(since_ms)
                    .fetch_one(&self.read)
                    .await?;
                    Ok(sum.unwrap_or(0))
                })
            }

            fn live_requests(&self, client: &str) -> BoxFut<'_, Result<Vec<kiln_protocol::RenderRequest>, StoreError>> {
                let client = client.to_owned();
                Box::pin(async move {
                    let rows: Vec<String> = sqlx::query_scalar(
                        "SELECT request FROM jobs WHERE client = $1 AND state IN ('queued', 'dispatched', 'running') \
                         AND follows IS NULL",
                    )
                    .bind(client)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter()
                        .map(|r| serde_json::from_str(r).map_err(|e| $crate::store::rows::corrupt("job request", e)))
                        .collect()
                })
            }

            fn recent_charges(
                &self,
                limit: u32,
            ) -> BoxFut<'_, Result<Vec<$crate::store::costs::Charged>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT tier, width, height, samples, device_ms FROM render_costs ORDER BY at_ms DESC LIMIT $1",
                    )
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map($crate::store::costs::charged_from_row).collect()
                })
            }

            fn usage(
                &self,
                client: Option<String>,
                since_ms: i64,
                until_ms: i64,
            ) -> BoxFut<'_, Result<Vec<$crate::store::costs::UsageLine>, StoreError>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT client, tier, (at_ms / 86400000) * 86400000 AS day_ms, COUNT(*) AS renders, \
                           CAST(SUM(device_ms) AS BIGINT) AS device_ms, CAST(SUM(cost_ms) AS BIGINT) AS cost_ms \
                         FROM render_costs WHERE (CAST($1 AS TEXT) IS NULL OR client = $1) AND at_ms >= $2 AND at_ms < $3 \
                         GROUP BY client, tier, (at_ms / 86400000) ORDER BY day_ms DESC, client, tier",
                    )
                    .bind(client)
                    .bind(since_ms)
                    .bind(until_ms)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter()
                        .map(|r| {
                            Ok($crate::store::costs::UsageLine {
                                client: r.col("client")?,
                                tier: r.col("tier")?,
                                day_ms: r.col("day_ms")?,
                                renders: r.col("renders")?,
                                device_ms: r.col("device_ms")?,
                                cost_ms: r.col("cost_ms")?,
                            })
                        })
                        .collect()
                })
            }

            fn cached(&self, keys: Vec<String>) -> BoxFut<'_, Result<Vec<String>, StoreError>> {
                Box::pin(async move {
                    let mut found = std::collections::HashSet::new();
                    for chunk in keys.chunks(super::shared::JOBS_CHUNK) {
                        let (marks, binds) = super::shared::in_list(chunk);
                        // Safe: the statement is built from parameter numbers only.
                        let sql = sqlx::AssertSqlSafe(format!(
                            "SELECT DISTINCT cache_key FROM assets WHERE cache_key IN ({marks})"
                        ));
                        let mut q = sqlx::query_scalar::<_, String>(sql);
                        for k in binds {
                            q = q.bind(k);
                        }
                        found.extend(q.fetch_all(&self.read).await?);
                    }
                    Ok(keys.into_iter().filter(|k| found.contains(k)).collect())
                })
            }

            fn asset_jobs(
                &self,
                hash: &str,
                limit: u32,
            ) -> BoxFut<'_, Result<Vec<$crate::store::costs::AssetJob>, StoreError>> {
                let hash = hash.to_owned();
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT id, client, idempotency_key, created_ms FROM jobs WHERE asset = $1 ORDER BY seq LIMIT $2",
                    )
                    .bind(hash)
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter()
                        .map(|r| {
                            Ok($crate::store::costs::AssetJob {
                                id: r.col("id")?,
                                client: r.col("client")?,
                                idempotency_key: r.col("idempotency_key")?,
                                created_ms: r.col("created_ms")?,
                            })
                        })
                        .collect()
                })
            }

            fn gallery(
                &self,
                q: $crate::store::costs::GalleryQuery,
            ) -> BoxFut<'_, Result<Vec<$crate::store::costs::GalleryItem>, StoreError>> {
                Box::pin(async move {
                    let word = |i: usize| q.words.get(i).map(|w| $crate::store::costs::like_anywhere(w));
                    let rows = sqlx::query(
                        "SELECT a.hash AS gallery_asset, a.created_ms AS gallery_ms, j.* FROM assets a \
                         JOIN jobs j ON j.seq = (SELECT MIN(f.seq) FROM jobs f WHERE f.asset = a.hash \
                           AND (CAST($1 AS TEXT) IS NULL OR f.client = $1)) \
                         WHERE j.request NOT LIKE '%\"tile\":{%' \
                         AND (CAST($2 AS TEXT) IS NULL OR LOWER(j.request) LIKE $2 ESCAPE '\\') \
                         AND (CAST($3 AS TEXT) IS NULL OR LOWER(j.request) LIKE $3 ESCAPE '\\') \
                         AND (CAST($4 AS TEXT) IS NULL OR LOWER(j.request) LIKE $4 ESCAPE '\\') \
                         AND (CAST($5 AS TEXT) IS NULL OR LOWER(j.request) LIKE $5 ESCAPE '\\') \
                         AND (CAST($6 AS BIGINT) IS NULL OR a.created_ms < $6 OR (a.created_ms = $6 AND a.hash < $7)) \
                         ORDER BY a.created_ms DESC, a.hash DESC LIMIT $8",
                    )
                    .bind(q.client)
                    .bind(word(0))
                    .bind(word(1))
                    .bind(word(2))
                    .bind(word(3))
                    .bind(q.before.as_ref().map(|b| b.0))
                    .bind(q.before.map(|b| b.1).unwrap_or_default())
                    .bind(i64::from(q.limit))
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter()
                        .map(|r| {
                            Ok($crate::store::costs::GalleryItem {
                                asset: r.col("gallery_asset")?,
                                created_ms: r.col("gallery_ms")?,
                                job: super::rows::job_from_row(r)?,
                            })
                        })
                        .collect()
                })
            }
        }
    };
}
pub(super) use costs_impl;

//! For tests and benchmarks (never linked by a service): where the real services are, what to do
//! when one is not there, and scratch schemas in PostgreSQL.
//!
//! Tests that need PostgreSQL, RabbitMQ or an MQTT broker read `KILN_TEST_DATABASE_URL`,
//! `KILN_TEST_AMQP_URL` and `KILN_TEST_MQTT_URL`
//! (defaults: the standard local ports). Where a service is unreachable such a test says so and
//! skips, unless `KILN_TEST_REQUIRE_SERVICES=1` (CI sets it): then it fails.

use std::time::Duration;

use sqlx::Connection;

/// Random bytes from the operating system.
fn os_random<const N: usize>() -> std::io::Result<[u8; N]> {
    use std::io::Read;
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Why a scratch schema could not be made or dropped.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The name is not a plain identifier.
    #[error("schema name {0:?}: only letters, digits and '_'")]
    BadName(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

fn check_identifier(name: &str) -> Result<(), SchemaError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(SchemaError::BadName(name.to_owned()));
    }
    Ok(())
}

/// Creates the schema `name` in the database at `base` and returns a URL whose connections use
/// it: a private namespace for a test or a benchmark on a shared server. `name` must be a plain
/// identifier (letters, digits, `_`).
pub async fn create_schema(base: &str, name: &str) -> Result<String, SchemaError> {
    check_identifier(name)?;
    let mut conn = sqlx::PgConnection::connect(base).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&mut conn).await?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok(format!("{base}{sep}options=-csearch_path%3D{name}"))
}

/// Drops the schema `name` (and everything in it) from the database at `base`.
pub async fn drop_schema(base: &str, name: &str) -> Result<(), SchemaError> {
    check_identifier(name)?;
    let mut conn = sqlx::PgConnection::connect(base).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {name} CASCADE"))).execute(&mut conn).await?;
    Ok(())
}

/// The default PostgreSQL URL for tests.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The default RabbitMQ URL for tests.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The default MQTT broker URL for tests.
pub const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";

/// Whether a missing service fails the test.
pub fn services_required() -> bool {
    std::env::var("KILN_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

fn skip_or_fail(service: &str, var: &str, url: &str, e: &dyn std::fmt::Display) {
    skip_or_fail_because(&format!("{service} at {url} is unreachable ({e})"), &format!("set {var}"));
}

fn skip_or_fail_because(why: &str, fix: &str) {
    if services_required() {
        panic!("KILN_TEST_REQUIRE_SERVICES=1 but {why}");
    }
    eprintln!("skipping: {why}; {fix}, or KILN_TEST_REQUIRE_SERVICES=1 to fail");
}

/// Whether the program `name` runs (as `name -V`); when it does not, says so and returns false,
/// or fails when services are required. For tools a test drives, such as socat.
pub fn program(name: &str) -> bool {
    let ran = std::process::Command::new(name)
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let why = match ran {
        Ok(s) if s.success() => return true,
        Ok(s) => format!("`{name} -V` exited with {s}"),
        Err(e) => format!("{name} does not run ({e})"),
    };
    skip_or_fail_because(&why, &format!("install {name}"));
    false
}

/// The PostgreSQL server tests use.
pub fn database_url() -> String {
    std::env::var("KILN_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// The RabbitMQ broker tests use.
pub fn amqp_url() -> String {
    std::env::var("KILN_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// A URL for a fresh, empty schema of the test database, so tests never see each other's rows;
/// `None` (after saying why) when PostgreSQL is unreachable and not required. Schemas left by
/// earlier runs more than an hour old are dropped.
pub async fn fresh_database() -> Option<String> {
    let base = database_url();
    let connect = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&base)).await;
    let mut conn = match connect.map_err(|e| e.to_string()).and_then(|c| c.map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => {
            skip_or_fail("PostgreSQL", "KILN_TEST_DATABASE_URL", &base, &e);
            return None;
        }
    };
    let now = kiln_protocol::now_ms();
    let old: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'kiln_t_%' \
         AND split_part(nspname, '_', 3)::bigint < $1",
    )
    .bind(now - 3_600_000)
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    for s in old {
        let _ = drop_schema(&base, &s).await;
    }
    let schema = format!("kiln_t_{now}_{}", u32::from_le_bytes(os_random::<4>().expect("random")));
    Some(create_schema(&base, &schema).await.expect("create a test schema"))
}

/// `(url, a unique prefix)` when `addr` accepts a TCP connection; else `None`, after saying why
/// (or failing, when services are required).
async fn reachable_with_prefix(service: &str, var: &str, url: String, addr: &str) -> Option<(String, String)> {
    let connect = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await;
    if let Err(e) = connect.map_err(|e| e.to_string()).and_then(|c| c.map_err(|e| e.to_string())) {
        skip_or_fail(service, var, &url, &e);
        return None;
    }
    let prefix = format!("kt{:08x}", u32::from_le_bytes(os_random::<4>().expect("random")));
    Some((url, prefix))
}

/// A unique prefix for a test's exchanges and queues on the shared broker, or `None` (after
/// saying why) when RabbitMQ is unreachable and not required.
pub async fn amqp() -> Option<(String, String)> {
    let url = amqp_url();
    let addr = amqp_addr(&url);
    reachable_with_prefix("RabbitMQ", "KILN_TEST_AMQP_URL", url, &addr).await
}

/// The MQTT broker tests use.
pub fn mqtt_url() -> String {
    std::env::var("KILN_TEST_MQTT_URL").unwrap_or_else(|_| DEFAULT_MQTT_URL.to_owned())
}

/// The MQTT broker and a unique topic prefix for a test, or `None` (after saying why) when the
/// broker is unreachable and not required.
pub async fn mqtt() -> Option<(String, String)> {
    let url = mqtt_url();
    let addr = kiln_protocol::fleet::parse_mqtt_url(&url).map(|(h, p)| format!("{h}:{p}")).unwrap_or_default();
    reachable_with_prefix("MQTT broker", "KILN_TEST_MQTT_URL", url, &addr).await
}

/// The RabbitMQ broker's `host:port`, from its URL.
pub fn amqp_addr(url: &str) -> String {
    url.split('@').next_back().and_then(|h| h.split('/').next()).unwrap_or("127.0.0.1:5672").to_owned()
}

/// A CA, and a certificate it signed for `localhost` and 127.0.0.1 with its key: PEM files for
/// tests of TLS.
pub struct TlsFiles {
    /// The CA's certificate: what a client trusts.
    pub ca: std::path::PathBuf,
    /// The server's certificate.
    pub cert: std::path::PathBuf,
    /// The server's private key (PKCS#8).
    pub key: std::path::PathBuf,
}

/// Makes [`TlsFiles`] in `dir` with the `openssl` program; `None` (after saying why) when it is
/// not there and services are not required.
pub fn tls_files(dir: &std::path::Path) -> Option<TlsFiles> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr))),
            Err(e) => Err(format!("openssl does not run ({e})")),
        }
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=kiln test CA"];
    let made = std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())
    .and_then(|()| run(&[&["req", "-x509"][..], &ec, &ca].concat()));
    let server = ["-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost"];
    let made = made.and_then(|()| run(&[&["req"][..], &ec, &server].concat())).and_then(|()| {
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])
    });
    match made {
        Ok(()) => Some(TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") }),
        Err(why) => {
            skip_or_fail_because(&why, "install openssl");
            None
        }
    }
}

/// socat on a loopback port, taking TLS with [`TlsFiles`]' certificate and passing the plain
/// bytes on to a service: a TLS front for a broker that has none. Stopped when dropped.
pub struct TlsProxy {
    /// Where it listens, on 127.0.0.1.
    pub port: u16,
    child: std::process::Child,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a [`TlsProxy`] in front of `target` (`host:port`) and waits until it listens; `None`
/// (after saying why) when socat is not there and services are not required.
pub async fn tls_proxy(files: &TlsFiles, target: &str) -> Option<TlsProxy> {
    if !program("socat") {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let listen = format!(
        "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
        files.cert.display(),
        files.key.display()
    );
    let child = std::process::Command::new("socat")
        .args([listen, format!("TCP:{target}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start socat");
    let proxy = TlsProxy { port, child };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "socat did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(proxy)
}

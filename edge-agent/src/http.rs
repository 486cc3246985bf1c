//! The agent's HTTP: fetching assets by hash from the scheduler (verified against their BLAKE3
//! before use), uploading photos as assets, and reading a camera's snapshot URL. Bodies stream to
//! and from disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

type Body = BoxBody<Bytes, std::io::Error>;

/// An HTTP client bound to the scheduler.
#[derive(Clone)]
pub struct Http {
    client: HyperClient<HttpsConnector<HttpConnector>, Body>,
    base: String,
    token: String,
    timeout: Duration,
    /// The largest download taken, bytes.
    max_bytes: u64,
}

impl Http {
    /// A client for the scheduler at `base` (`http://host:port`, or `https://` with `tls`'s
    /// trust) with a device token.
    pub fn new(base: &str, token: &str, timeout: Duration, tls: std::sync::Arc<rustls::ClientConfig>) -> Http {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = HyperClient::builder(TokioExecutor::new()).build(conn);
        Http {
            client,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            timeout,
            max_bytes: 2 << 30,
        }
    }

    /// The same client, taking downloads of at most `max_bytes`.
    pub fn max_download(mut self, max_bytes: u64) -> Http {
        self.max_bytes = max_bytes;
        self
    }

    /// `url` as an address on the scheduler: a path (`/v1/assets/…`), or an absolute URL at the
    /// scheduler's own origin. Anything else is refused: the agent sends its token nowhere else.
    pub fn on_scheduler(&self, url: &str) -> Result<String, String> {
        if url.starts_with('/') && !url.starts_with("//") {
            return Ok(format!("{}{url}", self.base));
        }
        match url.strip_prefix(self.base.as_str()) {
            Some(rest) if rest.starts_with('/') && !rest.starts_with("//") => Ok(url.to_owned()),
            _ => Err(format!("{url:?} is not on the scheduler ({}); the agent fetches only from there", self.base)),
        }
    }

    /// The asset `hash` in `dir` (as `dir/{hash}`), fetched from `url` (absolute, or a path on the
    /// scheduler) unless a copy is there, and checked against its hash either way.
    pub async fn asset(&self, url: &str, hash: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join(hash);
        if path.is_file() && hash_file(&path).await? == hash {
            return Ok(path);
        }
        // Devices of one agent share the folder: each fetch writes a part file of its own.
        static FETCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = FETCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{hash}.{n}.part"));
        let url = self.on_scheduler(url).map_err(anyhow::Error::msg)?;
        let got = self.get_to_file(&url, &tmp, true).await?;
        if got != hash {
            let _ = tokio::fs::remove_file(&tmp).await;
            anyhow::bail!("asset {hash}: the bytes fetched hash to {got}; refused");
        }
        tokio::fs::rename(&tmp, &path).await?;
        Ok(path)
    }

    /// GETs `url` into `path`; the BLAKE3 of what was written. With `auth`, the device token
    /// goes along, and only to the scheduler.
    pub async fn get_to_file(&self, url: &str, path: &Path, auth: bool) -> anyhow::Result<String> {
        let mut req = Request::builder().method(Method::GET).uri(url);
        if auth {
            let on = self.on_scheduler(url).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(on == url, "{url:?} is not a full URL on the scheduler");
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        }
        let req = req.body(Empty::new().map_err(|never| match never {}).boxed())?;
        let work = async {
            let resp = self.client.request(req).await?;
            if resp.status() != StatusCode::OK {
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                anyhow::bail!("GET {url}: {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
            }
            let max = self.max_bytes;
            let announced =
                resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if announced.is_some_and(|n| n > max) {
                anyhow::bail!(
                    "GET {url}: {} bytes is over scheduler.max_download_bytes ({max})",
                    announced.unwrap_or(0)
                );
            }
            let mut file = tokio::fs::File::create(path).await?;
            let mut hasher = blake3::Hasher::new();
            let mut body = resp.into_body();
            let mut got = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    got += data.len() as u64;
                    if got > max {
                        drop(file);
                        let _ = tokio::fs::remove_file(path).await;
                        anyhow::bail!("GET {url}: more than scheduler.max_download_bytes ({max}); cut off");
                    }
                    hasher.update(&data);
                    file.write_all(&data).await?;
                }
            }
            file.sync_all().await?;
            Ok(hasher.finalize().to_hex().to_string())
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| anyhow::anyhow!("GET {url}: no answer in time"))?
    }

    /// Uploads the file at `path` as an asset, the output of task `task_id`; its hash.
    pub async fn upload(&self, path: &Path, task_id: &str) -> anyhow::Result<String> {
        let hash = hash_file(path).await?;
        let file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let stream = tokio_util::io::ReaderStream::new(file).map_ok(Frame::data);
        let body = BodyExt::boxed(StreamBody::new(stream));
        let url = format!("{}/v1/assets/{hash}?task={}", self.base, kiln_protocol::url_component(task_id));
        let req = Request::builder()
            .method(Method::PUT)
            .uri(&url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, len)
            .body(body)?;
        let work = async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if !status.is_success() {
                anyhow::bail!("PUT {url}: {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
            }
            Ok(())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| anyhow::anyhow!("PUT {url}: no answer in time"))??;
        Ok(hash)
    }
}

/// The BLAKE3 of a file, hex.
pub async fn hash_file(path: &Path) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one answer per connection: `head` and `n` bytes of body, then closes.
    async fn serve_body(head: &'static str, n: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let _ = c.write_all(head.as_bytes()).await;
                let _ = c.write_all(&vec![b'x'; n]).await;
            }
        });
        format!("http://{addr}/snapshot")
    }

    #[tokio::test]
    async fn a_download_over_the_cap_is_cut_off_and_leaves_no_file() {
        let tls = crate::tls::client_config(None).unwrap();
        let http = Http::new("http://127.0.0.1:1", "kiln_x", Duration::from_secs(5), tls).max_download(1000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("got");
        let cases = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", 5000, "5000 bytes is over"),
            ("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", 5000, "cut off"),
        ];
        for (head, n, says) in cases {
            let url = serve_body(head, n).await;
            let e = http.get_to_file(&url, &path, false).await.unwrap_err().to_string();
            assert!(e.contains("max_download_bytes") && e.contains(says), "{e}");
            assert!(!path.exists(), "{head:?}");
        }
        let url = serve_body("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 1000).await;
        http.get_to_file(&url, &path, false).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1000, "at the cap is taken");
    }

    #[test]
    fn only_paths_and_urls_on_the_scheduler_are_fetched_with_the_token() {
        let tls = crate::tls::client_config(None).unwrap();
        let http = Http::new("http://10.0.0.5:7070/", "kiln_x", Duration::from_secs(1), tls);
        let on = |u: &str| http.on_scheduler(u);
        assert_eq!(on("/v1/assets/ab"), Ok("http://10.0.0.5:7070/v1/assets/ab".into()));
        assert_eq!(on("http://10.0.0.5:7070/v1/assets/ab"), Ok("http://10.0.0.5:7070/v1/assets/ab".into()));
        for foreign in [
            "http://evil.example/v1/assets/ab",
            "//evil.example/v1/assets/ab",
            "http://10.0.0.5:7070.evil.example/v1/assets/ab",
            "http://10.0.0.5:70700/v1/assets/ab",
            "http://10.0.0.5:7070@evil.example/x",
            "http://10.0.0.5:7070//evil.example/x",
            "https://10.0.0.5:7070/v1/assets/ab",
            "v1/assets/ab",
            "",
        ] {
            let e = on(foreign).unwrap_err();
            assert!(e.contains("the agent fetches only from there"), "{foreign}: {e}");
        }
    }
}
